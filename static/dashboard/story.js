// A student's story: their facts and their timeline, paged back on demand and joined by their
// live events. Also how an event's code, error and output read, here and in the feed.
import { $, addFact, agoNode, cellLabel, el, eventName, formatWait, millis } from "./dom.js";
import { fetchJson, serverNow } from "./api.js";
import { drawStudentExportLink } from "./export.js";
import { t } from "./i18n.js";
import { presence, pressHand, recentErrors } from "./rules.js";
import { schedule, state } from "./state.js";

const TIMELINE_LIMIT = 50;
const INCOMING_LIMIT = 2000;
const OUTPUT_CHARS = 4000;

export const displayName = (student) => student.name || student.student_id;
export const statusClass = (status) => (status === "ok" || status === "error" ? status : "none");
export const eventTypeLabel = (event) => (event.status
  ? t("event.withStatus", { type: eventName(event.event_type), status: eventStatus(event.status) })
  : eventName(event.event_type));
const eventStatus = (status) => (status === "ok" || status === "error" ? t(`event.status.${status}`) : status);
export const eventHints = (event) => [
  event.duration_ms != null && `${Math.round(event.duration_ms)} ms`,
  event.extra?.by && t("story.by", { by: event.extra.by }),
].filter(Boolean);

const CUT = "\u0000"; // where a node goes in a translated sentence
const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

// Code, outputs and tracebacks as they were posted; the error line as the server cleaned it.
// cell-monitor-extension's `result` repeats its errorMessage: the failure shows once, and a
// whole traceback repeated there goes under Traceback.
export function appendExecution(body, event) {
  if (event.source != null || event.status) {
    body.append(el("h3", "", t("story.code")), el("pre", "code", event.source ?? t("story.noCode")));
    if (event.source_truncated) body.append(el("p", "hint cut", t("story.codeCut")));
  }
  if (event.error_text) body.append(el("h3", "", t("story.error")), el("pre", "error", event.error_text));
  const output = outputText(event.outputs);
  const repeated = output && repeatsError(output, event);
  const traceback = (event.error?.traceback || []).join("\n") ||
    (repeated && output.trim() !== event.error_text?.trim() ? output.replace(ANSI, "") : "");
  if (traceback) {
    body.append(el("details", "traceback", el("summary", "", t("story.traceback")), el("pre", "error", traceback)));
  }
  if (output && !repeated) body.append(el("h3", "", t("story.output")), el("pre", "output", output));
  if (event.outputs_truncated) body.append(el("p", "hint cut", t("story.outputCut")));
}

function repeatsError(output, event) {
  const error = event.error;
  if (!error) return false;
  const said = [error.evalue, [error.ename, error.evalue].filter(Boolean).join(": "), event.error_text];
  return said.some((text) => text && output.trim() === String(text).trim());
}

function outputText(outputs) {
  if (outputs == null) return "";
  let text;
  if (typeof outputs === "string") text = outputs;
  else if (Array.isArray(outputs)) text = outputs.map(outputPart).filter(Boolean).join("\n");
  else text = JSON.stringify(outputs, null, 1);
  return text.length > OUTPUT_CHARS ? `${text.slice(0, OUTPUT_CHARS)}…` : text;
}

function outputPart(output) {
  if (typeof output === "string") return output;
  if (!output || typeof output !== "object") return JSON.stringify(output);
  const text = output.text ?? output.data?.["text/plain"];
  if (text !== undefined) return Array.isArray(text) ? text.join("") : String(text);
  if (!output.ename) return JSON.stringify(output);
  return [[output.ename, output.evalue].filter(Boolean).join(": "), ...(output.traceback || [])].join("\n");
}

export function closePanels() {
  state.panel = null;
  $("#student-panel").hidden = true;
  $("#timeline").replaceChildren(); // an erased student's story goes with the panel
  $("#cell-panel").hidden = true;
  $("#settings").open = false;
}

export function openStudent(studentId) {
  closePanels();
  state.panel = { kind: "student", id: studentId, before: null, incoming: [], drawnKey: "", last: null };
  $("#student-panel").hidden = false;
  $("#timeline-older").hidden = true;
  drawStudentExportLink(studentId);
  drawStudentPanel();
  loadTimeline(state.panel);
  $("#student-panel .close").focus();
}

// Live events of the open student, drawn once the timeline's first page is there.
export function noteStudentEvent(event) {
  const panel = state.panel;
  if (panel?.kind !== "student" || panel.id !== event.student_id) return;
  panel.incoming.push(event);
  if (panel.incoming.length > INCOMING_LIMIT) panel.incoming.shift();
}

