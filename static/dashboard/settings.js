// Connecting: the connection indicator and stale banner, signing in, the instructor's
// settings (name, alerts on a new hand) and how to connect a class to an empty page.
import { $, timeFormat } from "./dom.js";
import { signIn } from "./api.js";
import { language, setLanguage, t } from "./i18n.js";

const CONNECTION_KEYS = { "signed out": "connection.signedOut" };
const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);

let lastUpdate = null; // local Date of the latest sign of life from the stream
let audio = null;

export function setConnection(name) {
  const indicator = $("#connection");
  indicator.dataset.state = name;
  indicator.textContent = t(CONNECTION_KEYS[name] ?? `connection.${name}`);
  if (name === "live") lastUpdate = new Date();
  const stale = name !== "live" && lastUpdate !== null;
  document.body.classList.toggle("stale", stale);
  const banner = $("#stale");
  banner.hidden = !stale;
  if (stale) {
    const at = timeFormat.format(lastUpdate);
    banner.textContent = t("connection.stale", { time: at });
    banner.dataset.lastUpdate = lastUpdate.toISOString();
  }
}

export function noteUpdate() {
  lastUpdate = new Date();
}

export function askForToken(problem, hubSignIn = null) {
  setConnection("signed out");
  $("#sign-in").hidden = false;
  $("#sign-in-problem").textContent = problem;
  const hub = $("#hub-sign-in");
  hub.hidden = !hubSignIn;
  if (hubSignIn) hub.href = hubSignIn;
  $("#token").focus();
}

// A link of the form /#token=... signs in once; the fragment never reaches the server.
export async function setUpSignIn(onSignedIn) {
  $("#sign-in").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const input = $("#token");
    if (!(await signIn(input.value))) return askForToken(t("signIn.refused"));
    input.value = "";
    $("#sign-in").hidden = true;
    onSignedIn();
  });
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return;
  history.replaceState(null, "", location.pathname + location.search);
  await signIn(token);
}

// The serverUrl for cell-monitor-extension: this page's own address, under the same path
// prefix, with the ingest token's place when the server asks for one. A page on this
// computer also says how to listen beyond it, on the port it was opened on.
export function showIngestUrl(tokenRequired) {
  const base = new URL("api/v1/events", new URL(".", location.href)).href;
  $("#ingest-url").textContent = tokenRequired ? `${base}?token=INGEST_TOKEN` : base;
  $("#ingest-token-hint").hidden = !tokenRequired;
  const port = location.port || (location.protocol === "https:" ? "443" : "80");
  $("#listen-step").hidden = !LOOPBACK.has(location.hostname);
  $("#listen-command").textContent = `uvicorn telemetry:app --host 0.0.0.0 --port ${port}`;
}

export const instructorName = () => localStorage.getItem("dashboard.by") || null;

// Alerts on a new hand: both off unless the instructor turns them on.
export function announceHand(student) {
  if ($("#alert-sound").checked && audio) beep();
  if ($("#alert-notify").checked && "Notification" in window && Notification.permission === "granted") {
    new Notification(t("settings.notification"), {
      body: student.name || student.student_id, tag: `hand-${student.student_id}`,
    });
  }
}

function beep() {
  const oscillator = audio.createOscillator();
  const gain = audio.createGain();
  oscillator.frequency.value = 880;
  gain.gain.setValueAtTime(0.15, audio.currentTime);
  gain.gain.exponentialRampToValueAtTime(0.001, audio.currentTime + 0.4);
  oscillator.connect(gain).connect(audio.destination);
  oscillator.start();
  oscillator.stop(audio.currentTime + 0.4);
}

export function setUpSettings() {
  const sound = $("#alert-sound");
  const notify = $("#alert-notify");
  const by = $("#by");
  sound.checked = localStorage.getItem("dashboard.sound") === "on";
  notify.checked = localStorage.getItem("dashboard.notify") === "on";
  by.value = instructorName() || "";
  // Browsers allow audio only after a user gesture: a change of the box is one, a click too.
  const allowAudio = () => {
    if (sound.checked && !audio) audio = new AudioContext();
  };
  sound.addEventListener("change", () => {
    localStorage.setItem("dashboard.sound", sound.checked ? "on" : "off");
    allowAudio();
  });
  document.addEventListener("pointerdown", allowAudio, { once: true });
  notify.addEventListener("change", async () => {
    if (notify.checked && "Notification" in window && Notification.permission !== "granted") {
      notify.checked = (await Notification.requestPermission()) === "granted";
    }
    localStorage.setItem("dashboard.notify", notify.checked ? "on" : "off");
  });
  by.addEventListener("change", () => localStorage.setItem("dashboard.by", by.value.trim()));
  // Every panel words what it draws once: a reload draws it all anew in the new language.
  const chosen = $("#language");
  chosen.value = language;
  chosen.addEventListener("change", () => {
    setLanguage(chosen.value);
    location.reload();
  });
}
