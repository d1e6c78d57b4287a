// Every string a person reads comes from one table per language (strings/en.js, strings/ja.js)
// through t(). The language is the browser's (navigator.languages), unless Settings chose one.
import { en } from "./strings/en.js";
import { ja } from "./strings/ja.js";

const TABLES = { en, ja };
const SAVED_LANGUAGE = "telemetry.language";

export const LANGUAGES = Object.keys(TABLES);
export let language = chooseLanguage();

function chooseLanguage() {
  const saved = localStorage.getItem(SAVED_LANGUAGE);
  if (LANGUAGES.includes(saved)) return saved;
  const preferred = (navigator.languages ?? [navigator.language]).map((tag) => tag.slice(0, 2));
  return preferred.find((code) => LANGUAGES.includes(code)) ?? "en";
}

export function setLanguage(code) {
  language = LANGUAGES.includes(code) ? code : "en";
  localStorage.setItem(SAVED_LANGUAGE, language);
  translatePage();
}

// t("queue.waiting", {count: 3}): the text with {name}s filled in. An entry may be
// {one, other} by the language's plural rules; a missing key falls back to English.
export function t(key, params = {}) {
  let text = TABLES[language][key] ?? en[key];
  if (text === undefined) return key;
  if (typeof text === "object") text = text[formats("plural").select(params.count)] ?? text.other;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""));
}

const AGE_UNITS = [["day", 86400], ["hour", 3600], ["minute", 60], ["second", 1]];
const ageTexts = new Map(); // "ja|-2|minute" -> "2 分前"

// An age a person reads: "2分前", "2 min ago". Exact times stay in titles and exports.
export function ago(date, now = new Date()) {
  const seconds = (new Date(date) - now) / 1000;
  const [unit, size] = AGE_UNITS.find(([, size]) => Math.abs(seconds) >= size) ?? ["second", 1];
  const amount = Math.round(seconds / size);
  // A page ages hundreds of times at once, mostly to the same few texts: each made once.
  const key = `${language}|${amount}|${unit}`;
  if (!ageTexts.has(key)) ageTexts.set(key, formats("age").format(amount, unit));
  return ageTexts.get(key);
}

// Intl formatters are slow to make and a page ages hundreds of times a tick: one per language.
const FORMATS = {
  age: (code) => new Intl.RelativeTimeFormat(code, { numeric: "auto", style: "short" }),
  plural: (code) => new Intl.PluralRules(code),
};
const made = new Map();

function formats(kind) {
  const key = `${kind}:${language}`;
  if (!made.has(key)) made.set(key, FORMATS[kind](language));
  return made.get(key);
}

// Markup names its strings: data-i18n (text), data-i18n-placeholder, -title, -aria-label.
export function translatePage(root = document) {
  document.documentElement.lang = language;
  for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const attribute of ["placeholder", "title", "aria-label"]) {
    const data = `i18n${attribute.replace(/(^|-)(\w)/g, (_, __, c) => c.toUpperCase())}`;
    for (const node of root.querySelectorAll(`[data-i18n-${attribute}]`)) {
      node.setAttribute(attribute, t(node.dataset[data]));
    }
  }
}
