"""What retention costs ingest: POST latency with and without a pass deleting a million rows.

    .venv/bin/python bench/retention.py                  # 1,000,000 old events, 3 rounds of 20 s
    .venv/bin/python bench/retention.py --events 100000 --seconds 10 --rounds 1   # a smoke run

Recreates the database `telemetry_bench_retention` (admin DSN BENCH_PG_ADMIN), applies
schema.sql, and fills it with generate_series: `--events` events received 10 days ago from 300
students, with their summaries (student_counts, cell_runs, activity) as ingest
would have left them. Then single-event POSTs from wrk (post.lua, 32 connections, as
bench/run.py, with its cell-monitor-extension events) against a real uvicorn, for the same
duration each run, in turn:

1. without retention (RETENTION_DAYS unset);
2. with RETENTION_DAYS=1: the service's pass deletes old rows in the background while wrk
   runs (each new service resumes from the oldest rows left).

Runs alternate for `--rounds`, so that other work on a shared machine weighs on both alike.
It prints each run's p99, the ratios round by round and their median, the events deleted
under load per second, then lets a last service finish the pass without load and reports
that from its log line. The database is dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from run import (  # bench/run.py, beside this script
    PG_ADMIN_DSN,
    PG_URL,
    REPO_DIR,
    WRK_CONNECTIONS,
    Load,
    raise_file_limit,
    reset_database,
    run_wrk,
    service_env,
    uvicorn,
)

DATABASE = "telemetry_bench_retention"
# Not run.py's ports: its benchmark may run at the same time.
PORT = 18710
STUDENTS = 300
AGE = dt.timedelta(days=10)
PASS_DEADLINE_SECONDS = 1_800
PASS_LINE = re.compile(r"retention: deleted (\d+) events, .* in (\d+) batches, ([\d.]+) s")

# Old events, one every 10 ms from AGE ago: executions over 5 notebooks of 20 cells, a
# quarter failing. Their summaries are then computed from them, as ingest adds them up.
FILL = [
    """
    INSERT INTO students (student_id, name, course_id, team, first_seen, last_seen)
    SELECT 'old-' || s, 'Student ' || s, 'course-1', NULL, now() - $1::interval,
           now() - $1::interval
    FROM generate_series(0, $2 - 1) s
    """,
    """
    INSERT INTO events (event_id, student_id, event_type, occurred_at, received_at, course_id,
                        notebook_path, cell_id, cell_index, source, status, extra)
    SELECT 'old-' || g, 'old-' || (g % $2), 'cell_executed', t, t, 'course-1',
           'week' || (g % 5) || '.ipynb', 'cell-' || (g % 20), g % 20, 'print(' || g || ')',
           CASE WHEN g % 4 = 0 THEN 'error' ELSE 'ok' END, '{}'
    FROM generate_series(1, $3) g, LATERAL (SELECT now() - $1::interval
                                             + g * interval '10 milliseconds' AS t) at
    """,
    """
    INSERT INTO student_counts (student_id, events, executions, errors)
    SELECT student_id, COUNT(*), COUNT(status), COUNT(*) FILTER (WHERE status = 'error')
    FROM events GROUP BY student_id
    """,
    """
    INSERT INTO cell_runs (student_id, notebook_path, cell_key, course_id, cell_id, cell_index,
                           runs, errors, last_status, last_error, last_event_id)
    SELECT student_id, notebook_path, cell_id, 'course-1', cell_id, MAX(cell_index), COUNT(*),
           COUNT(*) FILTER (WHERE status = 'error'), 'ok', NULL, MAX(id)
    FROM events GROUP BY student_id, notebook_path, cell_id
    """,
    """
    INSERT INTO activity (course_id, minute, executions, errors, help)
    SELECT course_id, to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"'),
           COUNT(*), COUNT(*) FILTER (WHERE status = 'error'), 0
    FROM events GROUP BY 1, 2
    """,
]


async def load(events: int) -> float:
    """A fresh database with the schema and `events` old events; the seconds it took."""
    started = time.monotonic()
    await reset_database(DATABASE)
    connection = await asyncpg.connect(PG_URL.format(name=DATABASE))
    try:
        await connection.execute((REPO_DIR / "schema.sql").read_text())
        await connection.execute(FILL[0], AGE, STUDENTS)
        await connection.execute(FILL[1], AGE, STUDENTS, events)
        for statement in FILL[2:]:
            await connection.execute(statement)
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()
    return time.monotonic() - started


async def old_events() -> int:
    connection = await asyncpg.connect(PG_URL.format(name=DATABASE))
    try:
        return await connection.fetchval("SELECT COUNT(*) FROM events WHERE event_id LIKE 'old-%'")
    finally:
        await connection.close()


def wait_for_pass(log: Path) -> tuple[int, int, float] | None:
    """(events deleted, batches, seconds) from the first pass's log line."""
    deadline = time.monotonic() + PASS_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        match = PASS_LINE.search(log.read_text(errors="replace"))
        if match:
            return int(match[1]), int(match[2]), float(match[3])
        time.sleep(1)
    return None


