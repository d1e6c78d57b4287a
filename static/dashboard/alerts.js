// The alert bar: while hands are up, their names in queue order, large enough to read from
// across the room, each opening the student's story. Hidden when no hand is up. The sound on
// a new hand is Settings' (announceHand), so one hand never beeps twice.
import { $, button, el, setHidden, setText } from "./dom.js";
import { t } from "./i18n.js";
import { displayName, openStudent } from "./story.js";

let drawnKey = "";
let shown = new Set(); // the raises on the bar, by student and time: any other is new

const raiseKey = (student) => `${student.student_id}|${student.hand_raised_at}`;

export function drawAlerts(hands) {
  const key = hands.map((student) => `${raiseKey(student)}|${displayName(student)}`).join("\u0000");
  if (key === drawnKey) return;
  drawnKey = key;
  const bar = $("#alerts");
  setHidden(bar, hands.length === 0);
  setText($("#alerts-count"), t("alerts.count", { count: hands.length }));
  $("#alerts-names").replaceChildren(...hands.map((student) => el("li", "", nameButton(student))));
  const isNew = hands.some((student) => !shown.has(raiseKey(student)));
  shown = new Set(hands.map(raiseKey));
  if (isNew) pulse(bar);
}

function nameButton(student) {
  const name = displayName(student);
  const pick = button("", name, () => openStudent(student.student_id));
  pick.dataset.studentId = student.student_id;
  pick.setAttribute("aria-label", t("alerts.open", { name }));
  return pick;
}

// A new hand pulses the bar a few times, not at all for those who asked for less motion. A
// script animation starts without the style and layout flush that restarting a CSS one needs.
const PULSE = [{ background: "#8a1c14" }, { background: "#d9381e" }, { background: "#8a1c14" }];
const lessMotion = matchMedia("(prefers-reduced-motion: reduce)");

function pulse(bar) {
  if (!lessMotion.matches) bar.animate(PULSE, { duration: 1000, iterations: 3, easing: "ease-in-out" });
}
