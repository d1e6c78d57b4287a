// Filters: the course narrows everything on the server, the rest narrow on the page. They
// live in the URL, so a bookmark or a reload shows the same view.
import { $, collator, el, eventName, fileName, fold } from "./dom.js";
import { drawExportLinks } from "./export.js";
import { schedule, state } from "./state.js";

// The picked filters, each a <select id="filter-KIND">; an event's field is its URL parameter.
const PICKED = ["course", "team", "notebook", "type"];
const PARAMS = { course: "course_id", team: "team", notebook: "notebook_path", type: "event_type", search: "q" };

const known = { course: new Set(), team: new Set(), notebook: new Set(), type: new Set() };
let optionsChanged = true;
const listeners = [];

// Each panel says what a change of filter makes it redraw.
export function onFilterChange(listener) {
  listeners.push(listener);
}

export function setFilter(kind, value) {
  state.filters[kind] = value;
  saveFiltersInUrl();
  listeners.forEach((listener) => listener(kind));
  schedule();
}

function learn(kind, value) {
  if (value && !known[kind].has(value)) {
    known[kind].add(value);
    optionsChanged = true;
  }
}

export const learnEvent = (event) => PICKED.forEach((kind) => learn(kind, event[PARAMS[kind]]));
export const learnStudent = (student) => learnEvent({
  ...student, notebook_path: student.last_notebook_path, event_type: student.last_event_type,
});

export function forgetCourse(course) {
  if (known.course.delete(course)) optionsChanged = true;
}

// A token scoped to some courses: the picker offers those, and a bookmarked course outside
// them is dropped rather than asked for (the server would answer 403).
export function applyScope(courses) {
  if (!courses) return;
  courses.forEach((course) => learn("course", course));
  if (state.filters.course && !courses.includes(state.filters.course)) {
    state.filters.course = "";
    saveFiltersInUrl();
  }
}

export function drawOptions() {
  if (!optionsChanged) return;
  optionsChanged = false;
  for (const kind of PICKED) {
    const select = $(`#filter-${kind}`);
    const values = [...known[kind], state.filters[kind]].filter(Boolean);
    const wanted = [...new Set(values)].sort(collator.compare);
    if (select.options.length - 1 === wanted.length) continue;
    const options = wanted.map((value) => {
      const label = { notebook: fileName, type: eventName }[kind]?.(value) ?? value;
      const option = el("option", "", label);
      option.value = value;
      option.title = value;
      return option;
    });
    select.replaceChildren(select.options[0], ...options);
    select.value = state.filters[kind];
  }
}

function saveFiltersInUrl() {
  const query = new URLSearchParams();
  for (const [kind, param] of Object.entries(PARAMS)) {
    if (state.filters[kind]) query.set(param, state.filters[kind]);
  }
  const search = query.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
  drawExportLinks(state.filters.course);
}

export function matchesFeedFilters(event) {
  const { notebook, type, team } = state.filters;
  return (!notebook || event.notebook_path === notebook) &&
    (!type || event.event_type === type) && (!team || event.team === team);
}

export function matchesStudentFilters(student) {
  const { team, search } = state.filters;
  if (team && student.team !== team) return false;
  const needle = fold(search);
  return !needle || fold(student.name || student.student_id).includes(needle) ||
    fold(student.student_id).includes(needle);
}

export function setUpFilters() {
  const query = new URLSearchParams(location.search);
  for (const [kind, param] of Object.entries(PARAMS)) state.filters[kind] = query.get(param) || "";
  for (const kind of PICKED) {
    const select = $(`#filter-${kind}`);
    select.addEventListener("change", () => setFilter(kind, select.value));
  }
  const search = $("#search");
  search.value = state.filters.search;
  search.addEventListener("input", () => setFilter("search", search.value.trim()));
  $("#filters").addEventListener("submit", (submit) => submit.preventDefault());
  saveFiltersInUrl();
}
