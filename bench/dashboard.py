"""Dashboard benchmark: the page open in headless Chromium while a class posts.

    .venv/bin/python bench/dashboard.py              # 300 students, 50 events/s, 60 s
    .venv/bin/python bench/dashboard.py --sqlite     # on the SQLite default
    .venv/bin/python bench/dashboard.py --seconds 20 # a smoke run
    .venv/bin/python bench/dashboard.py --cpu-slowdown 2   # the headroom: a CPU half as fast

Against PostgreSQL and Redis (as bench/run.py: database `telemetry_bench_dashboard`,
recreated) unless --sqlite. 300 simulated students (bench/dashboard_class.py) post
cell-monitor-extension's camelCase events one per request, paced at 50 events/s, raised
hands beating every 10 s among them. The page is opened in Debian's Chromium; scripts the
benchmark injects before the page's own (never page code) record:

- long tasks: a PerformanceObserver of type `longtask` (main-thread tasks over 50 ms);
- event-to-screen latency: a MutationObserver on the feed notes when each event's row is
  inserted; the POST's send time is taken just before the request. Both are wall-clock
  milliseconds of one machine (Date.now() and time.time()), so they compare directly.

It also reads, from /proc, the CPU time of all Chromium's processes and of the page's main
thread (the renderer's, where script, style, layout and paint run): unlike the long tasks, it
leaves out the time the page waits for a core, so two versions compare with less noise.

With --cpu-slowdown N, Chromium's own CPU throttling runs the page N times slower once it is
open: a frame of 30 ms becomes a long task at 2, so the count compares how much room two
versions of the page leave, where at full speed both mostly show none.

Results go to stdout and to bench/results/dashboard-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from dashboard_class import Classroom  # noqa: E402
from run import PG_URL, REDIS_URL, reset_database, uvicorn  # noqa: E402

DATABASE = "telemetry_bench_dashboard"
CHANNEL = "telemetry:bench:dashboard"
LONG_TASK_LIMIT_MS = 50
LATENCY_TARGET_MS = 250
CHROMIUM_ARGUMENTS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--disable-background-networking", "--window-size=1400,1000",
)  # fmt: skip

# Runs before any script of the page, in every document it loads.
PROBES = """
window.__bench = {longTasks: [], frames: [], rendered: [], arrived: []};
// Notes when each event reaches the page, before the page's own handler sees it.
window.EventSource = class extends window.EventSource {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (message) => {
      const id = /"id":\s*(\d+)/.exec(message.data);
      if (id) window.__bench.arrived.push([Number(id[1]), Date.now()]);
    });
  }
};
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    window.__bench.longTasks.push({start: entry.startTime, duration: entry.duration});
  }
}).observe({type: "longtask", buffered: true});
// Where a long frame's time went: its scripts, and the style and layout after them.
new PerformanceObserver((list) => {
  for (const frame of list.getEntries()) {
    if (frame.duration <= 50) continue;
    window.__bench.frames.push({
      duration: Math.round(frame.duration),
      styleAndLayout: Math.round(frame.startTime + frame.duration - frame.styleAndLayoutStart),
      scripts: frame.scripts.map((script) => ({
        what: `${script.sourceURL.split("/").at(-1)} ${script.sourceFunctionName
          || script.invoker}`,
        duration: Math.round(script.duration),
        forcedLayout: Math.round(script.forcedStyleAndLayoutDuration),
      })),
    });
  }
}).observe({type: "long-animation-frame", buffered: true});
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((mutations) => {
    const now = Date.now();
    for (const mutation of mutations) {
      for (const node of mutation.addedNodes) {
        const id = node.dataset && node.dataset.eventId;
        if (id) window.__bench.rendered.push([Number(id), now]);
      }
    }
  }).observe(document.getElementById("feed"), {childList: true});
});
"""
COLLECT = (
    "const b = window.__bench; const out = {longTasks: b.longTasks, frames: b.frames,"
    " rendered: b.rendered, arrived: b.arrived}; b.longTasks = []; b.frames = [];"
    " b.rendered = []; b.arrived = []; return out;"
)


def descendants(root: int) -> list[int]:
    """The processes below root: chromedriver's Chromium, its renderer and helpers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def renderer_main_threads(pids: list[int]) -> list[str]:
    """The /proc path of each renderer's main thread: where the page's script, style, layout
    and paint run, so its CPU time is the page's own work, whatever else the cores ran."""
    found = []
    for pid in pids:
        try:
            if b"--type=renderer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"{pid}/task/{pid}")
        except OSError:
            continue
    return found


