// The help queue, first come first served, with each hand's wait ticking on the server's clock.
import {
  $, arrange, button, cellLabel, collator, el, formatTime, formatWait, millis, setHidden, setText,
} from "./dom.js";
import { fetchJson, serverNow } from "./api.js";
import { t } from "./i18n.js";
import { pressHand } from "./rules.js";
import { state } from "./state.js";
import { displayName, onTheWay, openStudent } from "./story.js";

let drawnKey = "";
const items = new Map(); // student_id -> the parts of their queue item
let focused = null; // the student whose item H focused
let medianTimer = 0;
let medianAskedFor = null; // the filters and queue the median shown was asked for
const MEDIAN_REFRESH_MS = 1000; // answers come in bursts: one read for a burst

export function queueStudents() {
  const team = state.filters.team;
  return [...state.students.values()]
    .filter((student) => student.hand_raised && (!team || student.team === team))
    .sort((a, b) => collator.compare(a.hand_raised_at || "", b.hand_raised_at || "") ||
      collator.compare(a.student_id, b.student_id));
}

const itemKey = (s) => [s.student_id, s.hand_raised_at, JSON.stringify(s.hand_on_my_way),
  s.last_notebook_path, s.last_cell_index, s.name, s.team].join("|");

export function drawQueue(queue) {
  const key = queue.map(itemKey).join("\u0000");
  const medianFor = [state.filters.course, state.filters.team, key].join("\u0001");
  if (medianFor !== medianAskedFor) scheduleMedianWait();
  medianAskedFor = medianFor;
  if (key === drawnKey) return;
  drawnKey = key;
  setText($("#queue-count"), queue.length ? queue.length : "");
  setHidden($("#queue-empty"), queue.length > 0);
  const shown = queue.map((student, index) => updateItem(student, index));
  for (const id of items.keys()) if (!queue.some((student) => student.student_id === id)) items.delete(id);
  arrange($("#queue"), shown);
  drawWaits(serverNow());
}

// Today's median wait from GET /api/v1/help/stats; "today" is since the browser's midnight.
// limit=0: the figures without the per-raise rows, which the queue does not show.
function scheduleMedianWait() {
  if (medianTimer) return;
  medianTimer = setTimeout(async () => {
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    try {
      const { summary } = await fetchJson("/api/v1/help/stats", {
        since: midnight.toISOString(), course_id: state.filters.course, team: state.filters.team,
        limit: 0,
      });
      const wait = summary.median_wait_seconds;
      $("#queue-median").textContent = wait === null ? t("queue.median_none")
        : t("queue.median", { wait: formatWait(wait * 1000), count: summary.answered });
    } catch {
      // The next change of the queue asks again; the figure shown meanwhile stands.
    } finally {
      medianTimer = 0;
    }
  }, MEDIAN_REFRESH_MS);
}

// Items are updated in place, never rebuilt: a student running a cell while the instructor
// reaches for "Dismiss" must not swap the button from under the pointer.
function updateItem(student, index) {
  if (!items.has(student.student_id)) items.set(student.student_id, queueItem(student.student_id));
  const parts = items.get(student.student_id);
  const raisedAt = student.hand_raised_at || "";
  if (parts.wait.dataset.raisedAt !== raisedAt) {
    parts.wait.dataset.raisedAt = raisedAt;
    parts.raised.textContent = t("queue.raised", { time: formatTime(student.hand_raised_at) });
  }
  const onWay = student.hand_on_my_way;
  parts.item.classList.toggle("on-way", Boolean(onWay));
  parts.item.classList.toggle("focused", focused === student.student_id);
  setText(parts.position, index + 1);
  setText(parts.name, displayName(student));
  setText(parts.team, student.team ? ` · ${student.team}` : "");
  const path = student.last_notebook_path || "";
  setText(parts.where, path ? cellLabel(student.last_cell_index, path) : "");
  if (parts.where.title !== path) parts.where.title = path;
  setText(parts.onWay, onTheWay(onWay));
  setHidden(parts.onMyWay, Boolean(onWay));
  return parts.item;
}

function queueItem(studentId) {
  const parts = {
    position: el("span", "position"),
    name: button("name", "", () => openStudent(studentId)),
    team: el("span", "hint"),
    where: el("span", "where"),
    raised: el("span"),
    wait: el("span", "wait"),
    onWay: el("span"),
    onMyWay: actionButton(t("queue.onMyWay"), "on-my-way", studentId),
  };
  parts.item = el("li", "", parts.position,
    el("div", "who", parts.name, parts.team, parts.where,
      el("span", "since", parts.raised, parts.wait, parts.onWay)),
    el("div", "actions", parts.onMyWay, actionButton(t("queue.dismiss"), "dismiss", studentId)));
  parts.item.dataset.studentId = studentId;
  return parts;
}

function actionButton(label, action, studentId) {
  return button(action, label, (click) => {
    click.stopPropagation();
    pressHand(click.currentTarget, studentId, action);
  });
}

// Every wait on the page: the queue's and the open student's.
export function drawWaits(now) {
  for (const wait of document.querySelectorAll("[data-raised-at]")) {
    const raised = millis(wait.dataset.raisedAt);
    if (raised !== null) setText(wait, formatWait(now - raised));
  }
}

export function focusOldestHand() {
  const first = $("#queue li");
  if (!first) return;
  focused = first.dataset.studentId;
  document.querySelectorAll("#queue li.focused").forEach((item) => item.classList.remove("focused"));
  first.classList.add("focused");
  first.scrollIntoView({ block: "nearest" });
  first.querySelector("button.name").focus();
}
