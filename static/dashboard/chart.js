// Activity of the last hour: per-minute buckets from the server, counted on live.
import { $, millis, svg } from "./dom.js";
import { serverNow } from "./api.js";
import { isRun } from "./rules.js";
import { schedule } from "./state.js";

export const ACTIVITY_MINUTES = 60;
const CHART_REDRAW_MS = 2000;
const MINUTE = 60_000;
const KINDS = ["executions", "errors", "help"];

let series = []; // [{minute (ms), executions, errors, help}], oldest first
let dirty = false;
let drawnAt = -Infinity;
let width = 600;

export const chartDirty = () => dirty;

export function markChartDirty() {
  dirty = true;
}

export function setActivity(answer) {
  series = answer.series.map((bucket) => ({ ...bucket, minute: millis(bucket.minute) }));
  dirty = true;
  drawnAt = -Infinity; // new data: draw on the next frame
}

function bucketFor(time) {
  const minute = Math.floor(time / MINUTE) * MINUTE;
  if (!series.length) series.push({ minute, executions: 0, errors: 0, help: 0 });
  while (series.at(-1).minute < minute) {
    series.push({ minute: series.at(-1).minute + MINUTE, executions: 0, errors: 0, help: 0 });
  }
  if (series.length > ACTIVITY_MINUTES) series.splice(0, series.length - ACTIVITY_MINUTES);
  return series.findLast((bucket) => bucket.minute === minute) ?? null; // null: before the chart
}

export function countActivity(event, beat) {
  const received = millis(event.received_at);
  const isExecution = isRun(event);
  const isRaise = event.event_type === "help" && !beat;
  if (received === null || !(isExecution || isRaise)) return;
  const bucket = bucketFor(received);
  if (!bucket) return;
  if (isExecution) bucket.executions += 1;
  if (event.status === "error") bucket.errors += 1;
  if (isRaise) bucket.help += 1;
  dirty = true;
}

export function errorsInLastMinutes(minutes) {
  const since = Math.floor(serverNow() / MINUTE) * MINUTE - (minutes - 1) * MINUTE;
  return series.filter((b) => b.minute >= since).reduce((sum, b) => sum + b.errors, 0);
}

export function drawChart() {
  const now = performance.now();
  if (!dirty || now - drawnAt < CHART_REDRAW_MS) return;
  dirty = false;
  drawnAt = now;
  bucketFor(serverNow());
  const [height, left, bottom, top] = [140, 28, 16, 8];
  const peak = Math.max(1, ...series.map((b) => Math.max(b.executions, b.errors, b.help)));
  const offset = ACTIVITY_MINUTES - series.length;
  const x = (index) => left + ((index + offset) * (width - left - 4)) / (ACTIVITY_MINUTES - 1);
  const y = (value) => height - bottom - (value * (height - bottom - top)) / peak;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img" });
  chart.setAttribute("aria-label", "executions, errors and help requests per minute, last hour");
  chart.append(
    svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, String(peak)),
    svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"),
    svg("text", { x: left, y: height - 2, "text-anchor": "start" }, "-60 min"),
    svg("text", { x: width - 2, y: height - 2, "text-anchor": "end" }, "now"),
  );
  for (const kind of KINDS) {
    const points = series.map((bucket, index) => `${x(index).toFixed(1)},${y(bucket[kind]).toFixed(1)}`);
    chart.append(svg("polyline", { class: kind, points: points.join(" ") }));
  }
  $("#activity-chart").replaceChildren(chart);
}

// Told after layout: reading clientWidth while drawing would force a layout of the page.
export function setUpChart() {
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
