// Classroom telemetry dashboard: state from the read API, then live events from the SSE
// stream (EventSource resumes by itself with Last-Event-ID after a reconnect).
//
// Decisions a reader must not undo:
// - Every student-provided value reaches the DOM through textContent (el() below), never
//   innerHTML: names, code and tracebacks are whatever a student's browser posted.
// - DOM work happens in one animation frame at most every DRAW_INTERVAL_MS, for whatever
//   arrived meanwhile, and the feed keeps at most FEED_LIMIT rows: 300 students at
//   50 events/s stay responsive.
// - An event counts for a student only if its id is above the student's last_event_id
//   from the read API, so the replay that follows the initial load never counts twice.
// - Times are the server's: every answer carries its clock ("now"), and waits, presence
//   and hand expiry are computed on it, so a wrong clock in the instructor's laptop
//   does not make a hand look 5 minutes old.
"use strict";

(() => {
  // The same numbers as the server's rules (README, "Running a class").
  const ACTIVE_MS = 120_000;
  const IDLE_MS = 600_000;
  const HAND_BEAT_TIMEOUT_MS = 30_000;
  const STUCK_ERROR_STREAK = 3;
  const RECENT_EXECUTIONS = 20;
  const STRUGGLING_ERRORS = 6;

  const FEED_LIMIT = 200;
  // A whole class drawn in one frame is a 300 ms task: the first draw is spread over frames.
  const ROWS_PER_FRAME = 25;
  const DRAW_INTERVAL_MS = 100;
  const BUFFER_LIMIT = 2000; // recent events kept in memory, to re-filter the feed
  const HELD_LIMIT = 2000; // events held back while the feed is paused
  const HISTORY_LIMIT = 200;
  const PAGE_LIMIT = 100;
  const TIMELINE_LIMIT = 50;
  const STUDENT_PAGE_LIMIT = 1000;
  const ACTIVITY_MINUTES = 60;
  const RETRY_MS = 2000;
  const HELP_REFRESH_MS = 400;
  const CELLS_REFRESH_MS = 3000;
  const CHART_REDRAW_MS = 2000;
  const TICK_MS = 1000;
  const PRESENCE_EVERY_TICKS = 5;
  const OUTPUT_CHARS = 4000;
  // IPython colours its tracebacks; some clients lose the ESC and leave "[0;31m" behind.
  const ANSI_ESCAPES = /\u001b\[[0-9;]*[A-Za-z]|\[[0-9;]*m/g;
  const HAND_EVENTS = new Set(["help", "help_stop", "help_on_my_way", "help_dismissed"]);

  const state = {
    filters: { course: "", team: "", notebook: "", type: "", search: "" },
    sort: { key: "attention", direction: 1 },
    groupTeams: false,
    students: new Map(), // student_id -> student record (as the read API sends, kept current)
    hands: new Map(), // student_id -> {state, raised_at, last_beat_at}: raises still beating
    recent: [], // events, oldest first, at most BUFFER_LIMIT
    lastId: 0, // highest event id applied
    pending: [], // events not yet drawn in the feed
    held: [], // events that arrived while the feed was paused
    feedPaused: false,
    feedExtra: 0, // older rows loaded on demand, kept beyond FEED_LIMIT
    dirty: new Set(), // student ids whose row needs redrawing
    rebuildFeed: false,
    rebuildTable: false,
    frame: 0, // the pending animation frame or timer, 0 when none
    drawnAt: -Infinity,
    source: null,
    generation: 0, // bumped by each (re)load so that stale callbacks do nothing
    known: { course: new Set(), team: new Set(), notebook: new Set(), type: new Set() },
    optionsChanged: false,
    rows: new Map(), // student_id -> <tr>
    order: "",
    clock: { server: Date.now(), local: performance.now() },
    lastUpdate: null, // local Date of the latest sign of life from the stream
    live: false,
    cells: [],
    cellsDirty: false,
    cellsLoading: false,
    activity: [], // [{minute (ms), executions, errors, help}], oldest first
    chartDirty: false,
    chartDrawnAt: -Infinity,
    chartWidth: 600,
    backfill: [], // older feed events still to append, newest first, a frame's worth at a time
    queueKey: "",
    queueItems: new Map(), // student_id -> the parts of their queue item
    teamsKey: "",
    ticks: 0,
    helpTimer: 0,
    panel: null, // {kind: "student"|"cell", id, ...}
    focusedHand: null,
    loaded: false,
  };

  const $ = (selector) => document.querySelector(selector);
  const collator = new Intl.Collator(undefined, { sensitivity: "base", numeric: true });

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Clock

  function syncClock(answer) {
    const server = Date.parse(answer && answer.now);
    if (!Number.isNaN(server)) state.clock = { server, local: performance.now() };
  }

  function serverNow() {
    return state.clock.server + (performance.now() - state.clock.local);
  }

  function millis(iso) {
    const value = Date.parse(iso);
    return Number.isNaN(value) ? null : value;
  }

  // One formatter for the page: toLocaleTimeString builds a new one per call (about 1 ms).
  const timeFormat = new Intl.DateTimeFormat([], {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });

  function formatTime(iso) {
    const moment = new Date(iso);
    if (Number.isNaN(moment.getTime())) return String(iso || "");
    return timeFormat.format(moment);
  }

  function plural(count, noun) {
    return `${count} ${noun}${count === 1 ? "" : "s"}`;
  }

  function formatWait(ms) {
    const seconds = Math.max(0, Math.floor(ms / 1000));
    const minutes = Math.floor(seconds / 60);
    if (minutes >= 60) return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
    return `${minutes}:${String(seconds % 60).padStart(2, "0")}`;
  }

  // Text helpers

  function fileName(path) {
    if (!path) return "";
    const parts = String(path).split("/");
    return parts[parts.length - 1] || String(path);
  }

  // The file name stays whole; only the folders before it may be cut.
  function pathNode(path, tag = "span") {
    const node = el(tag, "path");
    if (!path) return node;
    const text = String(path);
    const cut = text.lastIndexOf("/") + 1;
    if (cut > 0) node.append(el("span", "dir", text.slice(0, cut)));
    node.append(breakable(el("span", "file"), text.slice(cut)));
    node.title = text;
    return node;
  }

  // A long file name or address wraps after "_", "-", "." or "@" rather than at any letter.
  function breakable(node, text) {
    for (const part of String(text).split(/(?<=[_.@-])/)) {
      if (node.childNodes.length) node.append(document.createElement("wbr"));
      node.append(part);
    }
    return node;
  }

  function cellLabel(index, path) {
    const position = index === null || index === undefined ? "[?]" : `[${index}]`;
    return path ? `${position} ${fileName(path)}` : position;
  }

  function stripAnsi(text) {
    return String(text).replace(ANSI_ESCAPES, "");
  }

  function errorText(error) {
    if (!error) return "";
    if (typeof error === "string") return stripAnsi(error);
    const head = [error.ename, error.evalue].filter((part) => part).join(": ");
    const traceback = (error.traceback || []).join("\n");
    return stripAnsi([head, traceback].filter((part) => part).join("\n\n"));
  }

  function outputText(outputs) {
    if (outputs === null || outputs === undefined) return "";
    let text;
    if (typeof outputs === "string") text = outputs;
    else if (Array.isArray(outputs)) text = outputs.map(outputPart).filter((p) => p).join("\n");
    else text = JSON.stringify(outputs, null, 1);
    text = stripAnsi(text);
    return text.length > OUTPUT_CHARS ? `${text.slice(0, OUTPUT_CHARS)}…` : text;
  }

  function outputPart(output) {
    if (typeof output === "string") return output;
    if (!output || typeof output !== "object") return JSON.stringify(output);
    const text = output.text ?? (output.data && output.data["text/plain"]);
    if (text !== undefined) return Array.isArray(text) ? text.join("") : String(text);
    if (output.ename) return errorText(output);
    return JSON.stringify(output);
  }

  // Connection state and staleness

  function setConnection(name) {
    const indicator = $("#connection");
    indicator.dataset.state = name;
    indicator.textContent = name;
    state.live = name === "live";
    if (state.live) state.lastUpdate = new Date();
    drawStale();
  }

  function drawStale() {
    const stale = !state.live && state.lastUpdate !== null;
    document.body.classList.toggle("stale", stale);
    const banner = $("#stale");
    banner.hidden = !stale;
    if (stale) {
      const at = timeFormat.format(state.lastUpdate);
      banner.textContent = `Stream down: data as of ${at}, its last update. Reconnecting…`;
      banner.dataset.lastUpdate = state.lastUpdate.toISOString();
    }
  }

  // Read API

  class Unauthorized extends Error {}

  async function fetchJson(path, params = {}) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== "" && value !== null && value !== undefined) query.set(key, value);
    }
    const response = await fetch(`${path}?${query}`, { headers: { Accept: "application/json" } });
    if (response.status === 401) throw new Unauthorized(path);
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    const answer = await response.json();
    syncClock(answer);
    return answer;
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

  // A token scoped to some courses: the picker offers those, and a bookmarked course
  // outside them is dropped rather than asked for (the server would answer 403).
  async function loadScope() {
    const session = await fetchJson("/api/v1/session");
    if (!session.courses) return;
    session.courses.forEach((course) => learn("course", course));
    if (state.filters.course && !session.courses.includes(state.filters.course)) {
      state.filters.course = "";
      saveFiltersInUrl();
    }
  }

  // Events first, students second: a student who appears in between is in the second
  // answer, and the stream replays every event after latest_id.
  async function load() {
    const generation = ++state.generation;
    if (state.source) state.source.close();
    setConnection(state.loaded ? "reconnecting" : "connecting");
    try {
      await loadScope();
      const course = state.filters.course;
      const history = await fetchJson("/api/v1/events", {
        course_id: course,
        limit: HISTORY_LIMIT,
        collapse_beats: "true",
      });
      const students = await fetchStudents(course);
      // The queue and the chart are also in the students' answer and the stream: a
      // failure here must not keep the table and the feed from showing.
      const [help, activity] = await Promise.all([
        fetchJson("/api/v1/help", { course_id: course }).catch(() => null),
        fetchJson("/api/v1/activity", { course_id: course, minutes: ACTIVITY_MINUTES }).catch(() => null),
      ]);
      if (generation !== state.generation) return;
      reset(history, students, help, activity);
      connect(generation);
      refreshCells();
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof Unauthorized) return askForToken("");
      setConnection("reconnecting");
      setTimeout(() => generation === state.generation && load(), RETRY_MS);
    }
  }

  function reset(history, students, help, activity) {
    state.loaded = true;
    state.students = new Map(students.map((student) => [student.student_id, student]));
    state.recent = history.events.slice().reverse();
    $("#feed-older").hidden = history.next_before_id === null;
    state.lastId = history.latest_id;
    state.pending = [];
    state.held = [];
    state.feedExtra = 0;
    state.rows.forEach((row) => row.remove());
    state.rows.clear();
    state.order = "";
    state.students.forEach((student) => {
      state.dirty.add(student.student_id);
      learnStudent(student);
    });
    state.recent.forEach(learnEvent);
    if (help) applyHelp(help);
    else handsFromStudents();
    setActivity(activity || { series: [] });
    state.rebuildFeed = true;
    state.rebuildTable = true;
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
    source.addEventListener("erased", (message) => forget(JSON.parse(message.data)));
    source.onerror = () => {
      setConnection("reconnecting");
      // EventSource retries network errors by itself; it gives up only on a bad answer.
      if (source.readyState === EventSource.CLOSED && generation === state.generation) {
        setTimeout(() => generation === state.generation && load(), RETRY_MS);
      }
    };
  }

  // Live events

  function receive(event) {
    state.lastUpdate = new Date();
    if (event.id <= state.lastId) return;
    state.lastId = event.id;
    const beat = event.event_type === "help" && isBeat(event);
    applyToStudent(event, beat);
    countActivity(event, beat);
    learnEvent(event);
    if (HAND_EVENTS.has(event.event_type) && !beat) scheduleHelpRefresh();
    if (event.status === "error" || event.status === "ok") state.cellsDirty = true;
    if (state.panel && state.panel.kind === "student" && state.panel.id === event.student_id && !beat) {
      state.panel.incoming.push(event);
      if (state.panel.incoming.length > HELD_LIMIT) state.panel.incoming.shift();
    }
    if (beat) return schedule(); // a heartbeat of a raised hand: no row in the feed
    state.recent.push(event);
    if (state.recent.length > BUFFER_LIMIT) state.recent.splice(0, state.recent.length - BUFFER_LIMIT);
    if (state.feedPaused || feedHasOpenEvent()) {
      state.held.push(event);
      if (state.held.length > HELD_LIMIT) state.held.splice(0, state.held.length - HELD_LIMIT);
    } else {
      state.pending.push(event);
      // A hidden tab gets no animation frames: keep only what the feed could show.
      if (state.pending.length > FEED_LIMIT) state.pending.splice(0, state.pending.length - FEED_LIMIT);
    }
    schedule();
  }

  // An erased student (or a whole course) leaves every view at once: table, queue, feed,
  // their panel, the picker. The reload then brings the server's summaries without them.
  function forget(erased) {
    const students = new Set();
    state.students.forEach((student) => {
      const hit = erased.student_id ? student.student_id === erased.student_id : student.course_id === erased.course_id;
      if (hit) students.add(student.student_id);
    });
    if (erased.student_id) students.add(erased.student_id);
    const gone = (item) => students.has(item.student_id) || (!erased.student_id && item.course_id === erased.course_id);
    students.forEach((id) => {
      state.students.delete(id);
      state.hands.delete(id);
      state.dirty.delete(id);
      if (state.rows.has(id)) state.rows.get(id).remove();
      state.rows.delete(id);
    });
    for (const list of ["recent", "pending", "held", "backfill"]) state[list] = state[list].filter((event) => !gone(event));
    if (state.panel && (students.has(state.panel.id) || state.panel.kind === "cell")) {
      closePanels();
      $("#timeline").replaceChildren();
    }
    if (!erased.student_id && state.known.course.delete(erased.course_id)) state.optionsChanged = true;
    Object.assign(state, { rebuildFeed: true, rebuildTable: true, queueKey: null, teamsKey: null });
    schedule();
    load();
  }

  // A help while the student's raise still beats (within 30 s) only moves its last beat.
  function isBeat(event) {
    const hand = state.hands.get(event.student_id);
    const received = millis(event.received_at);
    if (!hand || received === null) return false;
    const lastBeat = millis(hand.last_beat_at);
    return lastBeat !== null && received - lastBeat <= HAND_BEAT_TIMEOUT_MS;
  }

  function newStudent(event) {
    return {
      student_id: event.student_id, name: null, course_id: null, team: null,
      first_seen: event.received_at, last_seen: event.received_at,
      event_count: 0, execution_count: 0, error_count: 0, last_event_id: 0,
      last_event_type: null, last_notebook_path: null, last_cell_id: null,
      last_cell_index: null, last_status: null, hand_raised: false, hand_raised_at: null,
      hand_last_beat_at: null, hand_on_my_way: null, error_streak: 0, streak_cell_id: null,
      stuck: false, recent_statuses: [], struggling: false,
    };
  }

  function applyToStudent(event, beat) {
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
    student.event_count += 1;
    if (event.notebook_path) {
      student.last_notebook_path = event.notebook_path;
      student.last_cell_id = event.cell_id ?? null;
      student.last_cell_index = event.cell_index ?? null;
    }
    if (event.status === "ok" || event.status === "error") countExecution(student, event);
    applyHand(student, event, beat);
    learnStudent(student);
    state.dirty.add(student.student_id);
  }

  // The same rule as error_streak in telemetry.py, and the struggling rule beside it.
  function countExecution(student, event) {
    student.execution_count += 1;
    student.last_status = event.status;
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
    const recent = student.recent_statuses || [];
    recent.push(event.status);
    if (recent.length > RECENT_EXECUTIONS) recent.splice(0, recent.length - RECENT_EXECUTIONS);
    student.recent_statuses = recent;
    student.struggling = recent.filter((status) => status === "error").length >= STRUGGLING_ERRORS;
  }

  // Hands, between two answers of GET /api/v1/help (which stays the authority).
  function applyHand(student, event, beat) {
    const id = student.student_id;
    const received = event.received_at;
    switch (event.event_type) {
      case "help":
        if (beat) {
          state.hands.get(id).last_beat_at = received;
          if (student.hand_raised) student.hand_last_beat_at = received;
          return;
        }
        state.hands.set(id, { state: "up", raised_at: received, last_beat_at: received });
        Object.assign(student, {
          hand_raised: true, hand_raised_at: received, hand_last_beat_at: received,
          hand_on_my_way: null,
        });
        if (state.loaded) announceHand(student);
        return;
      case "help_stop":
        state.hands.delete(id);
        lowerHand(student);
        return;
      case "help_dismissed":
        if (state.hands.has(id)) state.hands.get(id).state = "dismissed";
        lowerHand(student);
        return;
      case "help_on_my_way":
        if (student.hand_raised) {
          student.hand_on_my_way = { by: event.extra?.by ?? null, at: received };
        }
    }
  }

  function lowerHand(student) {
    Object.assign(student, {
      hand_raised: false, hand_raised_at: null, hand_last_beat_at: null, hand_on_my_way: null,
    });
  }

  function applyHelp(answer) {
    state.hands = new Map(answer.hands.map((hand) => [hand.student_id, hand]));
    const queued = new Map(answer.queue.map((item) => [item.student_id, item]));
    state.students.forEach((student) => {
      const item = queued.get(student.student_id);
      const was = `${student.hand_raised}|${student.hand_raised_at}|${JSON.stringify(student.hand_on_my_way)}`;
      if (item) {
        Object.assign(student, {
          hand_raised: true, hand_raised_at: item.raised_at,
          hand_last_beat_at: item.last_beat_at, hand_on_my_way: item.on_my_way,
        });
      } else {
        lowerHand(student);
      }
      const now = `${student.hand_raised}|${student.hand_raised_at}|${JSON.stringify(student.hand_on_my_way)}`;
      if (was !== now) state.dirty.add(student.student_id);
    });
  }

  function handsFromStudents() {
    state.hands = new Map();
    state.students.forEach((student) => {
      if (!student.hand_raised) return;
      state.hands.set(student.student_id, {
        state: "up", raised_at: student.hand_raised_at, last_beat_at: student.hand_last_beat_at,
      });
    });
  }

  function scheduleHelpRefresh() {
    if (state.helpTimer) return;
    const generation = state.generation;
    state.helpTimer = setTimeout(async () => {
      state.helpTimer = 0;
      try {
        const answer = await fetchJson("/api/v1/help", { course_id: state.filters.course });
        if (generation !== state.generation) return;
        applyHelp(answer);
        schedule();
      } catch {
        // The next hand event or reload tries again; the local state stands meanwhile.
      }
    }, HELP_REFRESH_MS);
  }

  function expireHands(now) {
    state.students.forEach((student) => {
      if (!student.hand_raised) return;
      const beat = millis(student.hand_last_beat_at);
      if (beat !== null && now - beat > HAND_BEAT_TIMEOUT_MS) {
        lowerHand(student);
        state.dirty.add(student.student_id);
      }
    });
    state.hands.forEach((hand, id) => {
      if (now - millis(hand.last_beat_at) > HAND_BEAT_TIMEOUT_MS) state.hands.delete(id);
    });
  }

  async function handAction(studentId, action) {
    const by = localStorage.getItem("dashboard.by") || null;
    try {
      const response = await fetch(`/api/v1/help/${encodeURIComponent(studentId)}/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ by }),
      });
      if (response.status === 401) askForToken("");
    } catch {
      // Offline: the refresh below, or the next one, shows where the hand stands.
    } finally {
      scheduleHelpRefresh(); // 409: already down elsewhere; either way, ask the server
    }
  }

  // Alerts on a new hand: both off unless the instructor turns them on.

  let audio = null;

  function announceHand(student) {
    const who = student.name || student.student_id;
    if ($("#alert-sound").checked && audio) beep();
    if ($("#alert-notify").checked && "Notification" in window && Notification.permission === "granted") {
      new Notification("Raised hand", { body: who, tag: `hand-${student.student_id}` });
    }
  }

  function beep() {
    const oscillator = audio.createOscillator();
    const gain = audio.createGain();
    oscillator.frequency.value = 880;
    gain.gain.setValueAtTime(0.15, audio.currentTime);
    gain.gain.exponentialRampToValueAtTime(0.001, audio.currentTime + 0.4);
    oscillator.connect(gain).connect(audio.destination);
    oscillator.start();
    oscillator.stop(audio.currentTime + 0.4);
  }

  function setUpAlerts() {
    const sound = $("#alert-sound");
    const notify = $("#alert-notify");
    const by = $("#by");
    sound.checked = localStorage.getItem("dashboard.sound") === "on";
    notify.checked = localStorage.getItem("dashboard.notify") === "on";
    by.value = localStorage.getItem("dashboard.by") || "";
    sound.addEventListener("change", () => {
      localStorage.setItem("dashboard.sound", sound.checked ? "on" : "off");
      // Browsers allow audio only after a user gesture: this change is one.
      if (sound.checked && !audio) audio = new AudioContext();
    });
    notify.addEventListener("change", async () => {
      if (notify.checked && "Notification" in window && Notification.permission !== "granted") {
        notify.checked = (await Notification.requestPermission()) === "granted";
      }
      localStorage.setItem("dashboard.notify", notify.checked ? "on" : "off");
    });
    by.addEventListener("change", () => localStorage.setItem("dashboard.by", by.value.trim()));
    document.addEventListener("pointerdown", () => {
      if (sound.checked && !audio) audio = new AudioContext();
    }, { once: true });
  }

  // Activity: per-minute buckets from the server, counted on live.

  function setActivity(answer) {
    state.activity = answer.series.map((bucket) => ({
      minute: millis(bucket.minute), executions: bucket.executions, errors: bucket.errors,
      help: bucket.help,
    }));
    state.chartDirty = true;
    state.chartDrawnAt = -Infinity; // new data: draw on the next frame
  }

  function bucketFor(time) {
    const minute = Math.floor(time / 60_000) * 60_000;
    const series = state.activity;
    let last = series.at(-1);
    if (!last) {
      series.push({ minute, executions: 0, errors: 0, help: 0 });
      last = series.at(-1);
    }
    while (last.minute < minute) {
      series.push({ minute: last.minute + 60_000, executions: 0, errors: 0, help: 0 });
      last = series.at(-1);
    }
    if (series.length > ACTIVITY_MINUTES) series.splice(0, series.length - ACTIVITY_MINUTES);
    for (let index = series.length - 1; index >= 0; index -= 1) {
      if (series[index].minute === minute) return series[index];
    }
    return null; // older than the chart
  }

  function countActivity(event, beat) {
    const received = millis(event.received_at);
    const isExecution = event.status === "ok" || event.status === "error";
    const isRaise = event.event_type === "help" && !beat;
    if (received === null || !(isExecution || isRaise)) return;
    const bucket = bucketFor(received);
    if (!bucket) return;
    if (isExecution) bucket.executions += 1;
    if (event.status === "error") bucket.errors += 1;
    if (isRaise) bucket.help += 1;
    state.chartDirty = true;
  }

  function drawChart() {
    const now = performance.now();
    if (!state.chartDirty || now - state.chartDrawnAt < CHART_REDRAW_MS) return;
    state.chartDirty = false;
    state.chartDrawnAt = now;
    bucketFor(serverNow());
    const series = state.activity;
    const chart = $("#activity-chart");
    const width = state.chartWidth;
    const height = 140;
    const left = 28;
    const bottom = 16;
    const top = 8;
    const peak = Math.max(1, ...series.map((b) => Math.max(b.executions, b.errors, b.help)));
    const x = (index) => left + (index * (width - left - 4)) / Math.max(1, ACTIVITY_MINUTES - 1);
    const y = (value) => height - bottom - (value * (height - bottom - top)) / peak;
    const offset = ACTIVITY_MINUTES - series.length;
    const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img" });
    svg.setAttribute("aria-label", "executions, errors and help requests per minute, last hour");
    svg.append(
      svgNode("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }),
      svgNode("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
      svgText(left - 4, top + 8, String(peak), "end"),
      svgText(left - 4, height - bottom, "0", "end"),
      svgText(left, height - 2, "-60 min", "start"),
      svgText(width - 2, height - 2, "now", "end"),
    );
    for (const kind of ["executions", "errors", "help"]) {
      const points = series.map((bucket, index) => `${x(index + offset).toFixed(1)},${y(bucket[kind]).toFixed(1)}`);
      svg.append(svgNode("polyline", { class: kind, points: points.join(" ") }));
    }
    chart.replaceChildren(svg);
  }

  function svgNode(tag, attributes) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    return node;
  }

  function svgText(x, y, text, anchor) {
    const node = svgNode("text", { x, y, "text-anchor": anchor });
    node.textContent = text;
    return node;
  }

  function errorsInLastMinutes(minutes) {
    const since = Math.floor(serverNow() / 60_000) * 60_000 - (minutes - 1) * 60_000;
    return state.activity.filter((b) => b.minute >= since).reduce((sum, b) => sum + b.errors, 0);
  }

  // Where the class is stuck: an aggregate the server keeps, refreshed while errors arrive.

  async function refreshCells() {
    if (state.cellsLoading) return;
    state.cellsLoading = true;
    state.cellsDirty = false;
    const generation = state.generation;
    try {
      const answer = await fetchJson("/api/v1/cells", { course_id: state.filters.course });
      if (generation !== state.generation) return;
      state.cells = answer.cells;
      drawCells();
      if (state.panel && state.panel.kind === "cell") drawCellPanel();
    } catch {
      state.cellsDirty = true; // try again on the next refresh
    } finally {
      state.cellsLoading = false;
    }
  }

  function cellKey(cell) {
    return `${cell.notebook_path ?? ""}\u0000${cell.cell_id ?? cell.cell_index ?? ""}`;
  }

  function drawCells() {
    const failing = state.cells.filter((cell) => cell.students_failing > 0);
    $("#stuck-empty").hidden = failing.length > 0;
    const items = failing.map((cell) => {
      const button = el("button", "cell-summary");
      button.type = "button";
      button.dataset.cell = cellKey(cell);
      const name = el("span", "cell-name");
      name.append(el("span", "index", cell.label.split(" ")[0]), " ", el("span", "file", cell.notebook_name || fileName(cell.notebook_path) || "(no notebook)"));
      name.title = cell.notebook_path || "";
      const counts = el("span", "cell-counts");
      counts.append(el("span", "failing", `${cell.students_failing} failing`), ` · ${cell.students_ran} ran`);
      const errors = el("ul", "top-errors");
      for (const top of cell.top_errors.slice(0, 3)) {
        const line = el("li", "", `${top.students} × ${stripAnsi(top.error)}`);
        line.title = stripAnsi(top.error);
        errors.append(line);
      }
      button.append(name, counts, errors);
      button.addEventListener("click", () => openCell(cellKey(cell)));
      const item = el("li");
      item.append(button);
      return item;
    });
    $("#stuck-cells").replaceChildren(...items);
  }

  function openCell(key) {
    closePanels();
    state.panel = { kind: "cell", id: key };
    $("#cell-panel").hidden = false;
    drawCellPanel();
    $("#cell-panel .close").focus();
  }

  function drawCellPanel() {
    const cell = state.cells.find((candidate) => cellKey(candidate) === state.panel.id);
    if (!cell) return;
    $("#cell-title").textContent = cell.label;
    const facts = el("dl", "facts");
    addFact(facts, "Notebook", cell.notebook_path || "(no notebook)");
    addFact(facts, "Ran it", `${cell.students_ran} students, ${cell.runs} runs, ${cell.errors} errors`);
    addFact(facts, "Failing now", `${cell.students_failing} students`);
    const errors = el("ul", "top-errors");
    for (const top of cell.top_errors) errors.append(el("li", "", `${top.students} × ${stripAnsi(top.error)}`));
    $("#cell-facts").replaceChildren(facts, el("h3", "", "Most common errors"), errors, el("h3", "", "Failing here now"));
    const students = cell.failing_student_ids.map((id) => {
      const student = state.students.get(id);
      const button = el("button");
      button.type = "button";
      button.dataset.studentId = id;
      button.append(el("strong", "", student?.name || id));
      if (student?.name) button.append(" ", el("span", "hint", id));
      if (student?.team) button.append(" · ", el("span", "", student.team));
      if (student?.stuck) button.append(" ", el("span", "badge stuck", "stuck"));
      if (student?.hand_raised) button.append(" ", el("span", "badge hand", "hand raised"));
      button.addEventListener("click", () => openStudent(id));
      const item = el("li");
      item.append(button);
      return item;
    });
    $("#cell-students").replaceChildren(...students);
  }

  function addFact(list, term, value) {
    const node = value instanceof Node ? value : el("span", "", value);
    const dd = el("dd");
    dd.append(node);
    list.append(el("dt", "", term), dd);
  }

  // Frames

  // At most one draw per DRAW_INTERVAL_MS. At 50 events/s, drawing in every frame kept the
  // page's main thread 70% busy (14 s of style, layout, paint and script in 20 s, traced);
  // every 100 ms it is a third of that, for 50 ms more latency on average.
  function schedule() {
    if (state.frame) return;
    const wait = state.drawnAt + DRAW_INTERVAL_MS - performance.now();
    if (wait <= 0) {
      state.frame = requestAnimationFrame(draw);
    } else {
      state.frame = setTimeout(() => {
        state.frame = requestAnimationFrame(draw);
      }, wait);
    }
  }

  function draw() {
    state.frame = 0;
    state.drawnAt = performance.now();
    if (state.optionsChanged) drawOptions();
    drawFeed();
    const changed = drawStudents();
    if (changed) {
      drawQueue();
      drawTeams();
    }
    if (changed || state.chartDirty) drawSummary();
    drawChart();
    if (state.panel && state.panel.kind === "student") drawStudentPanel();
  }

  function tick() {
    const now = serverNow();
    state.ticks += 1;
    expireHands(now);
    if (state.ticks % PRESENCE_EVERY_TICKS === 0) {
      state.students.forEach((student) => {
        if (presence(student, now) !== student._presence) state.dirty.add(student.student_id);
      });
      state.chartDirty = true;
    }
    if (state.cellsDirty && state.ticks % (CELLS_REFRESH_MS / TICK_MS) === 0) refreshCells();
    drawWaits(now);
    if (state.dirty.size || state.chartDirty) schedule();
  }

  // Feed

  function feedHasOpenEvent() {
    return $("#feed details[open]") !== null;
  }

  function matchesFeedFilters(event) {
    const { notebook, type, team } = state.filters;
    return (!notebook || event.notebook_path === notebook) &&
      (!type || event.event_type === type) && (!team || event.team === team);
  }

  function drawFeed() {
    const feed = $("#feed");
    let events = state.pending;
    if (state.rebuildFeed) {
      feed.replaceChildren();
      events = state.recent;
      state.rebuildFeed = false;
      state.feedExtra = 0;
      state.backfill = [];
    }
    state.pending = [];
    let shown = events.filter(matchesFeedFilters).slice(-FEED_LIMIT);
    if (shown.length > ROWS_PER_FRAME) {
      state.backfill.unshift(...shown.slice(0, -ROWS_PER_FRAME).reverse());
      state.backfill.splice(FEED_LIMIT);
      shown = shown.slice(-ROWS_PER_FRAME);
    }
    drawBackfill(feed);
    if (state.held.length) updatePauseNote();
    if (!shown.length) return;
    const fragment = document.createDocumentFragment();
    for (let index = shown.length - 1; index >= 0; index -= 1) {
      fragment.appendChild(feedItem(shown[index]));
    }
    feed.prepend(fragment);
    trimFeed(feed);
  }

  function drawBackfill(feed) {
    if (!state.backfill.length) return;
    const fragment = document.createDocumentFragment();
    for (const event of state.backfill.splice(0, ROWS_PER_FRAME)) fragment.appendChild(feedItem(event));
    feed.append(fragment);
    if (state.backfill.length) schedule();
  }

  // An event someone has opened is never removed from under them.
  function trimFeed(feed) {
    let extra = feed.childElementCount - FEED_LIMIT - state.feedExtra;
    let item = feed.lastElementChild;
    while (extra > 0 && item) {
      const previous = item.previousElementSibling;
      if (!item.open) {
        item.remove();
        extra -= 1;
      }
      item = previous;
    }
  }

  function feedItem(event) {
    const item = el("details", `event status-${statusClass(event.status)}`);
    if (HAND_EVENTS.has(event.event_type)) item.classList.add("help");
    item.dataset.eventId = String(event.id);
    item.dataset.studentId = String(event.student_id);
    const summary = el("summary");
    const where = el("span", "where");
    const notebook = pathNode(event.notebook_path);
    notebook.classList.add("notebook");
    where.append(el("span", "cell", cellIndexLabel(event)), notebook);
    summary.append(
      el("time", "time", formatTime(event.occurred_at)),
      el("span", "student", event.student_name || event.student_id),
      el("span", "type", eventTypeLabel(event)),
      where,
    );
    summary.title = event.student_id;
    item.append(summary);
    // Code and tracebacks can be large: build them only when the event is opened.
    item.addEventListener("toggle", () => {
      if (item.open && !item.querySelector(".details")) fillDetails(item, event);
      updatePauseNote();
      if (!item.open) resumeFeedIfFree();
    });
    return item;
  }

  function statusClass(status) {
    return status === "ok" || status === "error" ? status : "none";
  }

  function eventTypeLabel(event) {
    return event.status ? `${event.event_type} ${event.status}` : event.event_type;
  }

  function cellIndexLabel(event) {
    return event.cell_index === null || event.cell_index === undefined ? "" : `[${event.cell_index}]`;
  }

  function fillDetails(item, event) {
    const body = el("div", "details");
    const meta = [`event ${event.id}`, `student ${event.student_id}`];
    if (event.team) meta.push(`team ${event.team}`);
    if (event.notebook_path) meta.push(event.notebook_path);
    if (event.duration_ms !== null && event.duration_ms !== undefined) {
      meta.push(`${Math.round(event.duration_ms)} ms`);
    }
    if (event.extra && event.extra.by) meta.push(`by ${event.extra.by}`);
    body.append(el("p", "meta", meta.join(" · ")));
    appendExecution(body, event);
    const open = el("button", "", "Open this student");
    open.type = "button";
    open.addEventListener("click", () => openStudent(event.student_id));
    body.append(open);
    item.append(body);
  }

  function appendExecution(body, event) {
    if (event.source !== null && event.source !== undefined) {
      body.append(el("h3", "", "Code"), el("pre", "code", event.source));
    } else if (event.status) {
      body.append(el("h3", "", "Code"), el("pre", "code", "(no code)"));
    }
    const error = errorText(event.error);
    if (error) body.append(el("h3", "", "Error"), el("pre", "error", error));
    const output = outputText(event.outputs);
    if (output) body.append(el("h3", "", "Output"), el("pre", "output", output));
  }

  function setFeedPaused(paused) {
    state.feedPaused = paused;
    const button = $("#feed-pause");
    button.setAttribute("aria-pressed", String(paused));
    button.textContent = paused ? "Resume" : "Pause";
    if (!paused) resumeFeedIfFree();
    updatePauseNote();
  }

  function resumeFeedIfFree() {
    if (state.feedPaused || feedHasOpenEvent() || !state.held.length) return;
    state.pending.push(...state.held);
    state.held = [];
    schedule();
  }

  function updatePauseNote() {
    const note = $("#feed-paused");
    const open = feedHasOpenEvent();
    const paused = state.feedPaused || open;
    note.hidden = !paused;
    $("#feed-section").classList.toggle("paused", paused);
    if (paused) {
      const why = state.feedPaused ? "paused" : "paused while an event is open";
      note.textContent = `${why}: ${state.held.length} new`;
    }
  }

  async function loadOlderFeed() {
    const before = oldestShownId();
    if (!before) return;
    const button = $("#feed-older");
    button.disabled = true;
    try {
      const page = await fetchJson("/api/v1/events", {
        course_id: state.filters.course,
        notebook_path: state.filters.notebook,
        event_type: state.filters.type,
        before_id: before,
        limit: PAGE_LIMIT,
        collapse_beats: "true",
      });
      const shown = page.events.filter(matchesFeedFilters);
      const fragment = document.createDocumentFragment();
      shown.forEach((event) => {
        learnEvent(event);
        fragment.appendChild(feedItem(event));
      });
      state.feedExtra += shown.length;
      $("#feed").append(fragment);
      button.hidden = page.next_before_id === null;
    } catch {
      // The button stays: clicking it again retries.
    } finally {
      button.disabled = false;
    }
  }

  function oldestShownId() {
    const last = $("#feed").lastElementChild;
    if (last) return last.dataset.eventId;
    return state.recent.length ? state.recent[0].id : state.lastId + 1;
  }

  // Students

  function presence(student, now) {
    const seen = millis(student.last_seen);
    if (seen === null) return "away";
    const idle = now - seen;
    if (idle < ACTIVE_MS) return "active";
    return idle < IDLE_MS ? "idle" : "away";
  }

  function attentionRank(student) {
    if (student.hand_raised) return 0;
    if (student.stuck) return 1;
    return student.struggling ? 2 : 3;
  }

  const SORT_KEYS = {
    name: (a, b) => collator.compare(displayName(a), displayName(b)),
    team: (a, b) => collator.compare(a.team || "\uffff", b.team || "\uffff"),
    notebook: (a, b) => collator.compare(fileName(a.last_notebook_path) || "\uffff", fileName(b.last_notebook_path) || "\uffff"),
    last_seen: (a, b) => (millis(b.last_seen) ?? 0) - (millis(a.last_seen) ?? 0),
    executions: (a, b) => b.execution_count - a.execution_count,
    errors: (a, b) => b.error_count - a.error_count,
    attention: (a, b) => attentionRank(a) - attentionRank(b) ||
      (a.hand_raised ? collator.compare(a.hand_raised_at || "", b.hand_raised_at || "") : 0),
  };

  function displayName(student) {
    return student.name || student.student_id;
  }

  function compareStudents(a, b) {
    const { key, direction } = state.sort;
    if (state.groupTeams) {
      const team = SORT_KEYS.team(a, b);
      if (team) return team;
    }
    return direction * SORT_KEYS[key](a, b) ||
      collator.compare(displayName(a), displayName(b)) ||
      collator.compare(a.student_id, b.student_id);
  }

  function matchesStudentFilters(student) {
    const { team, search } = state.filters;
    if (team && student.team !== team) return false;
    if (!search) return true;
    const needle = search.toLowerCase();
    return displayName(student).toLowerCase().includes(needle) ||
      student.student_id.toLowerCase().includes(needle);
  }

  // Returns whether anything about the students changed in this frame.
  function drawStudents() {
    if (!state.dirty.size && !state.rebuildTable) return false;
    const now = serverNow();
    // Live, a frame has a few dirty rows; after a load, all of them, spread over frames.
    let budget = ROWS_PER_FRAME;
    for (const id of state.dirty) {
      if (budget === 0) break;
      state.dirty.delete(id);
      const student = state.students.get(id);
      if (student) {
        drawStudent(student, now);
        budget -= 1;
      }
    }
    if (state.dirty.size) schedule();
    const visible = [...state.students.values()]
      .filter((student) => state.rows.has(student.student_id) && matchesStudentFilters(student))
      .sort(compareStudents);
    const key = `${state.groupTeams}\u0001${visible.map((s) => s.student_id).join("\u0000")}`;
    if (key !== state.order || state.rebuildTable) {
      const wanted = [];
      let team;
      for (const student of visible) {
        if (state.groupTeams && student.team !== team) {
          team = student.team;
          wanted.push(groupRow(team));
        }
        wanted.push(state.rows.get(student.student_id));
      }
      arrange($("#students tbody"), wanted);
      state.order = key;
      state.rebuildTable = false;
    }
    $("#student-count").textContent = visible.length === state.students.size
      ? String(state.students.size) : `${visible.length} of ${state.students.size}`;
    $("#empty").hidden = state.students.size > 0 || !state.loaded;
    return true;
  }

  // Moves only the rows out of place: a moved row's style is computed anew, and
  // re-inserting all 300 rows cost 40 ms of style and layout per frame.
  function arrange(parent, wanted) {
    const keep = new Set(wanted);
    for (const child of [...parent.children]) if (!keep.has(child)) child.remove();
    let cursor = parent.firstElementChild;
    for (const node of wanted) {
      // The row at the cursor moved further down: skip it, it is moved when its turn comes.
      if (node !== cursor && cursor && cursor.nextElementSibling === node) cursor = node;
      if (node === cursor) cursor = cursor.nextElementSibling;
      else parent.insertBefore(node, cursor);
    }
  }

  const groupRows = new Map();

  function groupRow(team) {
    if (!groupRows.has(team)) {
      const row = el("tr", "group");
      const cell = el("td", "", team || "No team");
      cell.colSpan = 7;
      row.append(cell);
      groupRows.set(team, row);
    }
    return groupRows.get(team);
  }

  function drawStudent(student, now) {
    let row = state.rows.get(student.student_id);
    if (!row) {
      row = el("tr");
      row.dataset.studentId = student.student_id;
      row.addEventListener("click", () => openStudent(student.student_id));
      state.rows.set(student.student_id, row);
    }
    student._presence = presence(student, now);
    row.classList.toggle("hand", student.hand_raised);
    row.classList.toggle("stuck", student.stuck);
    row.classList.toggle("struggling", student.struggling && !student.stuck);
    row.dataset.presence = student._presence;
    const who = el("td", "student");
    who.append(el("span", "name", displayName(student)));
    if (student.name) who.append(breakable(el("span", "id"), student.student_id));
    const activity = el("td", "last-seen", formatTime(student.last_seen));
    activity.title = student.last_seen || "";
    const notebook = el("td", "notebook");
    notebook.append(pathNode(student.last_notebook_path));
    row.replaceChildren(
      who,
      el("td", "team", student.team || ""),
      notebook,
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
      badge.title = "errors in a row on one cell";
      cell.append(badge);
    }
    if (student.struggling) {
      const errors = (student.recent_statuses || []).filter((s) => s === "error").length;
      const badge = el("span", "badge struggling", "struggling");
      badge.title = `${errors} errors in the last ${(student.recent_statuses || []).length} runs`;
      cell.append(badge);
    }
    cell.append(el("span", `badge ${student._presence}`, student._presence));
    return cell;
  }

  function drawSummary() {
    const now = serverNow();
    let active = 0;
    let hands = 0;
    let stuck = 0;
    let struggling = 0;
    state.students.forEach((student) => {
      active += presence(student, now) === "active" ? 1 : 0;
      hands += student.hand_raised ? 1 : 0;
      stuck += student.stuck ? 1 : 0;
      struggling += student.struggling ? 1 : 0;
    });
    const parts = [
      [active, ` of ${state.students.size} active`],
      [errorsInLastMinutes(5), " errors in the last 5 min"],
      [hands, hands === 1 ? " hand up" : " hands up"],
      [stuck, " stuck"],
      [struggling, " struggling"],
    ];
    const summary = $("#summary");
    summary.replaceChildren();
    parts.forEach(([count, text], index) => {
      if (index) summary.append(" · ");
      summary.append(el("strong", "", count), text);
    });
  }

  // Help queue

  function queueStudents() {
    const team = state.filters.team;
    return [...state.students.values()]
      .filter((student) => student.hand_raised && (!team || student.team === team))
      .sort((a, b) => collator.compare(a.hand_raised_at || "", b.hand_raised_at || "") ||
        collator.compare(a.student_id, b.student_id));
  }

  function drawQueue() {
    const queue = queueStudents();
    const key = queue.map((s) => `${s.student_id}|${s.hand_raised_at}|${JSON.stringify(s.hand_on_my_way)}|${s.last_notebook_path}|${s.last_cell_index}|${s.name}|${s.team}`).join("\u0000");
    if (key === state.queueKey) return;
    state.queueKey = key;
    $("#queue-count").textContent = queue.length ? String(queue.length) : "";
    $("#queue-empty").hidden = queue.length > 0;
    const items = queue.map((student, index) => updateQueueItem(student, index));
    const shown = new Set(queue.map((student) => student.student_id));
    for (const id of state.queueItems.keys()) if (!shown.has(id)) state.queueItems.delete(id);
    arrange($("#queue"), items);
    drawWaits(serverNow());
  }

  // Items are updated in place, never rebuilt: a student running a cell while the
  // instructor reaches for "Dismiss" must not swap the button from under the pointer.
  function updateQueueItem(student, index) {
    let parts = state.queueItems.get(student.student_id);
    if (!parts) {
      parts = queueItem(student);
      state.queueItems.set(student.student_id, parts);
    }
    const { item } = parts;
    if (item.dataset.raisedAt !== (student.hand_raised_at || "")) {
      item.dataset.raisedAt = student.hand_raised_at || "";
      parts.raised.textContent = `raised ${formatTime(student.hand_raised_at)} · waiting `;
    }
    const onWay = student.hand_on_my_way;
    item.classList.toggle("on-way", Boolean(onWay));
    item.classList.toggle("focused", state.focusedHand === student.student_id);
    parts.position.textContent = String(index + 1);
    parts.name.textContent = displayName(student);
    parts.team.textContent = student.team ? ` · ${student.team}` : "";
    parts.where.textContent = student.last_notebook_path
      ? cellLabel(student.last_cell_index, student.last_notebook_path) : "";
    parts.where.title = student.last_notebook_path || "";
    parts.onWay.textContent = onWay ? ` · on the way${onWay.by ? ` (${onWay.by})` : ""}` : "";
    parts.onMyWay.hidden = Boolean(onWay);
    return item;
  }

  function queueItem(student) {
    const item = el("li");
    item.dataset.studentId = student.student_id;
    const who = el("div", "who");
    const name = el("button", "name");
    name.type = "button";
    name.addEventListener("click", () => openStudent(student.student_id));
    const team = el("span", "hint");
    const where = el("span", "where");
    const since = el("span", "since");
    const raised = el("span");
    const onWay = el("span");
    since.append(raised, el("span", "wait", ""), onWay);
    who.append(name, team, where, since);
    const actions = el("div", "actions");
    const onMyWay = actionButton("On my way", "on-my-way", student);
    const dismiss = actionButton("Dismiss", "dismiss", student);
    actions.append(onMyWay, dismiss);
    const position = el("span", "position");
    item.append(position, who, actions);
    return { item, position, name, team, where, raised, onWay, onMyWay, dismiss };
  }

  function actionButton(label, action, student) {
    const button = el("button", action, label);
    button.type = "button";
    button.addEventListener("click", (click) => {
      click.stopPropagation();
      button.disabled = true;
      handAction(student.student_id, action).finally(() => {
        button.disabled = false;
      });
    });
    return button;
  }

  function drawWaits(now) {
    for (const item of $("#queue").children) {
      const raised = millis(item.dataset.raisedAt);
      const wait = item.querySelector(".wait");
      if (raised !== null && wait) wait.textContent = formatWait(now - raised);
    }
    const panelWait = $("#student-facts .hand-wait");
    if (panelWait) panelWait.textContent = formatWait(now - millis(panelWait.dataset.raisedAt));
  }

  function focusOldestHand() {
    const first = $("#queue li");
    if (!first) return;
    state.focusedHand = first.dataset.studentId;
    document.querySelectorAll("#queue li.focused").forEach((item) => item.classList.remove("focused"));
    first.classList.add("focused");
    first.scrollIntoView({ block: "nearest" });
    first.querySelector("button.name").focus();
  }

  // Teams

  function drawTeams() {
    const now = serverNow();
    const teams = new Map();
    state.students.forEach((student) => {
      if (!student.team) return;
      const counts = teams.get(student.team) || { total: 0, active: 0, hands: 0, stuck: 0, struggling: 0 };
      counts.total += 1;
      counts.active += presence(student, now) === "active" ? 1 : 0;
      counts.hands += student.hand_raised ? 1 : 0;
      counts.stuck += student.stuck ? 1 : 0;
      counts.struggling += student.struggling ? 1 : 0;
      teams.set(student.team, counts);
    });
    const names = [...teams.keys()].sort(collator.compare);
    const key = `${state.filters.team}\u0001${names.map((n) => `${n}:${Object.values(teams.get(n)).join(",")}`).join("\u0000")}`;
    if (key === state.teamsKey) return;
    state.teamsKey = key;
    $("#teams").hidden = names.length === 0;
    $("#teams").replaceChildren(...names.map((name) => teamItem(name, teams.get(name))));
  }

  function teamItem(name, counts) {
    const button = el("button");
    button.type = "button";
    button.dataset.team = name;
    button.setAttribute("aria-pressed", String(state.filters.team === name));
    button.classList.toggle("has-hands", counts.hands > 0);
    button.append(
      el("span", "team-name", name),
      el("span", "team-counts", `${counts.active} of ${counts.total} active`),
      el("span", "team-counts", `${plural(counts.hands, "hand")} · ${counts.stuck} stuck · ${counts.struggling} struggling`),
    );
    button.addEventListener("click", () => {
      const team = state.filters.team === name ? "" : name;
      $("#filter-team").value = team;
      onFilterChange("team", team);
    });
    const item = el("li");
    item.append(button);
    return item;
  }

  // A student's story

  function openStudent(studentId) {
    closePanels();
    state.panel = { kind: "student", id: studentId, before: null, done: false, incoming: [], drawnKey: "", last: null };
    $("#student-panel").hidden = false;
    $("#timeline").replaceChildren();
    $("#timeline-older").hidden = true;
    const query = new URLSearchParams({ student_id: studentId });
    $("#student-export").href = `/api/v1/events.csv?${query}`;
    drawStudentPanel();
    loadTimeline(state.panel);
    $("#student-panel .close").focus();
  }

  async function loadTimeline(panel) {
    const button = $("#timeline-older");
    button.disabled = true;
    try {
      const page = await fetchJson("/api/v1/events", {
        student_id: panel.id,
        before_id: panel.before,
        limit: TIMELINE_LIMIT,
        collapse_beats: "true",
      });
      if (state.panel !== panel) return;
      const fragment = document.createDocumentFragment();
      page.events.forEach((event) => fragment.appendChild(timelineItem(event)));
      $("#timeline").append(fragment);
      panel.before = page.next_before_id;
      button.hidden = page.next_before_id === null;
      if (panel.last === null) {
        panel.last = page.latest_id;
        schedule();
      }
    } catch {
      button.hidden = false; // the same button tries again
    } finally {
      button.disabled = false;
    }
  }

  function timelineItem(event) {
    const item = el("li", `status-${statusClass(event.status)}`);
    item.dataset.eventId = String(event.id);
    const line = el("div", "line");
    line.append(el("time", "time", formatTime(event.occurred_at)), el("span", "type", eventTypeLabel(event)));
    if (event.notebook_path) line.append(el("span", "where", cellLabel(event.cell_index, event.notebook_path)));
    if (event.duration_ms !== null && event.duration_ms !== undefined) {
      line.append(el("span", "hint", `${Math.round(event.duration_ms)} ms`));
    }
    if (event.extra && event.extra.by) line.append(el("span", "hint", `by ${event.extra.by}`));
    item.append(line);
    appendExecution(item, event);
    return item;
  }

  function drawStudentPanel() {
    const panel = state.panel;
    const student = state.students.get(panel.id);
    // Live events join once the first page is there, those newer than it only.
    if (panel.incoming.length && panel.last !== null) {
      const fragment = document.createDocumentFragment();
      for (let index = panel.incoming.length - 1; index >= 0; index -= 1) {
        const event = panel.incoming[index];
        if (event.id > panel.last) fragment.appendChild(timelineItem(event));
      }
      panel.incoming = [];
      $("#timeline").prepend(fragment);
    }
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
    addFact(facts, "Email / id", student.student_id);
    if (student.team) addFact(facts, "Team", student.team);
    if (student.course_id) addFact(facts, "Course", student.course_id);
    addFact(facts, "Presence", `${student._presence || presence(student, serverNow())}, last seen ${formatTime(student.last_seen)}`);
    addFact(facts, "Hand", handFact(student));
    const recent = student.recent_statuses || [];
    const recentErrors = recent.filter((s) => s === "error").length;
    const rate = student.execution_count ? Math.round((100 * student.error_count) / student.execution_count) : 0;
    addFact(facts, "Runs", `${student.execution_count} runs, ${student.error_count} errors (${rate}%); ${recentErrors} errors in the last ${recent.length}`);
    const flags = [];
    if (student.stuck) flags.push(`stuck: ${student.error_streak} errors in a row on one cell`);
    if (student.struggling) flags.push("struggling: many errors in the recent runs");
    addFact(facts, "Attention", flags.join("; ") || "none");
    addFact(facts, "Now in", student.last_notebook_path
      ? `${cellLabel(student.last_cell_index, student.last_notebook_path)} (${student.last_notebook_path})`
      : "no notebook yet");
    return facts;
  }

  function handFact(student) {
    const node = el("span");
    if (!student.hand_raised) {
      node.textContent = "not raised";
      return node;
    }
    const wait = el("span", "hand-wait", formatWait(serverNow() - millis(student.hand_raised_at)));
    wait.dataset.raisedAt = student.hand_raised_at;
    node.append(`raised at ${formatTime(student.hand_raised_at)}, waiting `, wait);
    if (student.hand_on_my_way) {
      node.append(` · on the way${student.hand_on_my_way.by ? ` (${student.hand_on_my_way.by})` : ""}`);
    }
    return node;
  }

  function closePanels() {
    state.panel = null;
    $("#student-panel").hidden = true;
    $("#cell-panel").hidden = true;
    $("#settings").open = false;
  }

  // Filters: the course narrows everything on the server; the rest narrow on the page.

  const FILTER_SELECTS = {
    course: "#filter-course", team: "#filter-team", notebook: "#filter-notebook", type: "#filter-type",
  };
  const FILTER_PARAMS = {
    course: "course_id", team: "team", notebook: "notebook_path", type: "event_type", search: "q",
  };

  function learnStudent(student) {
    learn("course", student.course_id);
    learn("team", student.team);
    learn("notebook", student.last_notebook_path);
    learn("type", student.last_event_type);
  }

  function learnEvent(event) {
    learn("course", event.course_id);
    learn("team", event.team);
    learn("notebook", event.notebook_path);
    learn("type", event.event_type);
  }

  function learn(kind, value) {
    if (value && !state.known[kind].has(value)) {
      state.known[kind].add(value);
      state.optionsChanged = true;
    }
  }

  function drawOptions() {
    state.optionsChanged = false;
    for (const [kind, selector] of Object.entries(FILTER_SELECTS)) {
      const select = $(selector);
      const values = [...state.known[kind]];
      if (state.filters[kind]) values.push(state.filters[kind]);
      const wanted = [...new Set(values)].sort(collator.compare);
      if (select.options.length - 1 === wanted.length) continue;
      const options = wanted.map((value) => {
        const option = el("option", "", kind === "notebook" ? fileName(value) : value);
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
    for (const [kind, param] of Object.entries(FILTER_PARAMS)) {
      if (state.filters[kind]) query.set(param, state.filters[kind]);
    }
    const search = query.toString();
    history.replaceState(null, "", search ? `?${search}` : location.pathname);
    const course = state.filters.course ? `?${new URLSearchParams({ course_id: state.filters.course })}` : "";
    $("#export-students").href = `/api/v1/students.csv${course}`;
    $("#export-events").href = `/api/v1/events.csv${course}`;
  }

  function onFilterChange(kind, value) {
    state.filters[kind] = value;
    saveFiltersInUrl();
    if (kind === "course") return load();
    if (kind === "team" || kind === "search") {
      state.rebuildTable = true;
      state.queueKey = null; // an empty queue's key is "": null always redraws
      state.teamsKey = null;
    }
    if (kind !== "search") state.rebuildFeed = true;
    schedule();
  }

  function sortBy(key) {
    const same = state.sort.key === key;
    state.sort = { key, direction: same ? -state.sort.direction : 1 };
    document.querySelectorAll("#students th[data-sort]").forEach((th) => {
      const sorted = th.dataset.sort === key;
      th.setAttribute("aria-sort", sorted ? (state.sort.direction > 0 ? "ascending" : "descending") : "none");
    });
    state.rebuildTable = true;
    schedule();
  }

  function onKey(press) {
    const typing = press.target.closest("input, select, textarea");
    if (press.key === "Escape") {
      closePanels();
      return;
    }
    if (typing || press.ctrlKey || press.metaKey || press.altKey) return;
    if (press.key === "h" || press.key === "H") {
      press.preventDefault();
      focusOldestHand();
    }
  }

  async function start() {
    $("#sign-in").addEventListener("submit", onSignIn);
    await signInFromFragment();
    $("#ingest-url").textContent = `${location.origin}/api/v1/events`;
    const query = new URLSearchParams(location.search);
    for (const [kind, param] of Object.entries(FILTER_PARAMS)) {
      state.filters[kind] = query.get(param) || "";
    }
    for (const [kind, selector] of Object.entries(FILTER_SELECTS)) {
      const select = $(selector);
      select.addEventListener("change", () => onFilterChange(kind, select.value));
    }
    const search = $("#search");
    search.value = state.filters.search;
    search.addEventListener("input", () => onFilterChange("search", search.value.trim()));
    $("#filters").addEventListener("submit", (submit) => submit.preventDefault());
    document.querySelectorAll("#students th[data-sort] button").forEach((button) => {
      button.addEventListener("click", () => sortBy(button.parentElement.dataset.sort));
    });
    $("#group-teams").addEventListener("change", (change) => {
      state.groupTeams = change.target.checked;
      state.rebuildTable = true;
      schedule();
    });
    $("#feed-pause").addEventListener("click", () => setFeedPaused(!state.feedPaused));
    $("#feed-older").addEventListener("click", loadOlderFeed);
    $("#timeline-older").addEventListener("click", () => state.panel && loadTimeline(state.panel));
    for (const [selector, action] of [["#student-on-my-way", "on-my-way"], ["#student-dismiss", "dismiss"]]) {
      const button = $(selector);
      button.addEventListener("click", () => {
        if (!state.panel) return;
        button.disabled = true;
        handAction(state.panel.id, action).finally(() => {
          button.disabled = false;
        });
      });
    }
    document.querySelectorAll(".panel .close").forEach((button) => button.addEventListener("click", closePanels));
    document.addEventListener("keydown", onKey);
    setUpAlerts();
    saveFiltersInUrl();
    state.optionsChanged = true;
    // Told after layout: reading clientWidth while drawing would force a layout of the page.
    new ResizeObserver(([entry]) => {
      const width = Math.round(entry.contentRect.width);
      if (width > 0 && width !== state.chartWidth) {
        state.chartWidth = width;
        state.chartDirty = true;
        state.chartDrawnAt = -Infinity;
        schedule();
      }
    }).observe($("#activity-chart"));
    // The table's heading sticks under the page header, whose height wraps with the width.
    // Set on the heading alone and only when it changes: a property on the root element
    // restyled the whole page (60-80 ms frames under load).
    const heading = $("#students thead");
    new ResizeObserver(([entry]) => {
      const top = `${Math.ceil(entry.borderBoxSize[0].blockSize)}px`;
      if (heading.style.top !== top) heading.style.top = top;
    }).observe($("header"));
    setInterval(tick, TICK_MS);
    load();
  }

  start();
})();
