// The live feed, newest first: held while paused or while an event is open, older events on
// demand. It keeps at most FEED_LIMIT rows, so a busy class leaves the page responsive.
import { $, agoNode, button, cellPosition, el, pathNode, setHidden, setText } from "./dom.js";
import { fetchJson, serverNow } from "./api.js";
import { t } from "./i18n.js";
import { learnEvent, matchesFeedFilters, onFilterChange } from "./filters.js";
import { HAND_EVENTS } from "./rules.js";
import { rowBudget, schedule, state } from "./state.js";
import { appendExecution, eventHints, eventTypeLabel, openStudent, statusClass } from "./story.js";

const FEED_LIMIT = 200;
const BUFFER_LIMIT = 2000; // recent events kept in memory, to re-filter the feed
const HELD_LIMIT = 2000; // events held back while the feed is paused
const PAGE_LIMIT = 100;

let recent = []; // events, oldest first
let pending = []; // events not yet drawn
let held = []; // events that arrived while the feed was paused
let backfill = []; // older rows still to append, newest first, a frame's worth at a time
let paused = false;
let extra = 0; // older rows loaded on demand, kept beyond FEED_LIMIT
let rebuild = false;

onFilterChange((kind) => {
  if (kind !== "search") rebuild = true;
});

function keep(list, item, limit) {
  list.push(item);
  if (list.length > limit) list.splice(0, list.length - limit);
}

const hasOpenEvent = () => $("#feed details.event[open]") !== null;

export function resetFeed(history) {
  recent = history.events.slice().reverse();
  $("#feed-older").hidden = history.next_before_id === null;
  pending = [];
  held = [];
  rebuild = true;
}

export function addToFeed(event) {
  keep(recent, event, BUFFER_LIMIT);
  if (paused || hasOpenEvent()) keep(held, event, HELD_LIMIT);
  else keep(pending, event, FEED_LIMIT); // a hidden tab gets no frames: keep what can show
}

export function forgetInFeed(gone) {
  [recent, pending, held, backfill] = [recent, pending, held, backfill]
    .map((events) => events.filter((event) => !gone(event)));
  rebuild = true;
}

export function drawFeed() {
  const feed = $("#feed");
  let events = pending;
  if (rebuild) {
    feed.replaceChildren();
    events = recent;
    rebuild = false;
    extra = 0;
    backfill = [];
  }
  pending = [];
  const inTime = rowBudget();
  // What arrived goes on top, whole. An emptied feed fills by the row budget, newest first,
  // and the older rows follow below in the next frames.
  const arrived = events.filter(matchesFeedFilters).slice(-FEED_LIMIT).reverse();
  const filling = feed.childElementCount === 0;
  const rows = [];
  while (arrived.length && (!filling || !rows.length || inTime())) rows.push(feedItem(arrived.shift()));
  feed.prepend(...rows);
  backfill.unshift(...arrived);
  backfill.splice(FEED_LIMIT);
  while (backfill.length && inTime()) feed.append(feedItem(backfill.shift()));
  if (backfill.length) schedule();
  if (held.length) drawPauseNote();
  trimFeed(feed);
}

// An event someone has opened is never removed from under them.
function trimFeed(feed) {
  let surplus = feed.childElementCount - FEED_LIMIT - extra;
  let item = feed.lastElementChild;
  while (surplus > 0 && item) {
    const previous = item.previousElementSibling;
    if (!item.open) {
      item.remove();
      surplus -= 1;
    }
    item = previous;
  }
}

function feedItem(event) {
  const item = el("details", `event status-${statusClass(event.status)}`);
  if (HAND_EVENTS.has(event.event_type)) item.classList.add("help");
  item.dataset.eventId = String(event.id);
  item.dataset.studentId = String(event.student_id);
  const notebook = pathNode(event.notebook_path);
  notebook.classList.add("notebook");
  const summary = el("summary", "",
    agoNode(event.occurred_at, serverNow()),
    el("span", "student", event.student_name || event.student_id),
    el("span", "type", eventTypeLabel(event)),
    el("span", "where", el("span", "cell", event.cell_index == null ? "" : cellPosition(event.cell_index)), notebook));
  summary.title = event.student_id;
  item.append(summary);
  // Code and tracebacks can be large: build them only when the event is opened.
  item.addEventListener("toggle", () => {
    if (item.open && !item.querySelector(".details")) item.append(details(event));
    drawPauseNote();
    if (!item.open) resumeIfFree();
  });
  return item;
}

function details(event) {
  const meta = [t("feed.event", { id: event.id }), t("feed.student", { id: event.student_id }),
    event.team && t("feed.team", { team: event.team }),
    event.notebook_path, ...eventHints(event)];
  const body = el("div", "details", el("p", "meta", meta.filter(Boolean).join(" · ")));
  appendExecution(body, event);
  body.append(button("", t("feed.openStudent"), () => openStudent(event.student_id)));
  return body;
}

function setPaused(pause) {
  paused = pause;
  const toggle = $("#feed-pause");
  toggle.setAttribute("aria-pressed", String(pause));
  toggle.textContent = t(pause ? "feed.resume" : "feed.pause");
  if (!pause) resumeIfFree();
  drawPauseNote();
}

function resumeIfFree() {
  if (paused || hasOpenEvent() || !held.length) return;
  pending.push(...held);
  held = [];
  schedule();
}

function drawPauseNote() {
  const note = $("#feed-paused");
  const why = paused ? "feed.paused" : hasOpenEvent() && "feed.pausedOpen";
  setHidden(note, !why);
  $("#feed-section").classList.toggle("paused", Boolean(why));
  if (why) setText(note, t(why, { count: held.length }));
}

async function loadOlder() {
  const oldest = $("#feed").lastElementChild?.dataset.eventId ?? recent[0]?.id ?? state.lastId + 1;
  const older = $("#feed-older");
  older.disabled = true;
  try {
    const page = await fetchJson("api/v1/events", {
      course_id: state.filters.course, notebook_path: state.filters.notebook,
      event_type: state.filters.type, before_id: oldest, limit: PAGE_LIMIT, collapse_beats: "true",
    });
    const shown = page.events.filter(matchesFeedFilters);
    shown.forEach(learnEvent);
    extra += shown.length;
    $("#feed").append(...shown.map(feedItem));
    older.hidden = page.next_before_id === null;
  } catch {
    // The button stays: clicking it again retries.
  } finally {
    older.disabled = false;
  }
}

export function setUpFeed() {
  $("#feed-pause").addEventListener("click", () => setPaused(!paused));
  $("#feed-older").addEventListener("click", loadOlder);
}
