// Progress through a notebook: students × cells, each square the student's latest status on
// that cell, from the server's run summaries (/api/v1/progress), asked for again while runs
// arrive. A student is past cell k when they ran k or any later cell (the server counts it).
import { $, arrange, button, cellPosition, collator, el, fileName, setHidden, setText } from "./dom.js";
import { fetchJson } from "./api.js";
import { t, translatePage } from "./i18n.js";
import { openOneCell } from "./onecell.js";
import { refresher, state } from "./state.js";
import { openStudent } from "./story.js";

const PROGRESS_REFRESH_MS = 3000;
// Colour and a mark: a square reads without colour too, and from across a room.
const SQUARES = { ok: "✓", error: "✗", none: "·" };

let grid = null; // the last /api/v1/progress answer
// The table on screen: its notebook and columns, and per student their row and squares. A
// refresh changes only the squares whose status changed: a class is thousands of squares.
let drawn = { columns: "", rows: new Map(), heads: [], spacers: {} };
// Only the rows in view, and a few either side, are in the table; spacer rows stand for the
// rest. Laying out every row of a class on each refresh made frames too long to scroll by.
const ROWS_BEYOND_VIEW = 8;
let ordered = []; // the students in the order chosen, drawn or not
let rowPitch = 0; // a row's height with its spacing, measured once rows are drawn
// The grid's scroll position, its height and its heading's, kept current by its scroll
// events and a ResizeObserver: read on a refresh, they would lay out whatever else the page
// changed since the last frame.
const view = { scrollTop: 0, height: 450, head: 0 };
const sizes = new ResizeObserver((entries) => {
  for (const entry of entries) view[entry.target.tagName === "THEAD" ? "head" : "height"] = entry.contentRect.height;
  drawRowsInView(); // before this frame paints, so that a taller grid shows no gap
});
let chosen = ""; // the notebook the instructor picked; "" lets the server pick

const answers = refresher(
  () => fetchJson("api/v1/progress", {
    course_id: state.filters.course, team: state.filters.team, notebook_path: chosen,
  }),
  (answer) => {
    grid = answer;
    drawProgress();
  },
  PROGRESS_REFRESH_MS,
);
export const refreshProgress = answers.refresh;
export const markProgressDirty = answers.markDirty;

function drawProgress() {
  drawNotebooks();
  const empty = grid.students.length === 0;
  setHidden($("#progress-empty"), !empty);
  setText($("#progress-headline"), empty ? "" : headline());
  const columns = [grid.notebook_path, ...grid.cells.map((cell) => cell.cell_key)].join("\u0000");
  if (empty || columns !== drawn.columns) {
    drawn = { columns, rows: new Map(), heads: [], spacers: {} };
    const box = $("#progress-grid");
    box.replaceChildren(...(empty ? [] : [table()]));
    sizes.disconnect();
    sizes.observe(box);
    if (!empty) sizes.observe(box.querySelector("thead"));
  } else {
    updateHeads();
  }
  ordered = empty ? [] : sortedStudents();
  drawRowsInView();
}

// Measuring a row forces a layout of whatever changed on the page: it is done at the first
// draw and while scrolling, never on a refresh.
function drawRowsInView({ measure = false } = {}) {
  const body = $("#progress-grid tbody");
  if (!body) return;
  const pitch = rowPitch || 30; // a guess until rows are drawn
  const scrolledPast = Math.max(0, view.scrollTop - view.head); // the rows above the view
  const first = Math.max(0, Math.floor(scrolledPast / pitch) - ROWS_BEYOND_VIEW);
  const last = Math.min(ordered.length, first + Math.ceil(view.height / pitch) + 2 * ROWS_BEYOND_VIEW);
  const rows = ordered.slice(first, last).map(studentRow);
  arrange(body, [spacer("before", first * pitch), ...rows, spacer("after", (ordered.length - last) * pitch)]);
  if ((measure || !rowPitch) && rows.length > 1) {
    const top = (row) => row.getBoundingClientRect().top;
    const measured = (top(rows.at(-1)) - top(rows[0])) / (rows.length - 1);
    // Rows are as tall as the font and the language make them: the spacers follow.
    if (measured > 0 && Math.abs(measured - rowPitch) > 0.1) {
      rowPitch = measured;
      drawRowsInView();
    }
  }
}

