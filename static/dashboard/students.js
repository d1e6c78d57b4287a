// The students table: a row per student, redrawn only when that student changed, sorted and
// filtered on the page, optionally grouped by team.
import {
  $, agoNode, arrange, breakable, collator, el, fileName, formatTime, millis, pathNode, setHidden,
  setText,
} from "./dom.js";
import { serverNow } from "./api.js";
import { t } from "./i18n.js";
import { matchesStudentFilters, onFilterChange } from "./filters.js";
import { attentionRank, presence, recentErrors, stalledSince } from "./rules.js";
import { rowBudget, schedule, state } from "./state.js";
import { displayName, openStudent } from "./story.js";

let sort = { key: "attention", direction: 1 };
let groupTeams = false;
let rebuild = false;
let drawnOrder = "";
const rows = new Map(); // student_id -> <tr>
const groupRows = new Map(); // team -> its heading row

onFilterChange((kind) => {
  if (kind === "team" || kind === "search") rebuild = true;
});

const LAST = "\uffff"; // sorts students without a team or notebook after the others
const SORT_KEYS = {
  name: (a, b) => collator.compare(displayName(a), displayName(b)),
  team: (a, b) => collator.compare(a.team || LAST, b.team || LAST),
  notebook: (a, b) =>
    collator.compare(fileName(a.last_notebook_path) || LAST, fileName(b.last_notebook_path) || LAST),
  last_seen: (a, b) => (millis(b.last_seen) ?? 0) - (millis(a.last_seen) ?? 0),
  executions: (a, b) => b.execution_count - a.execution_count,
  errors: (a, b) => b.error_count - a.error_count,
  attention: (a, b) => attentionRank(a) - attentionRank(b) ||
    (a.hand_raised ? collator.compare(a.hand_raised_at || "", b.hand_raised_at || "") : 0),
};

function compareStudents(a, b) {
  return (groupTeams && SORT_KEYS.team(a, b)) ||
    sort.direction * SORT_KEYS[sort.key](a, b) ||
    SORT_KEYS.name(a, b) ||
    collator.compare(a.student_id, b.student_id);
}

export function resetTable() {
  forgetRows([...rows.keys()]);
  drawnOrder = "";
}

export function forgetRows(ids) {
  for (const id of ids) {
    rows.get(id)?.remove();
    rows.delete(id);
  }
  rebuild = true;
}

// Returns whether anything about the students changed in this frame.
export function drawStudents() {
  if (!state.dirty.size && !rebuild) return false;
  const now = serverNow();
  // Live, a frame has a few dirty rows; after a load, all of them, spread over frames.
  const inTime = rowBudget();
  for (const id of state.dirty) {
    if (!inTime()) break;
    state.dirty.delete(id);
    const student = state.students.get(id);
    if (student) drawStudent(student, now);
  }
  if (state.dirty.size) schedule();
  const visible = [...state.students.values()]
    .filter((student) => rows.has(student.student_id) && matchesStudentFilters(student))
    .sort(compareStudents);
  const order = `${groupTeams}\u0001${visible.map((s) => s.student_id).join("\u0000")}`;
  if (order !== drawnOrder || rebuild) {
    arrange($("#students tbody"), visible.flatMap((student, index) =>
      groupTeams && student.team !== visible[index - 1]?.team
        ? [groupRow(student.team), rows.get(student.student_id)]
        : [rows.get(student.student_id)]));
    drawnOrder = order;
    rebuild = false;
  }
  const total = state.students.size;
  setText($("#student-count"), visible.length === total ? total
    : t("students.shownOf", { shown: visible.length, total }));
  setHidden($("#empty"), total > 0 || !state.loaded);
  return true;
}

function groupRow(team) {
  if (!groupRows.has(team)) {
    const cell = el("td", "", team || t("students.noTeam"));
    cell.colSpan = 7;
    groupRows.set(team, el("tr", "group", cell));
  }
  return groupRows.get(team);
}

function drawStudent(student, now) {
  let row = rows.get(student.student_id);
  if (!row) {
    row = el("tr");
    row.dataset.studentId = student.student_id;
    row.tabIndex = 0; // Tab reaches a row, Enter opens it (keys.js)
    row.addEventListener("click", () => openStudent(student.student_id));
    rows.set(student.student_id, row);
  }
  student._presence = presence(student, now);
  student._stalled = stalledSince(student, now);
  row.classList.toggle("stalled", Boolean(student._stalled) && !student.stuck);
  row.classList.toggle("hand", student.hand_raised);
  row.classList.toggle("stuck", student.stuck);
  row.classList.toggle("struggling", student.struggling && !student.stuck);
  row.dataset.presence = student._presence;
  const who = el("td", "student", el("span", "name", displayName(student)));
  if (student.name) who.append(breakable(el("span", "id"), student.student_id));
  const activity = el("td", "last-seen", agoNode(student.last_seen, now, "seen"));
  row.replaceChildren(
    who,
    el("td", "team", student.team || ""),
    el("td", "notebook", pathNode(student.last_notebook_path)),
    activity,
    el("td", "number executions", student.execution_count),
    el("td", "number errors", student.error_count),
    attentionCell(student),
  );
}

function attentionCell(student) {
  const cell = el("td", "attention");
  if (student.hand_raised) cell.append(el("span", "badge hand", t("students.handRaised")));
  if (student.stuck) {
    const badge = el("span", "badge stuck", t("students.stuck", { count: student.error_streak }));
    badge.title = t("students.stuckTitle");
    cell.append(badge);
  }
  if (student._stalled && !student.stuck) cell.append(stalledBadge(student));
  if (student.struggling) {
    const badge = el("span", "badge struggling", t("students.struggling"));
    badge.title = t("students.strugglingTitle", { errors: recentErrors(student), runs: student.recent_statuses.length });
    cell.append(badge);
  }
  cell.append(el("span", `badge ${student._presence}`, t(`presence.${student._presence}`)));
  return cell;
}

// A symbol and words, not a colour alone: read from across the room, or without colour.
// The badge stays as drawn until the student changes: the time it began is in its title.
function stalledBadge(student) {
  const badge = el("span", "badge stalled", t("status.stalled"));
  const since = formatTime(student._stalled);
  badge.title = t("status.stalled_title", { since, minutes: state.rules.stalled_minutes });
  return badge;
}

function sortBy(key) {
  sort = { key, direction: sort.key === key ? -sort.direction : 1 };
  document.querySelectorAll("#students th[data-sort]").forEach((th) => {
    const order = sort.direction > 0 ? "ascending" : "descending";
    th.setAttribute("aria-sort", th.dataset.sort === key ? order : "none");
  });
  rebuild = true;
  schedule();
}

export function setUpTable() {
  document.querySelectorAll("#students th[data-sort] button").forEach((sorter) => {
    sorter.addEventListener("click", () => sortBy(sorter.parentElement.dataset.sort));
  });
  $("#group-teams").addEventListener("change", (change) => {
    groupTeams = change.target.checked;
    rebuild = true;
    schedule();
  });
  // The heading sticks under the page header, whose height wraps with the width. Set on the
  // heading alone and only when it changes: a property on the root restyled the whole page.
  const heading = $("#students thead");
  new ResizeObserver(([entry]) => {
    const top = `${Math.ceil(entry.borderBoxSize[0].blockSize)}px`;
    if (heading.style.top !== top) heading.style.top = top;
  }).observe($("header"));
}
