// English: every string the page shows, by key (see i18n.js). Keys group by panel.
export const en = {
  "app.title": "Classroom telemetry",
};