def env(retention: bool) -> dict[str, str]:
    values = {**service_env(), "DATABASE_URL": PG_URL.format(name=DATABASE), "LOG_LEVEL": "INFO"}
    return {**values, "RETENTION_DAYS": "1"} if retention else values


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=20, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="runs without and with, in turn")
    parser.add_argument("--keep", action="store_true", help="leave the database")
    args = parser.parse_args()
    raise_file_limit()
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}, wrk -t1 "
        f"-c{WRK_CONNECTIONS} {args.seconds}s per run, single-event POSTs, one uvicorn worker"
    )
    print(f"loaded {args.events:,} old events in {await load(args.events):.1f} s")
    logs = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    posts = Load.write(logs)
    runs: list[dict] = []
    try:
        for number in range(args.rounds):
            for retention in (False, True):
                log = logs / f"{number}-{retention}.log"
                runs.append(await measure(retention, args.seconds, log, posts))
                print(describe(runs[-1]))
        started = time.monotonic()
        with uvicorn("telemetry:app", PORT, env(True), logs / "rest.log"):
            rest = wait_for_pass(logs / "rest.log")
        rest_seconds = time.monotonic() - started
    finally:
        if not args.keep:
            connection = await asyncpg.connect(PG_ADMIN_DSN)
            await connection.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            await connection.close()
    report(runs, args.events, rest, rest_seconds)


async def measure(retention: bool, seconds: int, log: Path, load: Load) -> dict:
    """One wrk run against a fresh service; with retention, its pass runs meanwhile (it
    resumes from the oldest events left)."""
    with socket.socket() as probe:  # or wrk would measure whoever listens there
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            raise RuntimeError(f"port {PORT} is taken by another server")
    before = await old_events()
    started = time.monotonic()
    with uvicorn("telemetry:app", PORT, env(retention), log):
        result = await asyncio.to_thread(run_wrk, PORT, seconds, 1, log.stem, load)
    result["uptime"] = time.monotonic() - started
    result["retention"] = retention
    result["deleted"] = before - await old_events()
    return result


def describe(run: dict) -> str:
    return (
        f"{'with' if run['retention'] else 'without':>7} retention: {run['rps']:,.0f} POST/s, "
        f"p50 {run['p50_us'] / 1000:.1f} ms, p99 {run['p99_us'] / 1000:.1f} ms, "
        f"{run['errors']} errors, {run['deleted']:,} old events deleted"
    )


def report(runs: list[dict], events: int, rest: tuple | None, rest_seconds: float) -> None:
    without = [run["p99_us"] / 1000 for run in runs if not run["retention"]]
    with_ = [run["p99_us"] / 1000 for run in runs if run["retention"]]
    ratios = [after / before for before, after in zip(without, with_, strict=True)]
    print(
        f"p99 without retention {statistics.median(without):.1f} ms, with "
        f"{statistics.median(with_):.1f} ms (medians); with / without, each round: "
        f"{', '.join(f'{ratio:.2f}x' for ratio in ratios)}; median "
        f"{statistics.median(ratios):.2f}x (target at most 1.5x)"
    )
    loaded = [run for run in runs if run["retention"]]
    deleted, uptime = sum(r["deleted"] for r in loaded), sum(r["uptime"] for r in loaded)
    print(f"under load: {deleted:,} events deleted in {uptime:.0f} s, {deleted / uptime:,.0f}/s")
    if rest is None:
        print("the rest of the pass did not finish within the deadline")
        return
    rows, batches, seconds = rest
    print(
        f"the rest, without load: {rows:,} events in {batches} batches, {seconds:.1f} s, "
        f"{rows / seconds:,.0f}/s; whole pass: {deleted + rows:,} of {events:,} events in "
        f"{uptime + seconds:.0f} s of retention"
    )


if __name__ == "__main__":
    asyncio.run(main())
