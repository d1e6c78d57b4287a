// Building and formatting nodes. Every student-provided value goes in as text (el, breakable
// and Node.append make text nodes), never as markup: names, code and tracebacks are whatever
// a student's browser posted.

import { ago, t } from "./i18n.js";

export const $ = (selector) => document.querySelector(selector);
export const collator = new Intl.Collator(undefined, { sensitivity: "base", numeric: true });

// el("li", "class", "text", childNode, ...): strings and numbers become text nodes.
export function el(tag, className, ...content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...content.filter((part) => part !== null && part !== undefined));
  return node;
}

export function button(className, text, onClick) {
  const node = el("button", className, text);
  node.type = "button";
  if (onClick) node.addEventListener("click", onClick);
  return node;
}

// Writes only what differs: even an unchanged text or flag, written again, makes the browser
// restyle and lay out the node, and a draw rewrites every queue item and count.
export function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

export function setHidden(node, hidden) {
  if (node.hidden !== hidden) node.hidden = hidden;
}

export function svg(tag, attributes, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

export function addFact(list, term, value) {
  list.append(el("dt", "", term), el("dd", "", value));
}

// Moves only the nodes out of place: a moved table row's style is computed anew, and
// re-inserting a whole class of rows every frame made each frame a long task.
export function arrange(parent, wanted) {
  const keep = new Set(wanted);
  for (const child of [...parent.children]) if (!keep.has(child)) child.remove();
  let cursor = parent.firstElementChild;
  for (const node of wanted) {
    // The node at the cursor moved further down: skip it, it is moved when its turn comes.
    if (node !== cursor && cursor && cursor.nextElementSibling === node) cursor = node;
    if (node === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(node, cursor);
  }
}

export function fileName(path) {
  return path ? String(path).split("/").at(-1) || String(path) : "";
}

// A long file name or address wraps after "_", "-", "." or "@" rather than at any letter.
export function breakable(node, text) {
  for (const part of String(text).split(/(?<=[_.@-])/)) {
    if (node.childNodes.length) node.append(document.createElement("wbr"));
    node.append(part);
  }
  return node;
}

// The file name stays whole; only the folders before it may be cut.
export function pathNode(path) {
  const node = el("span", "path");
  if (!path) return node;
  const text = String(path);
  const cut = text.lastIndexOf("/") + 1;
  if (cut > 0) node.append(el("span", "dir", text.slice(0, cut)));
  node.append(breakable(el("span", "file"), text.slice(cut)));
  node.title = text;
  return node;
}

export const cellPosition = (index) => `[${index ?? "?"}]`;

export function cellLabel(index, path) {
  return path ? `${cellPosition(index)} ${fileName(path)}` : cellPosition(index);
}

export function millis(iso) {
  const value = Date.parse(iso);
  return Number.isNaN(value) ? null : value;
}

// One formatter for the page: toLocaleTimeString builds a new one per call.
export const timeFormat = new Intl.DateTimeFormat([], {
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});

export function formatTime(iso) {
  const moment = new Date(iso);
  return Number.isNaN(moment.getTime()) ? String(iso || "") : timeFormat.format(moment);
}

export function formatWait(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  const minutes = Math.floor(seconds / 60);
  if (minutes >= 60) return t("wait.long", { hours: Math.floor(minutes / 60), minutes: minutes % 60 });
  return `${minutes}:${String(seconds % 60).padStart(2, "0")}`;
}

// An age a person reads ("2分前"), the exact time in its title; drawAges keeps it current.
export function agoNode(iso, now, className = "time") {
  const node = el("time", `${className} ago`);
  const moment = millis(iso);
  if (moment === null) return node;
  node.dateTime = iso;
  node.title = new Date(moment).toLocaleString();
  node.textContent = ago(moment, new Date(now));
  return node;
}

// "セル実行" for cell_executed; a type the table does not know shows as it came.
export function eventName(type) {
  const name = t(`event.${type}`);
  return name === `event.${type}` ? type : name;
}

export function drawAges(now) {
  for (const node of document.querySelectorAll("time.ago[datetime]")) {
    const text = ago(millis(node.dateTime), new Date(now));
    if (node.textContent !== text) node.textContent = text;
  }
}

// Search matches "zoe" to "Zoë" and "ｚｏｅ", "ｱﾀﾞ" to "アダ": compatibility forms (full- and
// half-width) and case folded, Latin accents dropped; kana keep their dakuten (ダ is not タ).
export const fold = (text) =>
  String(text).normalize("NFKD").replace(/[\u0300-\u036f]/g, "").normalize("NFKC").toLowerCase();
