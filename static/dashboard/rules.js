// What a student's events make of them between two answers of the read API: counts, stuck,
// struggling, presence, hands. The numbers are the server's rules, read from the session
// answer and never copied here, so the page and the server always agree.
import { millis } from "./dom.js";
import { fetchJson, postJson, Unauthorized } from "./api.js";
import { learnStudent } from "./filters.js";
import { announceHand, askForToken, instructorName } from "./settings.js";
import { schedule, state } from "./state.js";

const HELP_REFRESH_MS = 400;
export const HAND_EVENTS = new Set(["help", "help_stop", "help_on_my_way", "help_dismissed"]);

let helpTimer = 0;

const ms = (rule) => state.rules[`${rule}_seconds`] * 1000;
export const isRun = (event) => event.status === "ok" || event.status === "error";

export function presence(student, now) {
  const seen = millis(student.last_seen);
  if (seen === null) return "away";
  const idle = now - seen;
  if (idle < ms("active")) return "active";
  return idle < ms("idle") ? "idle" : "away";
}

export function attentionRank(student) {
  if (student.hand_raised) return 0;
  if (student.stuck) return 1;
  if (student._stalled) return 2;
  return student.struggling ? 3 : 4;
}

// The server's stalled rule (classview.stalled_since), at `now`: when the stall began, or null.
// The latest run failed, the student is not away, and either they are active and failing on
// that cell for stalled_minutes, or they went quiet after it.
export function stalledSince(student, now) {
  const seen = millis(student.last_seen);
  if (student.last_status !== "error" || seen === null || now - seen >= ms("idle")) return null;
  if (now - seen >= ms("active")) return student.last_run_at;
  const started = millis(student.streak_started_at);
  const enough = state.rules.stalled_minutes * 60_000;
  return started !== null && now - started >= enough ? student.streak_started_at : null;
}

export const recentErrors = (student) => student.recent_statuses.filter((status) => status === "error").length;

// Counts for the class summary and for each team.
export function tally(students, now) {
  const counts = { total: 0, active: 0, hands: 0, stuck: 0, stalled: 0, struggling: 0 };
  for (const student of students) {
    counts.total += 1;
    counts.active += presence(student, now) === "active" ? 1 : 0;
    counts.hands += student.hand_raised ? 1 : 0;
    counts.stuck += student.stuck ? 1 : 0;
    counts.stalled += !student.stuck && stalledSince(student, now) ? 1 : 0; // one status each
    counts.struggling += student.struggling ? 1 : 0;
  }
  return counts;
}

// The read API's students, and its hands when GET /api/v1/help answered, else the students'.
export function resetStudents(students, help) {
  state.students = new Map(students.map((student) => [student.student_id, student]));
  state.students.forEach((student) => {
    state.dirty.add(student.student_id);
    learnStudent(student);
  });
  if (help) return applyHelp(help);
  state.hands = new Map([...state.students.values()].filter((student) => student.hand_raised)
    .map((s) => [s.student_id, { raised_at: s.hand_raised_at, last_beat_at: s.hand_last_beat_at }]));
}

// Applies a live event to its student; true when it only beat for a hand already raised.
export function applyEvent(event) {
  const beat = event.event_type === "help" && isBeat(event);
  applyToStudent(event, beat);
  if (HAND_EVENTS.has(event.event_type) && !beat) scheduleHelpRefresh();
  return beat;
}

// A help while the student's raise still beats only moves its last beat.
function isBeat(event) {
  const hand = state.hands.get(event.student_id);
  const received = millis(event.received_at);
  const lastBeat = hand ? millis(hand.last_beat_at) : null;
  return received !== null && lastBeat !== null && received - lastBeat <= ms("hand_timeout");
}

const newStudent = (event) => ({
  student_id: event.student_id, first_seen: event.received_at, event_count: 0, execution_count: 0,
  error_count: 0, last_event_id: 0, error_streak: 0, recent_statuses: [], streak_started_at: null,
  hand_raised: false, stuck: false, struggling: false,
});

