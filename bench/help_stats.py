"""GET /api/v1/help/stats and its CSV over HTTP, with a million events stored.

    .venv/bin/python bench/help_stats.py                   # 1,000,000 events
    .venv/bin/python bench/help_stats.py --events 100000   # a smoke run

Loads the class with bench/aggregates.py's loader (database telemetry_bench_help, port 18713),
then ROUNDS rounds of help in which every student raises a hand, half of them get "on my
way", a quarter are dismissed, and every hand is lowered: ROUNDS × 500 raises, all today.
The stats are read as the API's default (the figures and the newest 100 raises), as the
queue asks (limit=0), and with the largest page. Each read is called `--calls` times after
10 warm-up calls, one at a time on one keep-alive connection: p50 and p99 of the whole HTTP
round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import uuid
from pathlib import Path

import aggregates  # bench/aggregates.py, beside this script
import asyncpg
import classroom
import httpx
import orjson
from benchlib import machine_line
from run import PG_ADMIN_DSN, PG_URL, raise_file_limit, reset_database, uvicorn

ROUNDS = 10
DATABASE = "telemetry_bench_help"
PORT = 18713  # not aggregates.py's: both may run at the same time


async def post(client: httpx.AsyncClient, events: list[dict]) -> None:
    body = orjson.dumps(events)
    response = await client.post(
        "/api/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text[:500]


async def help_rounds(base: str) -> None:
    students = [classroom.Student(n) for n in range(classroom.STUDENTS)]
    headers = {"Authorization": f"Bearer {aggregates.READ_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(ROUNDS):
            now = dt.datetime.now(dt.UTC)
            await post(client, [s.event("help", now, str(uuid.uuid4())) for s in students])
            for n, student in enumerate(students[: classroom.STUDENTS // 2]):
                action = "dismiss" if n % 2 else "on-my-way"
                answer = f"/api/v1/help/{student.email}/{action}"
                response = await client.post(answer, json={"by": f"TA {n % 4}"})
                assert response.status_code == 201, response.text[:500]
            await post(client, [s.event("help_stop", now, str(uuid.uuid4())) for s in students])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=100)
    options = parser.parse_args()
    raise_file_limit()
    print(machine_line())
    await reset_database(DATABASE)
    url = PG_URL.format(name=DATABASE)
    env = {"DATABASE_URL": url, "DASHBOARD_TOKENS": f"bench={aggregates.READ_TOKEN}",
           "LOG_LEVEL": "WARNING", "REDIS_URL": ""}  # fmt: skip
    base = f"http://127.0.0.1:{PORT}"
    logs = Path(tempfile.mkdtemp(prefix="bench-help-stats-"))
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    today = {"since": midnight.isoformat()}
    aggregates.ENDPOINTS[:] = [
        (f"help stats, {ROUNDS * classroom.STUDENTS:,} raises", "/api/v1/help/stats", today),
        ("help stats, limit=0", "/api/v1/help/stats", {**today, "limit": 0}),
        ("help stats, limit=1000", "/api/v1/help/stats", {**today, "limit": 1000}),
        ("help stats CSV", "/api/v1/help/stats.csv", today),
    ]
    try:
        with uvicorn("telemetry:app", PORT, env, logs / "service.log"):
            rate = await aggregates.load(base, options.events)
            await help_rounds(base)
            later = {"since": dt.datetime.now(dt.UTC).isoformat()}  # no raise: the index alone
            aggregates.ENDPOINTS.append(("help stats, no raise since", "/api/v1/help/stats", later))
            connection = await asyncpg.connect(url)
            try:
                # Production's autovacuum keeps the visibility map current: do its work.
                await connection.execute("VACUUM ANALYZE")
                stored = await connection.fetchval("SELECT COUNT(*) FROM events")
            finally:
                await connection.close()
            results = await aggregates.time_endpoints(base, options.calls)
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.close()
    print(f"{stored:,} events stored (loaded at {rate:,.0f} events/s), PostgreSQL; log in {logs}")
    print(f"\n{'endpoint':<28} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6} {'bytes':>9}")
    for name, p50, p99, calls, size in results:
        print(f"{name:<28} {p50:8.1f} {p99:8.1f} {calls:6} {size:9,}")


if __name__ == "__main__":
    asyncio.run(main())