def cpu_seconds(pids: list[int] | list[str]) -> float:
    """User and system CPU time of the processes (or threads, as /proc paths), so far
    (wall-clock free: contention-proof)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    browser = webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PROBES})
    return browser


async def post_paced(base_url: str, classroom: Classroom, rate: float, seconds: float) -> dict:
    """POST one event per request at `rate` per second; the send time and id of each."""
    sent: dict[int, float] = {}
    failures = 0
    interval = 1.0 / rate
    backlog: list[dict] = []

    async def post(client: httpx.AsyncClient, event: dict) -> None:
        nonlocal failures
        sent_ms = time.time() * 1000
        response = await client.post("/api/v1/events", json=event)
        if response.status_code != 201:
            failures += 1
            return
        [receipt] = response.json()["events"]
        if event["eventType"] == "cell_executed":  # the events that always get a feed row
            sent[receipt["id"]] = sent_ms

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        tasks = set()
        started = time.monotonic()
        for slot in range(int(rate * seconds)):
            classroom.clock = slot * interval
            if not backlog:
                backlog = classroom.heartbeats() or [classroom.action()]
            task = asyncio.create_task(post(client, backlog.pop(0)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, started + (slot + 1) * interval - time.monotonic()))
        await asyncio.gather(*tasks)
    return {"sent": sent, "failures": failures, "posted": int(rate * seconds)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def long_task_figures(tasks: list[dict]) -> dict:
    durations = [task["duration"] for task in tasks]
    return {
        "count": len(durations),
        "max_ms": round(max(durations), 1) if durations else 0,
        "total_ms": round(sum(durations), 1),
    }


def latency_figures(sent: dict[int, float], rendered: list[list[float]]) -> dict:
    first_render = first_times(rendered)
    latencies = [first_render[i] - sent[i] for i in sent if i in first_render]
    return {
        "events": len(sent),
        "rendered": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
    }


def open_dashboard(browser: webdriver.Chrome, base_url: str, cpu_slowdown: float) -> None:
    browser.get(base_url + "/")
    WebDriverWait(browser, 30, 0.1).until(
        lambda _: browser.find_element(By.ID, "connection").text == "live"
    )
    if cpu_slowdown > 1:
        browser.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": cpu_slowdown})


async def measure(base_url: str, args: argparse.Namespace) -> dict:
    classroom = Classroom(args.students)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        opening = classroom.opening()
        for start in range(0, len(opening), 100):
            (
                await client.post("/api/v1/events", json=opening[start : start + 100])
            ).raise_for_status()
    browser = chromium()
    try:
        open_dashboard(browser, base_url, args.cpu_slowdown)
        loading = browser.execute_script(COLLECT)
        chromium_pids = descendants(browser.service.process.pid)
        main_threads = renderer_main_threads(chromium_pids)
        cpu_before, main_before = cpu_seconds(chromium_pids), cpu_seconds(main_threads)
        load = await post_paced(base_url, classroom, args.rate, args.seconds)
        chromium_cpu = cpu_seconds(chromium_pids) - cpu_before
        main_thread_cpu = cpu_seconds(main_threads) - main_before
        deadline = time.monotonic() + 10
        rendered, arrived, steady_tasks, frames = [], [], [], []
        while True:  # the last rows, drawn on the next frames
            collected = browser.execute_script(COLLECT)
            rendered += collected["rendered"]
            arrived += collected["arrived"]
            steady_tasks += collected["longTasks"]
            frames += collected["frames"]
            done = {int(i) for i, _ in rendered} >= set(load["sent"])
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        browser.quit()
    return {
        "students": args.students,
        "cpu_slowdown": args.cpu_slowdown,
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "posted": load["posted"],
        "chromium_cpu_seconds": round(chromium_cpu, 1),
        "page_main_thread_cpu_seconds": round(main_thread_cpu, 1),
        "post_failures": load["failures"],
        "long_tasks_while_loading": long_task_figures(loading["longTasks"]),
        "long_tasks_under_load": long_task_figures(steady_tasks),
        "longest_frames_under_load": sorted(frames, key=lambda f: -f["duration"])[:5],
        "event_to_screen": latency_figures(load["sent"], rendered),
        "event_to_page": latency_figures(load["sent"], arrived),
        "page_to_screen": latency_figures(first_times(arrived), rendered),
    }


def first_times(pairs: list[list[float]]) -> dict[int, float]:
    first: dict[int, float] = {}
    for event_id, at in pairs:
        first.setdefault(int(event_id), at)
    return first


def report(results: dict, storage: str) -> str:
    tasks = results["long_tasks_under_load"]
    loading = results["long_tasks_while_loading"]
    latency = results["event_to_screen"]
    cpu = results["chromium_cpu_seconds"]
    main_thread = results["page_main_thread_cpu_seconds"]
    server, page = results["event_to_page"], results["page_to_screen"]
    slowdown = results["cpu_slowdown"]
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    lines = [
        f"dashboard benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {storage}, "
        f"{os.cpu_count()} cores, {platform.python_version()}",
        f"load: {results['students']} students, {results['rate_per_s']:g} events/s for "
        f"{results['seconds']:g} s ({results['posted']} POSTs, {results['post_failures']} failed)"
        + (f", the page's CPU {slowdown:g}x slower" if slowdown > 1 else ""),
        f"long tasks while the page loaded: {loading['count']}, longest {loading['max_ms']} ms",
        f"Chromium's CPU time under load: {cpu} s in {results['seconds']:g} s "
        f"({100 * cpu / results['seconds']:.0f}% of one core, all its processes); the page's "
        f"main thread {main_thread} s ({100 * main_thread / results['seconds']:.0f}%)",
        f"long tasks under load: {tasks['count']}, longest {tasks['max_ms']} ms, "
        f"{tasks['total_ms']} ms in all (target: none over {LONG_TASK_LIMIT_MS} ms: "
        f"{ok(tasks['count'] == 0)})",
        *(
            f"  frame of {frame['duration']} ms: style and layout {frame['styleAndLayout']} ms; "
            + ", ".join(
                f"{s['what']} {s['duration']} ms (forced layout {s['forcedLayout']} ms)"
                for s in frame["scripts"]
            )
            for frame in results["longest_frames_under_load"][:3]
        ),
        f"event to screen: {latency['rendered']} of {latency['events']} executions drawn, "
        f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, max {latency['max_ms']} ms "
        f"(target p99 < {LATENCY_TARGET_MS} ms: {ok(latency['p99_ms'] < LATENCY_TARGET_MS)})",
        f"  of which POST to the page's EventSource (server, bus, network): p50 {server['p50_ms']}"
        f" ms, p99 {server['p99_ms']} ms; arrival to row inserted (the page): p50 "
        f"{page['p50_ms']} ms, p99 {page['p99_ms']} ms, max {page['max_ms']} ms",
    ]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sqlite", action="store_true", help="the SQLite default, no Redis")
    parser.add_argument(
        "--cpu-slowdown", type=float, default=1.0, help="run the open page N times slower"
    )
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        if args.sqlite:
            env, storage = {"DATABASE_URL": f"sqlite:///{workdir}/telemetry.db"}, "SQLite"
        else:
            await reset_database(DATABASE)
            env = {"DATABASE_URL": PG_URL.format(name=DATABASE), "REDIS_URL": REDIS_URL,
                   "NOTIFICATION_CHANNEL": CHANNEL}  # fmt: skip
            storage = "PostgreSQL + Redis"
        env["LOG_LEVEL"] = "WARNING"
        with uvicorn("telemetry:app", port, env, Path(workdir) / "uvicorn.log"):
            results = await measure(f"http://127.0.0.1:{port}", args)
    text = report(results, storage)
    print(text)
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"dashboard-{stamp}.json").write_text(json.dumps(results | {"report": text}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