// An event counts for a student only if its id is above the student's last_event_id from the
// read API, so the replay that follows the initial load never counts twice.
function applyToStudent(event, beat) {
  if (!state.students.has(event.student_id)) state.students.set(event.student_id, newStudent(event));
  const student = state.students.get(event.student_id);
  if (event.id <= student.last_event_id) return;
  student.last_event_id = event.id;
  student.name = event.student_name ?? student.name;
  student.team = event.team ?? student.team;
  student.course_id = event.course_id ?? student.course_id;
  student.last_seen = event.received_at;
  student.last_event_type = event.event_type;
  student.event_count += 1;
  // Help beats and saves carry a notebook but no cell: the place is the last cell run.
  const hasCell = event.cell_id != null || event.cell_index != null;
  const hadCell = student.last_cell_id != null || student.last_cell_index != null;
  if (event.notebook_path && (hasCell || !hadCell)) {
    student.last_notebook_path = event.notebook_path;
    student.last_cell_id = event.cell_id ?? null;
    student.last_cell_index = event.cell_index ?? null;
  }
  if (isRun(event)) countExecution(student, event);
  applyHand(student, event, beat);
  learnStudent(student);
  state.dirty.add(student.student_id);
}

// The server's error streak (errors in a row on one cell) and struggling (errors among the
// recent runs), applied to one more run.
function countExecution(student, event) {
  student.execution_count += 1;
  student.last_status = event.status;
  student.last_run_at = event.received_at;
  const sameCell = student.error_streak > 0 && event.cell_id === student.streak_cell_id;
  if (event.status === "error") {
    student.error_count += 1;
    student.error_streak = sameCell ? student.error_streak + 1 : 1;
    student.streak_cell_id = event.cell_id;
    if (!sameCell) student.streak_started_at = event.received_at;
  } else if (sameCell) {
    student.error_streak = 0;
    student.streak_cell_id = null;
    student.streak_started_at = null;
  }
  student.stuck = student.error_streak >= state.rules.stuck_error_streak;
  student.recent_statuses = [...student.recent_statuses, event.status].slice(-state.rules.recent_executions);
  student.struggling = recentErrors(student) >= state.rules.struggling_errors;
}

// Hands between two answers of GET /api/v1/help, which stays the authority.
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
      state.hands.set(id, { raised_at: received, last_beat_at: received });
      setHand(student, { raised_at: received, last_beat_at: received });
      if (state.loaded) announceHand(student);
      return;
    case "help_stop":
      state.hands.delete(id);
      setHand(student, null);
      return;
    case "help_dismissed": // the raise still beats until stopped: its beats raise nothing
      setHand(student, null);
      return;
    case "help_on_my_way":
      if (student.hand_raised) student.hand_on_my_way = { by: event.extra?.by ?? null, at: received };
  }
}

// A queue item of GET /api/v1/help, or null to lower the hand.
function setHand(student, hand) {
  Object.assign(student, {
    hand_raised: Boolean(hand), hand_raised_at: hand?.raised_at ?? null,
    hand_last_beat_at: hand?.last_beat_at ?? null, hand_on_my_way: hand?.on_my_way ?? null,
  });
}

const handKey = (student) =>
  `${student.hand_raised}|${student.hand_raised_at}|${JSON.stringify(student.hand_on_my_way)}`;

function applyHelp(answer) {
  state.hands = new Map(answer.hands.map((hand) => [hand.student_id, hand]));
  const queued = new Map(answer.queue.map((item) => [item.student_id, item]));
  state.students.forEach((student) => {
    const was = handKey(student);
    setHand(student, queued.get(student.student_id) ?? null);
    if (was !== handKey(student)) state.dirty.add(student.student_id);
  });
}

export function expireHands(now) {
  const timeout = ms("hand_timeout");
  state.students.forEach((student) => {
    const beat = millis(student.hand_last_beat_at);
    if (student.hand_raised && beat !== null && now - beat > timeout) {
      setHand(student, null);
      state.dirty.add(student.student_id);
    }
  });
  state.hands.forEach((hand, id) => {
    if (now - millis(hand.last_beat_at) > timeout) state.hands.delete(id);
  });
}

function scheduleHelpRefresh() {
  if (helpTimer) return;
  const generation = state.generation;
  helpTimer = setTimeout(async () => {
    helpTimer = 0;
    try {
      const answer = await fetchJson("api/v1/help", { course_id: state.filters.course });
      if (generation !== state.generation) return;
      applyHelp(answer);
      schedule();
    } catch {
      // The next hand event or reload tries again; the local state stands meanwhile.
    }
  }, HELP_REFRESH_MS);
}

// "on-my-way" or "dismiss", the button disabled meanwhile. A 409 (already down elsewhere), an
// error or a success: either way the server's queue, asked for next, shows where the hand stands.
export async function pressHand(pressed, studentId, action) {
  pressed.disabled = true;
  try {
    await postJson(`api/v1/help/${encodeURIComponent(studentId)}/${action}`, { by: instructorName() });
  } catch (error) {
    if (error instanceof Unauthorized) askForToken("");
  } finally {
    pressed.disabled = false;
    scheduleHelpRefresh();
  }
}
