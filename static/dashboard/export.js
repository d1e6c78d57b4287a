// The CSV exports: the class's (of the chosen course) and one student's events.
import { $ } from "./dom.js";

const csv = (path, params) => {
  const query = new URLSearchParams(Object.entries(params).filter(([, value]) => value)).toString();
  return query ? `${path}?${query}` : path;
};

export function drawExportLinks(course) {
  $("#export-students").href = csv("api/v1/students.csv", { course_id: course });
  $("#export-events").href = csv("api/v1/events.csv", { course_id: course });
}

export function drawStudentExportLink(studentId) {
  $("#student-export").href = csv("api/v1/events.csv", { student_id: studentId });
}
