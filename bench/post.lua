-- wrk script: replays the events bench/classroom.py wrote (cell-monitor-extension's camelCase
-- shape, one JSON line each, BENCH_EVENTS), BENCH_BATCH of them per POST as a JSON array
-- (1 = a one-element array, as the extension posts), each with a unique eventId
-- "<BENCH_RUN>-<thread>-<counter>". Every HELP_BEAT_SECONDS the help beats of the raised
-- hands (BENCH_HELP) join the next POSTs. done() prints one JSON line for run.py.
local run = os.getenv("BENCH_RUN") or "run"
local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local placeholder = "@EVENT_ID@"
local HELP_BEAT_SECONDS = 10
local threads = {}
counter = 0
acked = 0

-- Each template is the text before and after the event id.
local function load(path)
  local templates = {}
  for line in io.lines(path) do
    local at = line:find(placeholder, 1, true)
    if at then
      templates[#templates + 1] = {line:sub(1, at - 1), line:sub(at + #placeholder)}
    end
  end
  assert(#templates > 0, "no events in " .. path)
  return templates
end

local events = load(assert(os.getenv("BENCH_EVENTS"), "set BENCH_EVENTS"))
local beats = load(assert(os.getenv("BENCH_HELP"), "set BENCH_HELP"))
local next_event = 0
local pending = {}   -- help beats due, sent before the next replayed events
local next_beat = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  -- Threads start at different places in the class, so they do not post the same events.
  next_event = (tid or 0) * 7919 % #events
end

local function event()
  counter = counter + 1
  local template
  if #pending > 0 then
    template = table.remove(pending)
  else
    next_event = next_event % #events + 1
    template = events[next_event]
  end
  return template[1] .. run .. "-" .. tid .. "-" .. counter .. template[2]
end

local function build()
  local now = os.time()
  if now >= next_beat then
    for _, beat in ipairs(beats) do pending[#pending + 1] = beat end
    next_beat = now + HELP_BEAT_SECONDS
  end
  local parts = {}
  for i = 1, batch do parts[i] = event() end
  local body = "[" .. table.concat(parts, ",") .. "]"
  return wrk.format("POST", "/api/v1/events", {
    ["Content-Type"] = "application/json",
    ["Origin"] = "http://localhost:8888",
  }, body)
end

-- wrk calls request() once on the first thread before the run, to check for pipelining,
-- and discards what it returns: that call must leave the counter and the beats as they were.
local checked = false

function request()
  if tid == 0 and not checked then
    checked = true
    local saved = {counter, next_event, next_beat}
    local check = build()
    counter, next_event, next_beat = saved[1], saved[2], saved[3]
    pending = {}
    return check
  end
  return build()
end

function response(status, headers, body)
  if status >= 200 and status < 300 then acked = acked + 1 end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("acked") end
  io.write(string.format(
    'BENCH {"requests":%d,"acked":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":%d,"batch":%d}\n',
    summary.requests, total, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout, batch))
end
