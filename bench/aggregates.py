"""The dashboard's read endpoints over HTTP, with a million events stored.

    .venv/bin/python bench/aggregates.py                   # 1,000,000 events
    .venv/bin/python bench/aggregates.py --events 100000   # a smoke run

Recreates the PostgreSQL database `telemetry_bench_aggregates` (admin DSN BENCH_PG_ADMIN,
default postgresql://postgres@127.0.0.1:5432/postgres) and starts the service on it (uvicorn,
port 18712, one worker, DASHBOARD_TOKENS set, no Redis). Everything goes through the
service's HTTP API, nothing through its Python internals:

1. Load: `--events` cell-monitor-extension events (bench/classroom.py: 500 students, their
   runs, errors, tracebacks and saves) over LABS notebooks of 40 cells, their eventTime spread
   over the past week, POSTed in 500-event batches from LOAD_CONNECTIONS connections. The
   service writes its summaries itself, as ingest does. The server receives them all during
   the load, so /activity's per-minute rows cover the load's minutes, not the week.
2. HANDS students raise a hand (`help`) and keep beating every 10 s while the reads run.
3. ANALYZE, then each read endpoint is called `--calls` times after 10 warm-up calls (fewer
   if they take over 30 s, at least 10), one at a time on one keep-alive connection: p50 and
   p99 of the whole HTTP round trip, so about a millisecond of it is the client's.

The database is dropped afterwards unless --keep (then EXPLAIN ANALYZE at leisure, or
`--reuse` to time the endpoints again without loading).

Every VACUUM_EVERY events the load runs VACUUM on the summary tables, as autovacuum would on a
production server: a PostgreSQL with autovacuum off (as on the machine these figures were
taken on) lets an updated summary such as cell_runs grow to several times its live rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import classroom  # bench/classroom.py, beside this script
import httpx
import orjson
from benchlib import machine_line
from run import PG_ADMIN_DSN, PG_URL, raise_file_limit, reset_database, uvicorn

DATABASE = "telemetry_bench_aggregates"
PORT = 18712  # not run.py's or retention.py's: they may run at the same time
READ_TOKEN = "bench-read"
LABS = 5
NOTEBOOKS = [f"week{lab}/lab{lab:02d}.ipynb" for lab in range(1, LABS + 1)]
BATCH, LOAD_CONNECTIONS = 500, 4
VACUUM_EVERY = 50_000
SUMMARIES = "students, student_counts, cell_runs, activity, activity_teams, active_minutes"
HANDS = 20
ENDPOINTS = [
    (f"help queue, {HANDS} hands", "/api/v1/help", {}),
    ("cells, every notebook", "/api/v1/cells", {}),
    ("cells, one notebook", "/api/v1/cells", {"notebook_path": NOTEBOOKS[2]}),
    ("activity, last hour", "/api/v1/activity", {"minutes": 60}),
    ("activity, last day", "/api/v1/activity", {"minutes": 1440}),
    (f"students, {classroom.STUDENTS}", "/api/v1/students", {"limit": classroom.STUDENTS}),
    ("events, collapsed", "/api/v1/events", {"collapse_beats": "true"}),
    ("cells, one team", "/api/v1/cells", {"team": "Team A"}),
    ("activity, one team, hour", "/api/v1/activity", {"minutes": 60, "team": "Team A"}),
    ("progress, busiest notebook", "/api/v1/progress", {}),
    ("progress, one notebook", "/api/v1/progress", {"notebook_path": NOTEBOOKS[2]}),
    ("progress, one team", "/api/v1/progress", {"notebook_path": NOTEBOOKS[2], "team": "Team A"}),
    (
        "one cell, every student",
        "/api/v1/cells/detail",
        {
            "notebook_path": NOTEBOOKS[2],
            "cell_key": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{NOTEBOOKS[2]}#4")),
        },
    ),
]


def week_of_events(total: int) -> Iterator[dict]:
    """`total` events of the class, a lab per notebook in turn, spread over the past week."""
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=7)
    step = (now - dt.timedelta(minutes=5) - start) / max(total, 1)
    moments = (start + step * n for n in itertools.count())
    ids = (str(uuid.uuid4()) for _ in itertools.count())
    per_lab = -(-total // LABS)
    for lab, notebook in enumerate(NOTEBOOKS):
        count = min(per_lab, total - lab * per_lab)
        yield from classroom.class_events(
            count, lambda: next(moments), ids=ids, notebook=notebook, seed=lab, opened=True
        )


async def load(base: str, url: str, total: int) -> float:
    """POST the events in batches from a few connections; the events per second."""
    events = week_of_events(total)
    batches = iter(lambda: list(itertools.islice(events, BATCH)), [])
    posted = 0
    began = time.perf_counter()

    async def poster() -> None:
        nonlocal posted
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for batch in batches:  # one shared iterator: each batch goes to one poster
                body = orjson.dumps(batch)
                response = await client.post(
                    "/api/v1/events", content=body, headers={"Content-Type": "application/json"}
                )
                assert response.status_code == 201, response.text[:500]
                posted += len(batch)
                if posted % 100_000 < BATCH:
                    print(f"  posted {posted:,} events", file=sys.stderr)

    async def autovacuum() -> None:
        connection = await asyncpg.connect(url)
        try:
            vacuumed = 0
            while True:
                await asyncio.sleep(0.5)
                if posted - vacuumed >= VACUUM_EVERY:
                    vacuumed = posted
                    await connection.execute(f"VACUUM {SUMMARIES}")
        finally:
            await connection.close()

    vacuum = asyncio.create_task(autovacuum())
    try:
        await asyncio.gather(*(poster() for _ in range(LOAD_CONNECTIONS)))
    finally:
        vacuum.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await vacuum
    return posted / (time.perf_counter() - began)


async def beat_hands(base: str) -> None:
    """HANDS students raise a hand now and beat every 10 s, as the extension does."""
    students = [classroom.Student(n) for n in range(HANDS)]
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while True:
            now = dt.datetime.now(dt.UTC)
            body = orjson.dumps([s.event("help", now, str(uuid.uuid4())) for s in students])
            response = await client.post(
                "/api/v1/events", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 201, response.text[:500]
            await asyncio.sleep(classroom.HELP_BEAT_SECONDS)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def time_endpoints(base: str, calls: int) -> list[tuple]:
    results = []
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        for name, path, params in ENDPOINTS:
            for _ in range(10):
                response = await client.get(path, params=params)
                assert response.status_code == 200, response.text[:500]
            samples: list[float] = []
            deadline = time.monotonic() + 30  # the slow endpoints: as many calls as fit in 30 s
            while len(samples) < calls and (len(samples) < 10 or time.monotonic() < deadline):
                began = time.perf_counter()
                response = await client.get(path, params=params)
                samples.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, response.text[:500]
            p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
            results.append((name, p50, p99, len(samples), len(response.content)))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--reuse", action="store_true", help="time a database kept by --keep, without loading"
    )
    options = parser.parse_args()
    raise_file_limit()
    print(machine_line())
    if not options.reuse:
        await reset_database(DATABASE)
    url = PG_URL.format(name=DATABASE)
    env = {
        "DATABASE_URL": url,
        "DASHBOARD_TOKENS": f"bench={READ_TOKEN}",
        "LOG_LEVEL": "WARNING",
        "REDIS_URL": "",
    }
    base = f"http://127.0.0.1:{PORT}"
    logs = Path(tempfile.mkdtemp(prefix="bench-aggregates-"))
    try:
        with uvicorn("telemetry:app", PORT, env, logs / "service.log"):
            rate = 0.0 if options.reuse else await load(base, url, options.events)
            connection = await asyncpg.connect(url)
            try:
                await connection.execute("ANALYZE")
                stored = await connection.fetchval("SELECT COUNT(*) FROM events")
            finally:
                await connection.close()
            hands = asyncio.create_task(beat_hands(base))
            try:
                await asyncio.sleep(1)  # the first beats are in
                results = await time_endpoints(base, options.calls)
            finally:
                hands.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hands
    finally:
        if not (options.keep or options.reuse):
            admin = await asyncpg.connect(PG_ADMIN_DSN)
            await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            await admin.close()
    loaded = (
        "kept from an earlier run"
        if options.reuse
        else (f"{options.events:,} posted at {rate:,.0f} events/s in {BATCH}-event batches")
    )
    print(
        f"{stored:,} events stored ({loaded}), {classroom.STUDENTS} students, {LABS} notebooks,"
        f" PostgreSQL; service log in {logs}"
    )
    print(f"\n{'endpoint':<28} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6} {'bytes':>9}")
    for name, p50, p99, calls, size in results:
        print(f"{name:<28} {p50:8.1f} {p99:8.1f} {calls:6} {size:9,}")


if __name__ == "__main__":
    asyncio.run(main())
