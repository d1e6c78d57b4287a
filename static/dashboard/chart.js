// Activity over the chosen range (1, 3, 6 or 24 hours): per-minute counts from the server,
// counted on live, drawn in buckets wide enough that a day stays readable.
import { $, button, millis, svg } from "./dom.js";
import { fetchJson, serverNow } from "./api.js";
import { t } from "./i18n.js";
import { isRun } from "./rules.js";
import { schedule, state } from "./state.js";

// Hours shown -> minutes per bucket: at most 96 buckets however long the range.
const BUCKET_MINUTES = { 1: 1, 3: 3, 6: 5, 24: 15 };
const SAVED_HOURS = "dashboard.activityHours";
const CHART_REDRAW_MS = 2000;
const MINUTE = 60_000;
const SUMMED = ["executions", "errors", "help"];
const LINES = [...SUMMED, "active"];

let hours = Number(localStorage.getItem(SAVED_HOURS)) in BUCKET_MINUTES
  ? Number(localStorage.getItem(SAVED_HOURS)) : 1;
let series = []; // [{minute (ms), executions, errors, help, active}], oldest first
let dirty = false;
let drawnAt = -Infinity;
let width = 600;

export const activityMinutes = () => hours * 60;
export const chartDirty = () => dirty;

export function markChartDirty() {
  dirty = true;
}

export function setActivity(answer) {
  series = answer.series.map((bucket) => ({ active: 0, ...bucket, minute: millis(bucket.minute) }));
  dirty = true;
  drawnAt = -Infinity; // new data: draw on the next frame
}

const emptyMinute = (minute) => ({ minute, executions: 0, errors: 0, help: 0, active: 0 });

function bucketFor(time) {
  const minute = Math.floor(time / MINUTE) * MINUTE;
  if (!series.length) series.push(emptyMinute(minute));
  while (series.at(-1).minute < minute) series.push(emptyMinute(series.at(-1).minute + MINUTE));
  if (series.length > activityMinutes()) series.splice(0, series.length - activityMinutes());
  return series.findLast((bucket) => bucket.minute === minute) ?? null; // null: before the chart
}

// The server's count of a minute cannot say whom it counted: the larger of the two may
// undercount a minute until the next load, and never counts a student twice.
function countActive(bucket, studentId) {
  bucket.seen ??= new Set();
  bucket.seen.add(studentId);
  bucket.active = Math.max(bucket.active, bucket.seen.size);
}

export function countActivity(event, beat) {
  const received = millis(event.received_at);
  if (received === null) return;
  const bucket = bucketFor(received);
  if (!bucket) return;
  countActive(bucket, event.student_id);
  if (isRun(event)) bucket.executions += 1;
  if (event.status === "error") bucket.errors += 1;
  if (event.event_type === "help" && !beat) bucket.help += 1;
  dirty = true;
}

export function errorsInLastMinutes(minutes) {
  const since = Math.floor(serverNow() / MINUTE) * MINUTE - (minutes - 1) * MINUTE;
  return series.filter((b) => b.minute >= since).reduce((sum, b) => sum + b.errors, 0);
}

// Counts add up over a bucket; active students do not: a bucket shows its busiest minute's.
function buckets() {
  const size = BUCKET_MINUTES[hours];
  const count = activityMinutes() / size;
  const first = Math.floor(serverNow() / MINUTE) * MINUTE - (activityMinutes() - 1) * MINUTE;
  const drawn = Array.from({ length: count }, () => emptyMinute(0));
  for (const minute of series) {
    const bucket = drawn[Math.floor((minute.minute - first) / MINUTE / size)];
    if (!bucket) continue;
    SUMMED.forEach((kind) => (bucket[kind] += minute[kind]));
    bucket.active = Math.max(bucket.active, minute.active);
  }
  return drawn;
}

export function drawChart() {
  const now = performance.now();
  if (!dirty || now - drawnAt < CHART_REDRAW_MS) return;
  dirty = false;
  drawnAt = now;
  bucketFor(serverNow());
  const drawn = buckets();
  const [height, left, bottom, top] = [150, 30, 16, 8];
  const peak = Math.max(1, ...drawn.map((b) => Math.max(...LINES.map((kind) => b[kind]))));
  const x = (index) => left + (index * (width - left - 4)) / Math.max(1, drawn.length - 1);
  const y = (value) => height - bottom - (value * (height - bottom - top)) / peak;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img" });
  chart.setAttribute("aria-label", t("activity.chartLabel", { count: hours }));
  chart.append(
    svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, String(peak)),
    svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"),
    svg("text", { x: left, y: height - 2, "text-anchor": "start" }, t("activity.ago", { count: hours })),
    svg("text", { x: width - 2, y: height - 2, "text-anchor": "end" }, t("activity.now")),
  );
  for (const kind of LINES) {
    const points = drawn.map((bucket, index) => `${x(index).toFixed(1)},${y(bucket[kind]).toFixed(1)}`);
    chart.append(svg("polyline", { class: kind, points: points.join(" ") }));
  }
  $("#activity-chart").replaceChildren(chart);
}

// The series the chart shows: the course and team picked, over the range picked.
export const fetchActivity = () => fetchJson("api/v1/activity", {
  course_id: state.filters.course, team: state.filters.team, minutes: activityMinutes(),
});

async function showHours(chosen) {
  hours = chosen;
  localStorage.setItem(SAVED_HOURS, String(hours));
  drawRangeSwitch();
  const generation = state.generation;
  const answer = await fetchActivity().catch(() => null);
  if (answer && generation === state.generation && hours === chosen) setActivity(answer);
  schedule();
}

function drawRangeSwitch() {
  $("#activity-bucket").textContent = t("activity.bucket", { count: BUCKET_MINUTES[hours] });
  $("#activity-range").replaceChildren(...Object.keys(BUCKET_MINUTES).map((choice) => {
    const pick = button("", t("activity.hours", { count: choice }), () => showHours(Number(choice)));
    pick.dataset.hours = choice;
    pick.setAttribute("aria-pressed", String(Number(choice) === hours));
    return pick;
  }));
}

// Told after layout: reading clientWidth while drawing would force a layout of the page.
export function setUpChart() {
  drawRangeSwitch();
  new ResizeObserver(([entry]) => {
    const seen = Math.round(entry.contentRect.width);
    if (seen > 0 && seen !== width) {
      width = seen;
      dirty = true;
      drawnAt = -Infinity;
      schedule();
    }
  }).observe($("#activity-chart"));
}
