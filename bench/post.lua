-- wrk script: POSTs of BENCH_BATCH events (1 = a single object, else an array), each with a
-- unique event_id "<BENCH_RUN>-<thread>-<counter>". done() prints one JSON line for run.py.
local run = os.getenv("BENCH_RUN") or "run"
local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local threads = {}
counter = 0
acked = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function event()
  counter = counter + 1
  return string.format(
    '{"event_id":"%s-%d-%d","student_id":"student-%d","event_type":"cell_executed",' ..
    '"course_id":"course-1","cell_index":3,"source":"print(%d)","status":"ok",' ..
    '"duration_ms":12.5}', run, tid, counter, counter % 500, counter)
end

function request()
  local body
  if batch == 1 then
    body = event()
  else
    local parts = {}
    for i = 1, batch do parts[i] = event() end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", "/api/v1/events", {["Content-Type"] = "application/json"}, body)
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
