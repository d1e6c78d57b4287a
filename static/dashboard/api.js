// The server: JSON answers, its clock, the session and the live stream. The token becomes an
// HttpOnly cookie that fetch and EventSource send by themselves: it never goes into a URL, so
// never into a server log. Paths are relative to the page, which is served at / or under a
// JupyterHub service's prefix (/services/telemetry/).

const STUDENT_PAGE_LIMIT = 1000;
export const RETRY_MS = 2000;

// Signed out (401), or signed in as a hub user who reads no course (403): `problem` says
// which, and `hubSignIn` is where the server's JupyterHub sign-in starts, if it has one.
export class Unauthorized extends Error {
  constructor(path, { problem = "", hubSignIn = null } = {}) {
    super(path);
    this.problem = problem;
    this.hubSignIn = hubSignIn;
  }
}

const hubSignIn = (response) =>
  /<([^>]*)>;\s*rel="login"/.exec(response.headers.get("Link") || "")?.[1] || null;

// Times are the server's: waits, presence and hand expiry are computed on the clock its
// answers carry ("now"), so a wrong clock in the instructor's laptop cannot age a hand.
let clock = { server: Date.now(), local: performance.now() };

export function serverNow() {
  return clock.server + (performance.now() - clock.local);
}

function syncClock(answer) {
  const server = Date.parse(answer?.now);
  if (!Number.isNaN(server)) clock = { server, local: performance.now() };
}

async function request(path, options) {
  const response = await fetch(path, options);
  if (response.status === 401) throw new Unauthorized(path, { hubSignIn: hubSignIn(response) });
  return response;
}

export async function fetchJson(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) query.set(key, value);
  }
  const response = await request(`${path}?${query}`, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path} answered ${response.status}`);
  const answer = await response.json();
  syncClock(answer);
  return answer;
}

export function postJson(path, body) {
  return request(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
}

// Whether the server took the token; the session it opens is read by fetchSession.
export async function signIn(token) {
  const response = await fetch("api/v1/session", {
    method: "POST",
    headers: { Authorization: `Bearer ${token}` },
  });
  return response.ok;
}

// The token's courses (null: all) and the class rules the page applies between answers.
export async function fetchSession() {
  const response = await request("api/v1/session", { headers: { Accept: "application/json" } });
  const answer = await response.json();
  if (response.status === 403) {
    const problem = answer.error.message;
    throw new Unauthorized("api/v1/session", { problem, hubSignIn: hubSignIn(response) });
  }
  if (!response.ok) throw new Error(`api/v1/session answered ${response.status}`);
  return answer;
}

export async function fetchStudents(course) {
  const students = [];
  let after = "";
  do {
    const page = await fetchJson("api/v1/students", {
      course_id: course, after, limit: STUDENT_PAGE_LIMIT,
    });
    students.push(...page.students);
    after = page.next_after;
  } while (after);
  return students;
}

// Live events after lastId. EventSource resumes by itself with Last-Event-ID after a network
// error; it gives up only on a bad answer, and then `closed` is called, a little later.
export function openStream(lastId, course, on) {
  const query = new URLSearchParams({ last_event_id: String(lastId) });
  if (course) query.set("course_id", course);
  const source = new EventSource(`api/v1/stream?${query}`);
  source.onopen = on.open;
  source.onmessage = (message) => on.event(JSON.parse(message.data));
  source.addEventListener("resync", on.resync); // too far behind: reload the state
  source.addEventListener("erased", (message) => on.erased(JSON.parse(message.data)));
  source.onerror = () => {
    on.down();
    if (source.readyState === EventSource.CLOSED) setTimeout(on.closed, RETRY_MS);
  };
  return source;
}
