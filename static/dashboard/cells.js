// Where the class is stuck: the server's per-cell aggregate, asked for again while runs
// arrive, and a panel naming the students failing on one cell.
import { $, addFact, button, cellPosition, el, fileName } from "./dom.js";
import { fetchJson } from "./api.js";
import { t } from "./i18n.js";
import { state } from "./state.js";
import { closePanels, openStudent } from "./story.js";

const CELLS_REFRESH_MS = 3000;

let cells = [];
let dirty = false;
let loading = false;

export function markCellsDirty() {
  dirty = true;
}

export async function refreshCells() {
  if (loading) return;
  loading = true;
  dirty = false;
  const generation = state.generation;
  try {
    const answer = await fetchJson("/api/v1/cells", { course_id: state.filters.course });
    if (generation !== state.generation) return;
    cells = answer.cells;
    drawCells();
    if (state.panel?.kind === "cell") drawCellPanel();
  } catch {
    dirty = true; // try again on the next refresh
  } finally {
    loading = false;
  }
}

const cellKey = (cell) => `${cell.notebook_path ?? ""}\u0000${cell.cell_id ?? cell.cell_index ?? ""}`;
const errorLine = (top) => `${top.students} × ${top.error}`;

function drawCells() {
  const failing = cells.filter((cell) => cell.students_failing > 0);
  $("#stuck-empty").hidden = failing.length > 0;
  $("#stuck-cells").replaceChildren(...failing.map((cell) => el("li", "", cellSummary(cell))));
}

function cellSummary(cell) {
  const name = el("span", "cell-name", el("span", "index", cellPosition(cell.cell_index)), " ",
    el("span", "file", cell.notebook_name || fileName(cell.notebook_path) || t("stuck.noNotebook")));
  name.title = cell.notebook_path || "";
  const counts = el("span", "cell-counts",
    el("span", "failing", t("stuck.failing", { count: cell.students_failing })),
    t("stuck.ran", { count: cell.students_ran }));
  const errors = el("ul", "top-errors", ...cell.top_errors.slice(0, 3).map((top) => {
    const line = el("li", "", errorLine(top));
    line.title = top.error;
    return line;
  }));
  const summary = button("cell-summary", name, () => openCell(cellKey(cell)));
  summary.dataset.cell = cellKey(cell);
  summary.append(counts, errors);
  return summary;
}

function openCell(key) {
  closePanels();
  state.panel = { kind: "cell", id: key };
  $("#cell-panel").hidden = false;
  drawCellPanel();
  $("#cell-panel .close").focus();
}

function drawCellPanel() {
  const cell = cells.find((candidate) => cellKey(candidate) === state.panel.id);
  if (!cell) return;
  $("#cell-title").textContent = cell.label;
  const facts = el("dl", "facts");
  addFact(facts, t("stuck.notebook"), cell.notebook_path || t("stuck.noNotebook"));
  addFact(facts, t("stuck.ranIt"), t("stuck.ranCounts", { students: cell.students_ran, runs: cell.runs, errors: cell.errors }));
  addFact(facts, t("stuck.failingNow"), t("stuck.students", { count: cell.students_failing }));
  const errors = el("ul", "top-errors", ...cell.top_errors.map((top) => el("li", "", errorLine(top))));
  $("#cell-facts").replaceChildren(facts, el("h3", "", t("stuck.commonErrors")), errors,
    el("h3", "", t("stuck.failingHere")));
  $("#cell-students").replaceChildren(...cell.failing_student_ids.map((id) => el("li", "", pickStudent(id))));
}

function pickStudent(id) {
  const student = state.students.get(id);
  const pick = button("", el("strong", "", student?.name || id), () => openStudent(id));
  pick.dataset.studentId = id;
  if (student?.name) pick.append(" ", el("span", "hint", id));
  if (student?.team) pick.append(" · ", el("span", "", student.team));
  if (student?.stuck) pick.append(" ", el("span", "badge stuck", t("students.stuckShort")));
  if (student?.hand_raised) pick.append(" ", el("span", "badge hand", t("students.handRaised")));
  return pick;
}

export function setUpCells() {
  setInterval(() => dirty && refreshCells(), CELLS_REFRESH_MS);
}
