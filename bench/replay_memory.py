"""What resuming dashboards cost the service in memory, during and after their replay.

    .venv/bin/python bench/replay_memory.py            # both scenarios, about 2 minutes
    .venv/bin/python bench/replay_memory.py --storm 100 --deep 3   # a smoke run

Starts the service on PostgreSQL and Redis (database `telemetry_bench_replay`, port 18720) and
reads its resident memory (VmRSS) from /proc while:
- storm: 400 SSE dashboards reconnect at once, each 250 events behind, catch up and stay open;
- deep: 10 dashboards resume 5,000 events behind (the default REPLAY_LIMIT) with cells of
  about 2 KB of source, one after another.
Each dashboard is a raw socket that reads until it has the newest id. A stream should keep
nothing of its replay once caught up: the figures to read are the growth over the idle process
while the dashboards are open, and after they leave.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PG_URL, REDIS_URL, raise_file_limit, reset_database, uvicorn

DATABASE = "telemetry_bench_replay"
PORT = 18720
BASE = f"http://127.0.0.1:{PORT}"
MIB = 1024 * 1024


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cell_event(number: int, source_bytes: int) -> dict:
    return {
        "student_id": f"student{number % 300}@uni.example",
        "event_type": "cell_executed",
        "event_id": f"replay-{number}",
        "notebook_path": "lab03.ipynb",
        "cell_id": f"cell-{number % 40}",
        "cell_index": number % 40,
        "status": "ok",
        "source": ("x = [i * i for i in range(10)]\n" * (source_bytes // 32 + 1))[:source_bytes],
    }


async def post_events(count: int, source_bytes: int) -> int:
    """Post `count` events in batches of 100; the last id stored."""
    last = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for start in range(0, count, 100):
            batch = [cell_event(n, source_bytes) for n in range(start, min(start + 100, count))]
            response = await client.post(f"{BASE}/api/v1/events", json=batch)
            response.raise_for_status()
            last = response.json()["events"][-1]["id"]
    return last


async def dashboard(after: int, newest: int, caught_up: asyncio.Event, leave: asyncio.Event):
    """An SSE dashboard resuming after `after`; holds its socket until `leave` is set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT, limit=1 << 20)
    writer.write(
        b"GET /api/v1/stream HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
        b"Last-Event-ID: %d\r\n\r\n" % after
    )
    target = b"id: %d" % newest
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("stream ended before it caught up")
        if line.rstrip() == target:
            break
    caught_up.set()
    await leave.wait()
    writer.close()


async def sample_peak(pid: int, stop: asyncio.Event) -> int:
    peak = resident_bytes(pid)
    while not stop.is_set():
        peak = max(peak, resident_bytes(pid))
        await asyncio.sleep(0.05)
    return peak


async def settle(pid: int) -> int:
    """Resident memory once it stops moving (at most 5 s)."""
    last = resident_bytes(pid)
    for _ in range(50):
        await asyncio.sleep(0.1)
        now = resident_bytes(pid)
        if abs(now - last) < MIB // 4:
            return now
        last = now
    return last


async def watch_memory(pid: int, connect, scenario: str) -> dict:
    """Resident memory idle, at its peak, with the dashboards `connect` opened caught up, and
    after they left. `connect(leave)` opens them and returns their tasks once caught up."""
    idle = await settle(pid)
    leave, stop = asyncio.Event(), asyncio.Event()
    peak_task = asyncio.create_task(sample_peak(pid, stop))
    started = time.monotonic()
    tasks = await connect(leave)
    caught_up_s = time.monotonic() - started
    open_rss = await settle(pid)
    leave.set()
    await asyncio.gather(*tasks)
    stop.set()
    peak, after = await peak_task, await settle(pid)
    return {
        "scenario": scenario,
        "idle_mib": idle / MIB,
        "peak_mib": peak / MIB,
        "open_caught_up_mib": open_rss / MIB,
        "after_leaving_mib": after / MIB,
        "caught_up_s": caught_up_s,
    }


async def storm(pid: int, clients: int, behind: int) -> dict:
    newest = await post_events(behind, 500)

    async def connect(leave: asyncio.Event) -> list[asyncio.Task]:
        flags = [asyncio.Event() for _ in range(clients)]
        tasks = [
            asyncio.create_task(dashboard(newest - behind, newest, flag, leave)) for flag in flags
        ]
        await asyncio.gather(*(flag.wait() for flag in flags))
        return tasks

    return await watch_memory(pid, connect, f"storm: {clients} SSE resume {behind} behind at once")


async def deep(pid: int, clients: int, behind: int) -> dict:
    first = await post_events(1, 2_000) - 1
    newest = await post_events(behind - 1, 2_000)

    async def connect(leave: asyncio.Event) -> list[asyncio.Task]:
        tasks = []
        for _ in range(clients):
            flag = asyncio.Event()
            tasks.append(asyncio.create_task(dashboard(first, newest, flag, leave)))
            await flag.wait()
        return tasks

    scenario = f"deep: {clients} SSE resume {behind} behind, 2 KB cells, one by one"
    return await watch_memory(pid, connect, scenario)


async def measure(scenario: str, args: argparse.Namespace, log: Path) -> dict:
    await reset_database(DATABASE)
    env = {
        "DATABASE_URL": PG_URL.format(name=DATABASE),
        "REDIS_URL": REDIS_URL,
        "NOTIFICATION_CHANNEL": "telemetry:bench:replay",
        "LOG_LEVEL": "WARNING",
        "MAX_STREAMS_PER_CLIENT": "10000",
    }
    with uvicorn("telemetry:app", PORT, env, log) as process:
        if scenario == "storm":
            return await storm(process.pid, args.storm, 250)
        return await deep(process.pid, args.deep, 5_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storm", type=int, default=400, help="dashboards in the storm")
    parser.add_argument("--deep", type=int, default=10, help="dashboards 5,000 events behind")
    args = parser.parse_args()
    raise_file_limit()
    log = Path(tempfile.mkdtemp(prefix="bench-replay-")) / "service.log"
    rows = [asyncio.run(measure(scenario, args, log)) for scenario in ("storm", "deep")]
    print(f"{'scenario':<58} {'idle':>7} {'peak':>7} {'open':>7} {'after':>7}  MiB")
    for row in rows:
        print(
            f"{row['scenario']:<58} {row['idle_mib']:7.0f} {row['peak_mib']:7.0f} "
            f"{row['open_caught_up_mib']:7.0f} {row['after_leaving_mib']:7.0f}"
        )
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
