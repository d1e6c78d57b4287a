// One cell, every student: each one's latest code and error on the cell, grouped by error
// (most students first, passing runs last), opened from a stuck cell or a progress column.
// Student code is untrusted: it reaches the page as text only (el makes text nodes).
import { $, addFact, button, el } from "./dom.js";
import { fetchJson } from "./api.js";
import { ago, t } from "./i18n.js";
import { state } from "./state.js";
import { closePanels, openStudent } from "./story.js";

let cell = null; // the answer of /api/v1/cells/detail for the open panel
let loading = false;

const isOpen = () => state.panel?.kind === "cell";

// cell: {notebook_path, cell_key} (a stuck cell or a progress column).
export function openOneCell(which) {
  closePanels();
  state.panel = { kind: "cell", id: `${which.notebook_path ?? ""}\u0000${which.cell_key}`, which };
  cell = null;
  $("#cell-panel").hidden = false;
  $("#cell-title").textContent = which.label || "";
  $("#cell-facts").replaceChildren(el("p", "hint", t("onecell.loading")));
  $("#cell-students").replaceChildren();
  refreshOneCell();
  $("#cell-panel .close").focus();
}

// Asked again with the stuck cells while runs arrive, and when the team changes.
export async function refreshOneCell() {
  if (!isOpen() || loading) return;
  loading = true;
  const panel = state.panel;
  try {
    const answer = await fetchJson("api/v1/cells/detail", {
      course_id: state.filters.course, team: state.filters.team,
      notebook_path: panel.which.notebook_path ?? "", cell_key: panel.which.cell_key,
    });
    if (panel !== state.panel) return;
    cell = answer;
    drawOneCell();
  } catch {
    if (panel === state.panel) $("#cell-facts").replaceChildren(el("p", "hint", t("onecell.failed")));
  } finally {
    loading = false;
  }
}

function drawOneCell() {
  $("#cell-title").textContent = cell.label;
  const facts = el("dl", "facts");
  addFact(facts, t("onecell.notebook"), cell.notebook_path || t("cells.noNotebook"));
  addFact(facts, t("onecell.ran"), t("onecell.students", { count: cell.students_ran }));
  addFact(facts, t("onecell.failing"), t("onecell.students", { count: cell.students_failing }));
  const empty = cell.groups.length ? null : el("p", "hint", t("onecell.empty"));
  $("#cell-facts").replaceChildren(facts, ...(empty ? [empty] : []));
  $("#cell-students").replaceChildren(...cell.groups.map(groupItem));
}

function groupItem(group) {
  const title = group.status === "error" ? group.error : t("onecell.passed");
  const head = el("h3", "group-head", el("span", "group-count", String(group.count)), " ",
    el("span", "group-error", title));
  head.title = title;
  const students = el("ul", "group-students", ...group.students.map(studentItem));
  const item = el("li", `group ${group.status === "error" ? "error" : "ok"}`, head, students);
  item.dataset.count = String(group.count);
  return item;
}

function studentItem(student) {
  const pick = button("pick", el("strong", "", student.name || student.student_id),
    () => openStudent(student.student_id));
  pick.dataset.studentId = student.student_id;
  if (student.name) pick.append(" ", el("span", "hint", student.student_id));
  if (student.team) pick.append(" · ", el("span", "", student.team));
  const when = student.ran_at ? ` · ${ago(student.ran_at)}` : "";
  const counts = el("span", "hint", ` ${t("onecell.runs", { count: student.runs, errors: student.errors })}${when}`);
  const code = el("pre", "code", student.source ?? t("onecell.noCode"));
  return el("li", "", pick, counts, code);
}
