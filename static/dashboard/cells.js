// Where the class is stuck: the server's per-cell aggregate, asked for again while runs
// arrive. The server ranks the cells and says which are one-offs (a single student who failed
// once): those fold into one quiet line, so the cells where students are stuck show first.
import { $, button, cellPosition, el, fileName, setHidden } from "./dom.js";
import { fetchJson } from "./api.js";
import { t } from "./i18n.js";
import { openOneCell, refreshOneCell } from "./onecell.js";
import { refresher, state } from "./state.js";

const CELLS_REFRESH_MS = 3000;

let cells = [];
let showOneOffs = false;

const answers = refresher(
  () => fetchJson("api/v1/cells", { course_id: state.filters.course, team: state.filters.team }),
  (answer) => {
    cells = answer.cells;
    drawCells();
    refreshOneCell();
  },
  CELLS_REFRESH_MS,
);
export const refreshCells = answers.refresh;
export const markCellsDirty = answers.markDirty;

const errorLine = (top) => `${top.students} × ${top.error}`;

function drawCells() {
  const failing = cells.filter((cell) => cell.students_failing > 0);
  const stuck = failing.filter((cell) => !cell.one_off);
  const oneOffs = failing.filter((cell) => cell.one_off);
  setHidden($("#stuck-empty"), failing.length > 0);
  const rows = stuck.map((cell) => el("li", "", cellSummary(cell)));
  if (oneOffs.length) rows.push(el("li", "one-offs", oneOffToggle(oneOffs.length)));
  if (oneOffs.length && showOneOffs) rows.push(...oneOffs.map((cell) => el("li", "one-off", cellSummary(cell))));
  $("#stuck-cells").replaceChildren(...rows);
}

function oneOffToggle(count) {
  const toggle = button("one-off-toggle", t("cells.oneOffs", { count }), () => {
    showOneOffs = !showOneOffs;
    drawCells();
  });
  toggle.setAttribute("aria-expanded", String(showOneOffs));
  return toggle;
}

function cellSummary(cell) {
  const name = el("span", "cell-name", el("span", "index", cellPosition(cell.cell_index)), " ",
    el("span", "file", cell.notebook_name || fileName(cell.notebook_path) || t("cells.noNotebook")));
  name.title = cell.notebook_path || "";
  const counts = el("span", "cell-counts",
    el("span", "failing", t("cells.failing", { count: cell.students_failing })),
    cell.students_repeating ? el("span", "repeating", ` · ${t("cells.repeating", { count: cell.students_repeating })}`) : null,
    ` · ${t("cells.ran", { count: cell.students_ran })}`);
  const errors = el("ul", "top-errors", ...cell.top_errors.slice(0, 3).map((top) => {
    const line = el("li", "", errorLine(top));
    line.title = top.error;
    return line;
  }));
  const summary = button("cell-summary", name, () => openOneCell(cell));
  summary.dataset.cell = cell.cell_key;
  summary.append(counts, errors);
  return summary;
}

export function setUpCells() {
  answers.start();
}
