// Classroom telemetry dashboard: state from the read API, then live events from the SSE
// stream (EventSource resumes by itself with Last-Event-ID after a reconnect).
//
// Decisions a reader must not undo:
// - Every student-provided value reaches the DOM through textContent (el() below), never
//   innerHTML: names, code and tracebacks are whatever a student's browser posted.
// - DOM work happens once per animation frame, for whatever arrived meanwhile, and the
//   feed keeps at most FEED_LIMIT rows: 300 students at 50 events/s stay responsive.
// - An event counts for a student only if its id is above the student's last_event_id
//   from the read API, so the replay that follows the initial load never counts twice.
"use strict";

(() => {
  const FEED_LIMIT = 200;
  const BUFFER_LIMIT = 2000; // recent events kept in memory, to re-filter the feed
  const HISTORY_LIMIT = 500;
  const STUDENT_PAGE_LIMIT = 1000;
  const STUCK_ERROR_STREAK = 3; // as STUCK_ERROR_STREAK in telemetry.py
  const RETRY_MS = 2000;
  const ANSI_ESCAPES = /\u001b\[[0-9;]*[A-Za-z]/g; // IPython colours its tracebacks

  const state = {
    filters: { course: "", notebook: "", type: "" },
    students: new Map(), // student_id -> student record (as the read API sends, kept current)
    recent: [], // events, oldest first, at most BUFFER_LIMIT
    lastId: 0, // highest event id applied
    pending: [], // events not yet drawn in the feed
    dirty: new Set(), // student ids whose row needs redrawing
    rebuildFeed: false,
    frame: 0,
    source: null,
    generation: 0, // bumped by each (re)load so that stale callbacks do nothing
    known: { course: new Set(), notebook: new Set(), type: new Set() },
    rows: new Map(), // student_id -> <tr>
    order: [],
  };

  const $ = (selector) => document.querySelector(selector);
  const collator = new Intl.Collator(undefined, { sensitivity: "base", numeric: true });

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function formatTime(iso) {
    const moment = new Date(iso);
    if (Number.isNaN(moment.getTime())) return String(iso || "");
    return moment.toLocaleTimeString([], { hour12: false });
  }

  function statusClass(status) {
    return status === "ok" || status === "error" ? status : "none";
  }

  function setConnection(name) {
    const indicator = $("#connection");
    indicator.dataset.state = name;
    indicator.textContent = name;
  }

  class Unauthorized extends Error {}

  async function fetchJson(path, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) if (value) query.set(key, value);
    const response = await fetch(`${path}?${query}`, { headers: { Accept: "application/json" } });
    if (response.status === 401) throw new Unauthorized(path);
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    return response.json();
  }

  // The token becomes an HttpOnly cookie, which fetch and EventSource then send by
  // themselves; it never goes into a URL, so never into a server log.
  async function signIn(token) {
    const response = await fetch("/api/v1/session", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
    });
    return response.ok;
  }

  function askForToken(problem) {
    setConnection("signed out");
    $("#sign-in").hidden = false;
    $("#sign-in-problem").textContent = problem;
    $("#token").focus();
  }

  async function onSignIn(submit) {
    submit.preventDefault();
    const input = $("#token");
    if (await signIn(input.value)) {
      input.value = "";
      $("#sign-in").hidden = true;
      load();
    } else {
      askForToken("That token was refused.");
    }
  }

  // A link of the form /#token=... signs in once; the fragment never reaches the server.
  async function signInFromFragment() {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    if (!token) return;
    history.replaceState(null, "", location.pathname + location.search);
    await signIn(token);
  }

  async function fetchStudents(course) {
    const students = [];
    let after = "";
    do {
      const page = await fetchJson("/api/v1/students", {
        course_id: course,
        after,
        limit: STUDENT_PAGE_LIMIT,
      });
      students.push(...page.students);
      after = page.next_after;
    } while (after);
    return students;
  }

  // Events first, students second: a student who appears in between is in the second
  // answer, and the stream replays every event after latest_id.
  async function load() {
    const generation = ++state.generation;
    if (state.source) state.source.close();
    setConnection(state.lastId ? "reconnecting" : "connecting");
    try {
      const course = state.filters.course;
      const history = await fetchJson("/api/v1/events", { course_id: course, limit: HISTORY_LIMIT });
      const students = await fetchStudents(course);
      if (generation !== state.generation) return;
      reset(history, students);
      connect(generation);
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof Unauthorized) return askForToken("");
      setConnection("reconnecting");
      setTimeout(() => generation === state.generation && load(), RETRY_MS);
    }
  }

  function reset(history, students) {
    state.students = new Map(students.map((student) => [student.student_id, student]));
    state.recent = history.events.slice().reverse();
    state.lastId = history.latest_id;
    state.pending = [];
    state.rows.forEach((row) => row.remove());
    state.rows.clear();
    state.order = [];
    state.students.forEach((student) => {
      state.dirty.add(student.student_id);
      learn("course", student.course_id);
      learn("notebook", student.last_notebook_path);
      learn("type", student.last_event_type);
    });
    state.recent.forEach(learnEvent);
    state.rebuildFeed = true;
    schedule();
  }

  function connect(generation) {
    const query = new URLSearchParams({ last_event_id: String(state.lastId) });
    if (state.filters.course) query.set("course_id", state.filters.course);
    const source = new EventSource(`/api/v1/stream?${query}`);
    state.source = source;
    source.onopen = () => setConnection("live");
    source.onmessage = (message) => receive(JSON.parse(message.data));
    source.addEventListener("resync", () => load()); // too far behind: reload the state
    source.onerror = () => {
      setConnection("reconnecting");
      // EventSource retries network errors by itself; it gives up only on a bad answer.
      if (source.readyState === EventSource.CLOSED && generation === state.generation) {
        setTimeout(() => generation === state.generation && connect(generation), RETRY_MS);
      }
    };
  }

  function receive(event) {
    if (event.id <= state.lastId) return;
    state.lastId = event.id;
    applyToStudent(event);
    learnEvent(event);
    state.recent.push(event);
    if (state.recent.length > BUFFER_LIMIT) state.recent.splice(0, state.recent.length - BUFFER_LIMIT);
    state.pending.push(event);
    // A hidden tab gets no animation frames: keep only what the feed could show.
    if (state.pending.length > FEED_LIMIT) state.pending.splice(0, state.pending.length - FEED_LIMIT);
    schedule();
  }

  function newStudent(event) {
    return {
      student_id: event.student_id, name: null, course_id: null, team: null,
      first_seen: event.received_at, last_seen: event.received_at,
      event_count: 0, execution_count: 0, error_count: 0, last_event_id: 0,
      last_event_type: null, last_notebook_path: null, hand_raised: false,
      error_streak: 0, streak_cell_id: null, stuck: false,
    };
  }

  function applyToStudent(event) {
    let student = state.students.get(event.student_id);
    if (!student) {
      student = newStudent(event);
      state.students.set(event.student_id, student);
    }
    if (event.id <= student.last_event_id) return;
    student.last_event_id = event.id;
    student.name = event.student_name ?? student.name;
    student.team = event.team ?? student.team;
    student.course_id = event.course_id ?? student.course_id;
    student.last_seen = event.received_at;
    student.last_event_type = event.event_type;
    student.last_notebook_path = event.notebook_path ?? student.last_notebook_path;
    student.event_count += 1;
    if (event.status) countExecution(student, event);
    if (event.event_type === "help") student.hand_raised = true;
    if (event.event_type === "help_stop") student.hand_raised = false;
    state.dirty.add(student.student_id);
  }

  // The same rule as error_streak in telemetry.py.
  function countExecution(student, event) {
    student.execution_count += 1;
    if (event.status === "error") {
      student.error_count += 1;
      const same = student.error_streak > 0 && event.cell_id === student.streak_cell_id;
      student.error_streak = same ? student.error_streak + 1 : 1;
      student.streak_cell_id = event.cell_id;
    } else if (student.error_streak > 0 && event.cell_id === student.streak_cell_id) {
      student.error_streak = 0;
      student.streak_cell_id = null;
    }
    student.stuck = student.error_streak >= STUCK_ERROR_STREAK;
  }

  function learnEvent(event) {
    learn("course", event.course_id);
    learn("notebook", event.notebook_path);
    learn("type", event.event_type);
  }

  function learn(kind, value) {
    if (value && !state.known[kind].has(value)) {
      state.known[kind].add(value);
      state.optionsChanged = true;
    }
  }

  function schedule() {
    if (!state.frame) state.frame = requestAnimationFrame(draw);
  }

  function draw() {
    state.frame = 0;
    if (state.optionsChanged) drawOptions();
    drawFeed();
    drawStudents();
  }

  // Feed

  function matchesFeedFilters(event) {
    const { notebook, type } = state.filters;
    return (!notebook || event.notebook_path === notebook) && (!type || event.event_type === type);
  }

  function drawFeed() {
    const feed = $("#feed");
    let events = state.pending;
    if (state.rebuildFeed) {
      feed.replaceChildren();
      events = state.recent;
      state.rebuildFeed = false;
    }
    state.pending = [];
    const shown = events.filter(matchesFeedFilters).slice(-FEED_LIMIT);
    if (!shown.length) return;
    const fragment = document.createDocumentFragment();
    for (let index = shown.length - 1; index >= 0; index -= 1) {
      fragment.appendChild(feedItem(shown[index]));
    }
    feed.prepend(fragment);
    while (feed.childElementCount > FEED_LIMIT) feed.lastElementChild.remove();
  }

  function cellLabel(event) {
    if (event.cell_index !== null && event.cell_index !== undefined) return `[${event.cell_index}]`;
    return event.cell_id ? String(event.cell_id).slice(0, 8) : "";
  }

  function feedItem(event) {
    const item = el("details", `event status-${statusClass(event.status)}`);
    item.dataset.eventId = String(event.id);
    item.dataset.studentId = String(event.student_id);
    const summary = el("summary");
    summary.append(
      el("time", "time", formatTime(event.occurred_at)),
      el("span", "student", event.student_name || event.student_id),
      el("span", "notebook", event.notebook_path || ""),
      el("span", "cell", cellLabel(event)),
      el("span", "type", event.event_type),
      el("span", "status", event.status || ""),
    );
    item.append(summary);
    // Code and tracebacks can be large: build them only when the event is opened.
    item.addEventListener("toggle", () => item.open && fillDetails(item, event), { once: true });
    return item;
  }

  function errorText(error) {
    if (!error) return "";
    const head = [error.ename, error.evalue].filter((part) => part).join(": ");
    const traceback = (error.traceback || []).join("\n").replace(ANSI_ESCAPES, "");
    return [head, traceback].filter((part) => part).join("\n\n");
  }

  function fillDetails(item, event) {
    const body = el("div", "details");
    const meta = [`event ${event.id}`, `student ${event.student_id}`];
    if (event.cell_id) meta.push(`cell ${event.cell_id}`);
    if (event.duration_ms !== null && event.duration_ms !== undefined) {
      meta.push(`${Math.round(event.duration_ms)} ms`);
    }
    body.append(el("p", "meta", meta.join(" · ")));
    body.append(el("h3", "", "Code"), el("pre", "code", event.source ?? "(no code)"));
    const error = errorText(event.error);
    if (error) body.append(el("h3", "", "Error"), el("pre", "error", error));
    item.append(body);
  }

  // Students

  function attentionRank(student) {
    if (student.hand_raised) return 0;
    return student.stuck ? 1 : 2;
  }

  function compareStudents(a, b) {
    const first = attentionRank(a) - attentionRank(b);
    if (first) return first;
    const nameA = a.name || a.student_id;
    const nameB = b.name || b.student_id;
    return collator.compare(nameA, nameB) || collator.compare(a.student_id, b.student_id);
  }

  function drawStudents() {
    if (!state.dirty.size) return;
    for (const id of state.dirty) {
      const student = state.students.get(id);
      if (student) drawStudent(student);
    }
    state.dirty.clear();
    const order = [...state.students.values()].sort(compareStudents).map((s) => s.student_id);
    if (order.join("\u0000") !== state.order.join("\u0000")) {
      const fragment = document.createDocumentFragment();
      for (const id of order) fragment.appendChild(state.rows.get(id));
      $("#students tbody").appendChild(fragment);
      state.order = order;
    }
    drawSummary();
  }

  function drawStudent(student) {
    let row = state.rows.get(student.student_id);
    if (!row) {
      row = el("tr");
      row.dataset.studentId = student.student_id;
      state.rows.set(student.student_id, row);
    }
    row.classList.toggle("hand", student.hand_raised);
    row.classList.toggle("stuck", student.stuck);
    const who = el("td", "student");
    who.append(el("span", "name", student.name || student.student_id));
    if (student.name) who.append(el("span", "id", student.student_id));
    const activity = el("td", "last-seen", formatTime(student.last_seen));
    activity.title = student.last_seen || "";
    const notebook = el("td", "notebook", student.last_notebook_path || "");
    notebook.title = student.last_notebook_path || "";
    row.replaceChildren(
      who,
      el("td", "course", student.course_id || ""),
      notebook,
      el("td", "last-type", student.last_event_type || ""),
      activity,
      el("td", "number executions", student.execution_count),
      el("td", "number errors", student.error_count),
      attentionCell(student),
    );
  }

  function attentionCell(student) {
    const cell = el("td", "attention");
    if (student.hand_raised) cell.append(el("span", "badge hand", "hand raised"));
    if (student.stuck) {
      const badge = el("span", "badge stuck", `stuck: ${student.error_streak} errors`);
      badge.title = `cell ${student.streak_cell_id || "?"}`;
      cell.append(badge);
    }
    return cell;
  }

  function drawSummary() {
    let hands = 0;
    let stuck = 0;
    state.students.forEach((student) => {
      hands += student.hand_raised ? 1 : 0;
      stuck += student.stuck ? 1 : 0;
    });
    const students = state.students.size;
    $("#student-summary").textContent =
      `${students} ${students === 1 ? "student" : "students"} · ${hands} raised a hand · ${stuck} stuck`;
  }

  // Filters: the course narrows everything on the server; notebook and type narrow the feed.

  const FILTER_SELECTS = { course: "#filter-course", notebook: "#filter-notebook", type: "#filter-type" };
  const FILTER_PARAMS = { course: "course_id", notebook: "notebook_path", type: "event_type" };

  function drawOptions() {
    state.optionsChanged = false;
    for (const [kind, selector] of Object.entries(FILTER_SELECTS)) {
      const select = $(selector);
      const values = [...state.known[kind]];
      if (state.filters[kind]) values.push(state.filters[kind]);
      const wanted = [...new Set(values)].sort();
      if (select.options.length - 1 === wanted.length) continue;
      const options = wanted.map((value) => {
        const option = el("option", "", value);
        option.value = value;
        return option;
      });
      select.replaceChildren(select.options[0], ...options);
      select.value = state.filters[kind];
    }
  }

  function saveFiltersInUrl() {
    const query = new URLSearchParams();
    for (const [kind, param] of Object.entries(FILTER_PARAMS)) {
      if (state.filters[kind]) query.set(param, state.filters[kind]);
    }
    const search = query.toString();
    history.replaceState(null, "", search ? `?${search}` : location.pathname);
  }

  function onFilterChange(kind, value) {
    state.filters[kind] = value;
    saveFiltersInUrl();
    if (kind === "course") {
      load();
    } else {
      state.rebuildFeed = true;
      schedule();
    }
  }

  async function start() {
    $("#sign-in").addEventListener("submit", onSignIn);
    await signInFromFragment();
    const query = new URLSearchParams(location.search);
    for (const [kind, param] of Object.entries(FILTER_PARAMS)) {
      state.filters[kind] = query.get(param) || "";
      const select = $(FILTER_SELECTS[kind]);
      select.addEventListener("change", () => onFilterChange(kind, select.value));
    }
    state.optionsChanged = true;
    load();
  }

  start();
})();