async function loadTimeline(panel) {
  const older = $("#timeline-older");
  older.disabled = true;
  try {
    const page = await fetchJson("api/v1/events", {
      student_id: panel.id, before_id: panel.before, limit: TIMELINE_LIMIT, collapse_beats: "true",
    });
    if (state.panel !== panel) return;
    $("#timeline").append(...page.events.map(timelineItem));
    panel.before = page.next_before_id;
    older.hidden = page.next_before_id === null;
    if (panel.last === null) {
      panel.last = page.latest_id;
      schedule();
    }
  } catch {
    older.hidden = false; // the same button tries again
  } finally {
    older.disabled = false;
  }
}

function timelineItem(event) {
  const item = el("li", `status-${statusClass(event.status)}`);
  item.dataset.eventId = String(event.id);
  const line = el("div", "line", agoNode(event.occurred_at, serverNow()),
    el("span", "type", eventTypeLabel(event)));
  if (event.notebook_path) line.append(el("span", "where", cellLabel(event.cell_index, event.notebook_path)));
  line.append(...eventHints(event).map((hint) => el("span", "hint", hint)));
  item.append(line);
  appendExecution(item, event);
  return item;
}

export function drawStudentPanel() {
  const panel = state.panel;
  if (panel?.kind !== "student") return;
  if (panel.incoming.length && panel.last !== null) {
    const newer = panel.incoming.filter((event) => event.id > panel.last).reverse();
    panel.incoming = [];
    $("#timeline").prepend(...newer.map(timelineItem));
  }
  const student = state.students.get(panel.id);
  if (!student) return;
  const key = JSON.stringify(student) + student._presence;
  if (key === panel.drawnKey) return;
  panel.drawnKey = key;
  $("#student-title").textContent = displayName(student);
  $("#student-facts").replaceChildren(studentFacts(student));
  $("#student-on-my-way").hidden = !student.hand_raised || Boolean(student.hand_on_my_way);
  $("#student-dismiss").hidden = !student.hand_raised;
}

function studentFacts(student) {
  const facts = el("dl", "facts");
  const presenceNow = student._presence || presence(student, serverNow());
  const recent = student.recent_statuses.length;
  const runs = student.execution_count;
  const rate = runs ? Math.round((100 * student.error_count) / runs) : 0;
  const flags = [];
  if (student.stuck) flags.push(t("story.stuck", { count: student.error_streak }));
  if (student.struggling) flags.push(t("story.struggling"));
  addFact(facts, t("story.id"), student.student_id);
  if (student.team) addFact(facts, t("story.team"), student.team);
  if (student.course_id) addFact(facts, t("story.course"), student.course_id);
  const seen = agoNode(student.last_seen, serverNow(), "seen");
  const [before, after] = t("story.presenceValue", { presence: t(`presence.${presenceNow}`), ago: CUT }).split(CUT);
  addFact(facts, t("story.presence"), el("span", "", before, seen, after));
  addFact(facts, t("story.hand"), handFact(student));
  addFact(facts, t("story.runs"), t("story.runCounts", {
    runs, errors: student.error_count, rate, recent: recentErrors(student), count: recent,
  }));
  addFact(facts, t("story.attention"), flags.join("; ") || t("story.none"));
  addFact(facts, t("story.nowIn"), student.last_notebook_path
    ? `${cellLabel(student.last_cell_index, student.last_notebook_path)} (${student.last_notebook_path})`
    : t("story.noNotebook"));
  return facts;
}

export const onTheWay = (onWay) =>
  (onWay ? (onWay.by ? t("story.onTheWayBy", { by: onWay.by }) : t("story.onTheWay")) : "");

function handFact(student) {
  if (!student.hand_raised) return t("story.notRaised");
  const raised = millis(student.hand_raised_at);
  const wait = el("span", "hand-wait", formatWait(serverNow() - raised));
  wait.dataset.raisedAt = student.hand_raised_at;
  const [before, after] = t("story.raisedAt", { ago: CUT }).split(CUT);
  return el("span", "", before, agoNode(student.hand_raised_at, serverNow(), "raised"), after, wait,
    onTheWay(student.hand_on_my_way));
}

export function setUpStory() {
  $("#timeline-older").addEventListener("click", () => state.panel && loadTimeline(state.panel));
  for (const action of ["on-my-way", "dismiss"]) {
    const pressed = $(`#student-${action}`);
    pressed.addEventListener("click", () => state.panel && pressHand(pressed, state.panel.id, action));
  }
  for (const close of document.querySelectorAll(".panel .close")) close.addEventListener("click", closePanels);
}
