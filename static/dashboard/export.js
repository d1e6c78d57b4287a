// The CSV exports: the class's (of the chosen course and team) and one student's events, with
// local times in the browser's time zone and named by course and date (readapi.py).
import { $ } from "./dom.js";
import { state } from "./state.js";

const csv = (path, params) => {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const query = new URLSearchParams(Object.entries({ ...params, tz: zone }).filter(([, value]) => value));
  return `${path}?${query}`;
};

export function drawExportLinks() {
  const { course, team } = state.filters;
  $("#export-students").href = csv("api/v1/students.csv", { course_id: course, team });
  $("#export-events").href = csv("api/v1/events.csv", { course_id: course, team });
}

export function drawStudentExportLink(studentId) {
  $("#student-export").href = csv("api/v1/events.csv", { student_id: studentId });
}
