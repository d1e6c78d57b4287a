// Tallies: the class summary line, and one button per team that shows only its students.
import { $, button, collator, el, setHidden } from "./dom.js";
import { serverNow } from "./api.js";
import { errorsInLastMinutes } from "./chart.js";
import { setFilter } from "./filters.js";
import { tally } from "./rules.js";
import { t } from "./i18n.js";
import { state } from "./state.js";

let drawnKey = "";
let drawnSummary = "";

export function drawSummary() {
  const team = state.filters.team;
  const students = [...state.students.values()].filter((s) => !team || s.team === team);
  const counts = tally(students, serverNow());
  const parts = [
    [counts.active, t("summary.active", { total: counts.total })],
    [errorsInLastMinutes(5), t("summary.errors")],
    [counts.hands, t("summary.hands", { count: counts.hands })],
    [counts.stuck, t("summary.stuck")],
    [counts.stalled, t("summary.stalled", { count: counts.stalled })],
    [counts.struggling, t("summary.struggling")],
  ];
  const key = JSON.stringify(parts);
  if (key === drawnSummary) return;
  drawnSummary = key;
  $("#summary").replaceChildren(...parts.flatMap(([count, text], index) =>
    [...(index ? [" · "] : []), el("strong", "", count), text]));
}

export function drawTeams() {
  const members = new Map();
  for (const student of state.students.values()) {
    if (!student.team) continue;
    if (!members.has(student.team)) members.set(student.team, []);
    members.get(student.team).push(student);
  }
  const names = [...members.keys()].sort(collator.compare);
  const now = serverNow();
  const teams = names.map((name) => [name, tally(members.get(name), now)]);
  const key = JSON.stringify([state.filters.team, teams]);
  if (key === drawnKey) return;
  drawnKey = key;
  setHidden($("#teams"), names.length === 0);
  $("#teams").replaceChildren(...teams.map(([name, counts]) => el("li", "", teamButton(name, counts))));
}

function teamButton(name, counts) {
  const pick = button("", null, () => {
    const team = state.filters.team === name ? "" : name;
    $("#filter-team").value = team;
    setFilter("team", team);
  });
  pick.dataset.team = name;
  pick.setAttribute("aria-pressed", String(state.filters.team === name));
  pick.classList.toggle("has-hands", counts.hands > 0);
  pick.append(
    el("span", "team-name", name),
    el("span", "team-counts", t("teams.active", counts)),
    el("span", "team-counts", t("teams.counts", {
      ...counts, hands: t("teams.hands", { count: counts.hands }),
    })),
  );
  return pick;
}
