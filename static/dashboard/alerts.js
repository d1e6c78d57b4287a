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
  if (isNew) pulse();
}

function nameButton(student) {
  const name = displayName(student);
  const pick = button("", name, () => openStudent(student.student_id));
  pick.dataset.studentId = student.student_id;
  pick.setAttribute("aria-label", t("alerts.open", { name }));
  return pick;
}

// A new hand pulses the bar a few times, not at all for those who asked for less motion. A
// script animation starts without the style and layout flush that restarting a CSS one needs;
// it fades a brighter layer's opacity, which the compositor animates without the page's
// main thread (a background colour is restyled and repainted in every frame).
const PULSE = [{ opacity: 0 }, { opacity: 1 }, { opacity: 0 }];
const PULSE_TIMING = { duration: 1000, iterations: 3, easing: "ease-in-out" };
const lessMotion = matchMedia("(prefers-reduced-motion: reduce)");

let pulsing = null;

function pulse() {
  if (lessMotion.matches) return;
  pulsing?.cancel(); // a second animation on the layer would keep both off the compositor
  pulsing = $("#alerts-flash").animate(PULSE, PULSE_TIMING);
}
