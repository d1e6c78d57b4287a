// Classroom telemetry dashboard: the state from the read API, then live events from the SSE
// stream; this module loads, applies what arrives and draws. The modules under dashboard/
// are the API and stream, the shared state, the rules, and one per panel.
//
// Decisions a reader must not undo:
// - Every student-provided value reaches the DOM through textContent (dom.js), never innerHTML:
//   names, code and tracebacks are whatever a student's browser posted.
// - DOM work is batched in animation frames, at most one per interval (state.js), and the
//   feed keeps a bounded number of rows: a large, busy class stays responsive.
// - An event counts for a student only if its id is above the student's last_event_id from
//   the read API (rules.js), so the replay that follows a load never counts twice.
// - Times are the server's clock, from the "now" of its answers (api.js).
// - The class rules and cleaned error text come from the server: never copied, never redone.
import {
  fetchJson, fetchSession, fetchStudents, openStream, RETRY_MS, serverNow, Unauthorized,
} from "./dashboard/api.js";
import { drawAlerts } from "./dashboard/alerts.js";
import { refreshCells, markCellsDirty, setUpCells } from "./dashboard/cells.js";
import { markProgressDirty, refreshProgress, setUpProgress } from "./dashboard/progress.js";
import { refreshOneCell } from "./dashboard/onecell.js";
import {
  chartDirty, countActivity, drawChart, markChartDirty, fetchActivity, setActivity, setUpChart,
} from "./dashboard/chart.js";
import { addToFeed, drawFeed, forgetInFeed, resetFeed, setUpFeed } from "./dashboard/feed.js";
import {
  applyScope, drawOptions, forgetCourse, learnEvent, onFilterChange, setUpFilters,
} from "./dashboard/filters.js";
import { drawAges } from "./dashboard/dom.js";
import { translatePage } from "./dashboard/i18n.js";
import { setUpKeys } from "./dashboard/keys.js";
import { drawQueue, drawWaits, queueStudents } from "./dashboard/queue.js";
import {
  applyEvent, expireHands, isRun, presence, resetStudents, stalledSince,
} from "./dashboard/rules.js";
import {
  askForToken, noteUpdate, setConnection, setUpSettings, setUpSignIn, showIngestUrl,
} from "./dashboard/settings.js";
import { onDraw, schedule, state } from "./dashboard/state.js";
import { closePanels, drawStudentPanel, noteStudentEvent, setUpStory } from "./dashboard/story.js";
import { drawStudents, forgetRows, resetTable, setUpTable } from "./dashboard/students.js";
import { drawSummary, drawTeams } from "./dashboard/teams.js";

const HISTORY_LIMIT = 200;
const TICK_MS = 1000;
const PRESENCE_EVERY_TICKS = 5;

let source = null;
let ticks = 0;

// Events first, students second: a student who appears in between is in the second answer,
// and the stream replays every event after latest_id.
async function load() {
  const generation = ++state.generation;
  source?.close();
  setConnection(state.loaded ? "reconnecting" : "connecting");
  const again = () => generation === state.generation && load();
  try {
    const session = await fetchSession();
    state.rules = session.rules;
    showIngestUrl(session.ingest_token_required);
    applyScope(session.courses);
    const course = state.filters.course;
    const history = await fetchJson("api/v1/events", {
      course_id: course, limit: HISTORY_LIMIT, collapse_beats: "true",
    });
    const students = await fetchStudents(course);
    // The queue and the chart are also in the students' answer and the stream: a failure
    // here must not keep the table and the feed from showing.
    const [help, activity] = await Promise.all([
      fetchJson("api/v1/help", { course_id: course }).catch(() => null),
      fetchActivity().catch(() => null),
    ]);
    if (generation !== state.generation) return;
    reset(history, students, help, activity);
    source = openStream(state.lastId, course, {
      open: () => setConnection("live"),
      event: receive,
      resync: () => load(),
      erased: forget,
      down: () => setConnection("reconnecting"),
      closed: again,
    });
    refreshCells();
    refreshProgress();
  } catch (error) {
    if (generation !== state.generation) return;
    if (error instanceof Unauthorized) return askForToken(error.problem, error.hubSignIn);
    setConnection("reconnecting");
    setTimeout(again, RETRY_MS);
  }
}

function reset(history, students, help, activity) {
  state.loaded = true;
  state.lastId = history.latest_id;
  resetStudents(students, help);
  resetFeed(history);
  resetTable();
  history.events.forEach(learnEvent);
  setActivity(activity || { series: [] });
  schedule();
}

function receive(event) {
  noteUpdate();
  if (event.id <= state.lastId) return;
  state.lastId = event.id;
  const beat = applyEvent(event);
  if (inTeam(event)) countActivity(event, beat);
  learnEvent(event);
  if (isRun(event)) {
    markCellsDirty();
    markProgressDirty();
  }
  if (!beat) { // a heartbeat of a raised hand has no row in the feed or the timeline
    noteStudentEvent(event);
    addToFeed(event);
  }
  schedule();
}

// An erased student (or a whole course) leaves every view at once: table, queue, feed, their
// panel, the picker. The reload then brings the server's summaries without them.
function forget(erased) {
  const ids = erased.student_id
    ? new Set([erased.student_id])
    : new Set([...state.students.values()].filter((s) => s.course_id === erased.course_id)
      .map((s) => s.student_id));
  ids.forEach((id) => {
    state.students.delete(id);
    state.hands.delete(id);
    state.dirty.delete(id);
  });
  forgetRows(ids);
  forgetInFeed((item) => ids.has(item.student_id) ||
    (!erased.student_id && item.course_id === erased.course_id));
  if (state.panel && (ids.has(state.panel.id) || state.panel.kind === "cell")) closePanels();
  if (!erased.student_id) forgetCourse(erased.course_id);
  schedule();
  load();
}

// The team filter narrows the server's views too: the chart, the cells, the progress grid.
const inTeam = (event) => !state.filters.team || event.team === state.filters.team;

async function narrowToTeam() {
  const generation = state.generation;
  refreshCells();
  refreshProgress();
  refreshOneCell();
  const activity = await fetchActivity().catch(() => null);
  if (activity && generation === state.generation) setActivity(activity);
  schedule();
}

// In two frames: what arrived and who needs help, then the tallies.
function drawFirst() {
  drawOptions();
  drawFeed();
  const hands = queueStudents(); // the queue and the alert bar show the same hands
  drawQueue(hands);
  drawAlerts(hands);
}

function drawRest() {
  const changed = drawStudents();
  if (changed) drawTeams();
  if (changed || chartDirty()) drawSummary();
  drawChart();
  drawStudentPanel();
}

function tick() {
  if (!state.rules) return; // nothing to expire or age before the first session answer
  const now = serverNow();
  ticks += 1;
  expireHands(now);
  if (ticks % PRESENCE_EVERY_TICKS === 0) {
    state.students.forEach((student) => {
      const moved = presence(student, now) !== student._presence;
      if (moved || stalledSince(student, now) !== student._stalled) state.dirty.add(student.student_id);
    });
    markChartDirty();
    drawAges(now);
  }
  drawWaits(now);
  if (state.dirty.size || chartDirty()) schedule();
}

async function start() {
  translatePage();
  await setUpSignIn(load);
  setUpFilters();
  setUpTable();
  setUpFeed();
  setUpStory();
  setUpSettings();
  setUpChart();
  setUpCells();
  setUpProgress();
  onFilterChange((kind) => (kind === "course" ? load() : kind === "team" && narrowToTeam()));
  onDraw(drawFirst, drawRest);
  setUpKeys();
  setInterval(tick, TICK_MS);
  load();
}

start();