// A row as tall as the rows it stands for; none when it stands for none.
function spacer(where, height) {
  const row = (drawn.spacers[where] ??= el("tr", "spacer", el("td")));
  setHidden(row, height <= 0);
  const rowHeight = `${Math.max(0, height - 2)}px`; // the table's border-spacing adds 2 px
  if (row.style.height !== rowHeight) row.style.height = rowHeight;
  return row;
}

function drawNotebooks() {
  const options = grid.notebooks.map((notebook) => {
    const option = el("option", "", t("progress.notebookOption", {
      name: notebook.notebook_name || fileName(notebook.notebook_path), count: notebook.students_here,
    }));
    option.value = notebook.notebook_path;
    option.title = notebook.notebook_path;
    return option;
  });
  const select = $("#progress-notebook");
  select.replaceChildren(...options);
  select.value = grid.notebook_path ?? "";
  select.disabled = options.length === 0;
}

// The furthest cell at least half the students are past: where the class is.
function headline() {
  const half = Math.ceil(grid.students.length / 2);
  const cell = grid.cells.findLast((candidate) => candidate.students_past >= half) ?? grid.cells[0];
  return pastLine(cell);
}

const pastLine = (cell) => t("progress.past", {
  count: cell.students_past, total: grid.students.length, cell: cellPosition(cell.cell_index),
});

function table() {
  const thead = el("thead", "", el("tr", "", ...headCells()));
  return el("table", "progress", thead, el("tbody"));
}

function headCells() {
  const corner = el("th", "corner", t("progress.student"));
  const heads = grid.cells.map((cell, index) => {
    const head = button("column", cellPosition(cell.cell_index), () =>
      openOneCell({ ...grid.cells[index], notebook_path: grid.notebook_path }));
    head.dataset.cell = cell.cell_key;
    const th = el("th", "", head);
    th.scope = "col";
    return th;
  });
  drawn.heads = heads;
  updateHeads();
  return [corner, ...heads, el("th", "where", t("progress.furthest"))];
}

// The columns stay: a refresh changes their counts, never the table's shape.
function updateHeads() {
  grid.cells.forEach((cell, index) => {
    const th = drawn.heads[index];
    th.classList.toggle("has-errors", cell.students_failing > 0);
    th.firstChild.title = `${pastLine(cell)} · ${t("progress.failing", { count: cell.students_failing })}`;
  });
}

function sortedStudents() {
  const byName = (a, b) => collator.compare(a.name || a.student_id, b.name || b.student_id);
  const order = $("#progress-sort").value;
  const students = [...grid.students];
  if (order === "name") return students.sort(byName);
  const sign = order === "ahead" ? -1 : 1;
  return students.sort((a, b) => sign * (a.furthest - b.furthest) || byName(a, b));
}

function studentRow(student) {
  let drawnRow = drawn.rows.get(student.student_id);
  if (!drawnRow) {
    drawnRow = newRow(student);
    drawn.rows.set(student.student_id, drawnRow);
  }
  student.statuses.forEach((status, index) => {
    const kind = status ?? "none";
    const square = drawnRow.squares[index];
    if (square.dataset.kind === kind) return;
    square.dataset.kind = kind;
    square.className = `square ${kind}`;
    square.textContent = SQUARES[kind];
    square.title = `${student.name || student.student_id} · ${cellPosition(grid.cells[index].cell_index)}: ${t(`progress.${kind}`)}`;
  });
  const furthest = grid.cells[student.furthest];
  const where = furthest ? t("progress.pastCell", { cell: cellPosition(furthest.cell_index) }) : "";
  setText(drawnRow.where, where);
  return drawnRow.row;
}

function newRow(student) {
  const name = button("pick", student.name || student.student_id, () => openStudent(student.student_id));
  name.title = student.student_id;
  const th = el("th", "", name);
  th.scope = "row";
  const squares = grid.cells.map(() => el("td", "square"));
  const where = el("td", "where");
  const row = el("tr", "", th, ...squares, where);
  row.dataset.studentId = student.student_id;
  return { row, squares, where };
}

export function setUpProgress() {
  translatePage($("#progress-section"));
  $("#progress-notebook").addEventListener("change", (change) => {
    chosen = change.target.value;
    refreshProgress();
  });
  $("#progress-sort").addEventListener("change", () => grid && drawProgress());
  let scrolling = 0;
  $("#progress-grid").addEventListener("scroll", () => {
    scrolling ||= requestAnimationFrame(() => {
      scrolling = 0;
      view.scrollTop = $("#progress-grid").scrollTop;
      drawRowsInView({ measure: true });
    });
  }, { passive: true });
  answers.start();
}
