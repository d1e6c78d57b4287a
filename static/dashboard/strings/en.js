// English: every string the page shows, by key (see i18n.js). Keys group by panel.
export const en = {
  "app.title": "Classroom telemetry",
  // The stalled status and today's help figures.
  "status.stalled": "‖ stalled",
  "status.stalled_title": "since {since}: latest run failed, and no success on that cell for {minutes} min, or quiet since",
  "summary.stalled": " stalled",
  "queue.median": { one: "Today: {count} hand answered, median wait {wait}", other: "Today: {count} hands answered, median wait {wait}" },
  "queue.median_none": "Today: no hand answered yet",
};
