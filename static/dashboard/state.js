// What the panels share: the students as the read API and the stream tell of them, the
// filters, the server's rules; and the one draw loop. Each panel keeps its own drawing state.

export const state = {
  filters: { course: "", team: "", notebook: "", type: "", search: "" },
  rules: null, // the server's class rules, from the session answer
  students: new Map(), // student_id -> student record (as the read API sends, kept current)
  hands: new Map(), // student_id -> {raised_at, last_beat_at}: raises still beating
  dirty: new Set(), // student ids whose row needs redrawing
  lastId: 0, // highest event id applied
  generation: 0, // bumped by each (re)load so that stale callbacks do nothing
  loaded: false,
  panel: null, // {kind: "student"|"cell", id, ...}
};

// A panel's answer from the server, asked for again while runs arrive: one request at a time,
// at most every `everyMs` once marked dirty, an answer from before a reload dropped, a failure
// asked for again on the next round.
export function refresher(ask, apply, everyMs) {
  let dirty = false;
  let loading = false;
  async function refresh() {
    if (loading) return;
    loading = true;
    dirty = false;
    const generation = state.generation;
    try {
      const answer = await ask();
      if (generation === state.generation) apply(answer);
    } catch {
      dirty = true;
    } finally {
      loading = false;
    }
  }
  const markDirty = () => {
    dirty = true;
  };
  const start = () => setInterval(() => dirty && refresh(), everyMs);
  return { refresh, markDirty, start };
}

const DRAW_INTERVAL_MS = 100;
const ROW_BUDGET_MS = 6;

// Rows drawn after a load or a change of filters: as many as ROW_BUDGET_MS of this frame
// allows, the rest in the next frames. A whole class drawn in one frame is a long task.
export function rowBudget() {
  const deadline = performance.now() + ROW_BUDGET_MS;
  return () => performance.now() < deadline;
}

let frame = 0; // the pending animation frame or timer, 0 when none
let drawing = false; // a draw's parts are under way
let again = false; // something asked for a draw while one was under way
let drawnAt = -Infinity;
let parts = [];

// A draw is made of parts, each drawn in its own frame, so that no frame carries all that
// changed on the page: the first part is what a person must see at once.
export function onDraw(...drawParts) {
  parts = drawParts;
}

// At most one draw per DRAW_INTERVAL_MS, for whatever arrived meanwhile: drawing in every
// frame at a busy class's event rate kept the main thread mostly busy, for little less delay.
export function schedule() {
  if (drawing) again = true;
  if (drawing || frame) return;
  const start = () => (frame = requestAnimationFrame(() => drawPart(0)));
  const wait = drawnAt + DRAW_INTERVAL_MS - performance.now();
  if (wait <= 0) start();
  else frame = setTimeout(start, wait);
}

function drawPart(index) {
  if (index === 0) {
    drawing = true;
    drawnAt = performance.now();
  }
  const last = index + 1 === parts.length;
  try {
    parts[index]();
  } finally {
    frame = last ? 0 : requestAnimationFrame(() => drawPart(index + 1));
    if (last) finishDraw();
  }
}

function finishDraw() {
  drawing = false;
  if (again) {
    again = false;
    schedule();
  }
}
