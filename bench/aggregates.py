"""The dashboard's aggregate endpoints with a million stored events, and what their
summary tables cost at ingest.

    /work/venv/bin/python bench/aggregates.py                 # 1,000,000 events, ~3 minutes
    /work/venv/bin/python bench/aggregates.py --events 100000 # a smoke run

Loads a fresh PostgreSQL database (`telemetry_bench_aggregates`, dropped and recreated; the
admin DSN is BENCH_PG_ADMIN or postgresql://postgres@127.0.0.1:5432/postgres) with a class
of 300 students over a week: 5 notebooks of 20 cells, a quarter of the runs failing, help
beats, and 20 hands up now. Events go in with COPY; the summary tables get the same
upserts the commit path runs (UPSERT_ARRAYS), fed by the same functions (cell_run_rows,
activity_rows), so they hold what ingest would have written.

Then, in process over httpx's ASGI transport (no socket, so the figure is the service's
own time), each endpoint is called 200 times after 10 warm-up calls (fewer if they take over 30 s,
at least 10): p50 and p99. Twice: with a dashboard token of every course, then with one
scoped to cs101 (its courses travel to every query as a JSON array, see in_scope).

Ingest cost: 200 batches of 50 executions stored through Storage.store, alternating the
current commit path (one transaction: the events statement, then the summary upserts)
with the path before the summaries (the events statement alone), on the loaded database.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import random
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
from asgi_lifespan import LifespanManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import telemetry

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "telemetry_bench_aggregates"
COURSE = "cs101"
STUDENTS = [f"s{number:03d}@uni.edu" for number in range(300)]
NOTEBOOKS = [f"course/week{week}/lab{week}.ipynb" for week in range(1, 6)]
CELLS = {notebook: [str(uuid.uuid4()) for _ in range(20)] for notebook in NOTEBOOKS}
ERRORS = [
    ("NameError", "\x1b[0;31mname 'df' is not defined\x1b[0m"),
    ("TypeError", "unsupported operand type(s) for +: 'int' and 'str'"),
    ("KeyError", "'price'"),
    ("ZeroDivisionError", "division by zero"),
]
CHUNK = 50_000
# What a client posts of a synthetic document.
POSTED = (
    "event_id student_id course_id notebook_path event_type cell_id cell_index status error "
    "source duration_ms"
).split()
COPY_COLUMNS = [
    "event_id", "student_id", "event_type", "occurred_at", "received_at", "course_id",
    "session_id", "notebook_path", "cell_id", "cell_index", "execution_count", "source",
    "status", "error", "duration_ms", "seq", "outputs", "outputs_truncated", "extra",
]  # fmt: skip
ENDPOINTS = [
    ("help queue, 20 hands", "/api/v1/help", {"course_id": COURSE}),
    ("cells, one course", "/api/v1/cells", {"course_id": COURSE}),
    ("cells, one notebook", "/api/v1/cells", {"notebook_path": NOTEBOOKS[2]}),
    ("activity, last hour", "/api/v1/activity", {"course_id": COURSE, "minutes": 60}),
    ("activity, last day", "/api/v1/activity", {"minutes": 1440}),
    ("students, 300", "/api/v1/students", {"course_id": COURSE, "limit": 300}),
    ("events, collapsed", "/api/v1/events", {"course_id": COURSE, "collapse_beats": "true"}),
]


def synthetic_document(number: int, at: dt.datetime, rng: random.Random) -> dict:
    """One event as the service would have stored it; ids follow the load order."""
    student = rng.choice(STUDENTS)
    notebook = rng.choice(NOTEBOOKS)
    roll = rng.random()
    document = {
        "id": number, "event_id": str(uuid.uuid4()), "student_id": student,
        "course_id": COURSE, "notebook_path": notebook, "received_at": at, "occurred_at": at,
        "event_type": "cell_executed", "cell_id": None, "cell_index": None, "status": None,
        "error": None, "source": None, "duration_ms": None, "extra": {},
    }  # fmt: skip
    if roll < 0.85:
        index = rng.randrange(20)
        failed = rng.random() < 0.25
        ename, evalue = rng.choice(ERRORS)
        document.update(
            cell_id=CELLS[notebook][index],
            cell_index=index,
            status="error" if failed else "ok",
            error={"ename": ename, "evalue": evalue, "traceback": []} if failed else None,
            source=f"result = compute({index})",
            duration_ms=rng.random() * 500,
        )
    else:
        document["event_type"] = "help" if roll < 0.95 else "notebook_saved"
    return document


def copy_record(document: dict) -> tuple:
    error = None if document["error"] is None else orjson.dumps(document["error"]).decode()
    return (
        document["event_id"], document["student_id"], document["event_type"],
        document["occurred_at"], document["received_at"], document["course_id"], None,
        document["notebook_path"], document["cell_id"], document["cell_index"], None,
        document["source"], document["status"], error, document["duration_ms"], None, None,
        False, "{}",
    )  # fmt: skip


async def upsert_summaries(
    connection: asyncpg.Connection, documents: list[dict], seen: dict[tuple, dict]
) -> None:
    """What the commit path writes to the summaries, one statement per table per chunk;
    `seen` stands for cell_runs as it was (the loader's own record of it)."""
    by_minute: dict[str, list[dict]] = {}
    for document in documents:
        by_minute.setdefault(telemetry.minute_of(document["received_at"]), []).append(document)
    runs = telemetry.cell_run_rows(documents)
    summaries = {
        "cell_totals": telemetry.cell_total_rows(runs, seen),
        "cell_runs": runs,
        "activity": [
            row
            for minute, group in by_minute.items()
            for row in telemetry.activity_rows(group, [], minute)
        ],
    }
    for run in runs:
        key = tuple(run[column] for column in telemetry.CELL_RUN_KEY)
        seen[key] = {"course_id": run["course_id"] or seen.get(key, {}).get("course_id")}
    for table, rows in summaries.items():
        statement = telemetry.COMMIT_STATEMENTS[telemetry.UPSERT_ARRAYS[table]]
        columns = telemetry.SUMMARY_UPSERTS[table][0]
        arrays = {column: [row[column] for row in rows] for column in columns}
        await connection.fetch(statement.sql, *[arrays[name] for name in statement.names])


async def load(url: str, total: int) -> None:
    """Create the schema through the service, then COPY a week of a class into it."""
    storage = telemetry.Storage(url, pool_size=2)
    await storage.connect()
    await storage.disconnect()
    connection = await asyncpg.connect(url)
    rng = random.Random(11)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=7)
    step = (now - dt.timedelta(minutes=1) - start) / total
    seen = now - dt.timedelta(seconds=5)
    await connection.copy_records_to_table(
        "students",
        records=[
            (student, f"Student {n}", COURSE, f"Team {n % 10 + 1}", start, seen)
            for n, student in enumerate(STUDENTS)
        ],
        columns=["student_id", "name", "course_id", "team", "first_seen", "last_seen"],
    )
    began = time.perf_counter()
    seen: dict[tuple, dict] = {}
    for first in range(1, total + 1, CHUNK):
        documents = [
            synthetic_document(number, start + step * (number - 1), rng)
            for number in range(first, min(first + CHUNK, total + 1))
        ]
        await connection.copy_records_to_table(
            "events", records=[copy_record(d) for d in documents], columns=COPY_COLUMNS
        )
        await upsert_summaries(connection, documents, seen)
        print(f"  loaded {documents[-1]['id']:,} events", file=sys.stderr)
    await connection.execute("ANALYZE")
    stored = await connection.fetchval("SELECT COUNT(*) FROM events")
    print(f"loaded {stored:,} events in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    await connection.close()


async def raise_hands(url: str) -> None:
    """20 hands up now (beats expire in 30 s): their first help events and hand_raises rows."""
    connection = await asyncpg.connect(url)
    after_id = await connection.fetchval("SELECT MAX(id) FROM events")
    at = dt.datetime.now(dt.UTC)
    for offset, student in enumerate(STUDENTS[:20], start=1):
        raised = at - dt.timedelta(seconds=20 - offset)
        await connection.execute(
            "INSERT INTO events (event_id, student_id, event_type, occurred_at, received_at,"
            " course_id, notebook_path, outputs_truncated, extra)"
            " VALUES ($1, $2, 'help', $3, $3, $4, $5, false, '{}')",
            str(uuid.uuid4()), student, raised, COURSE, NOTEBOOKS[0],
        )  # fmt: skip
        await connection.execute(
            "INSERT INTO hand_raises (raise_id, student_id, raised_at, last_beat_at, state)"
            " VALUES ($1, $2, $3, $4, 'up')",
            after_id + offset, student, raised, at,
        )  # fmt: skip
    await connection.close()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# Every student is in cs101: the scoped token reads as much as the unscoped one.
TOKENS = (
    telemetry.Grant("every course", "bench-all"),
    telemetry.Grant("cs101 only", "bench-cs101", frozenset({COURSE})),
)


async def time_endpoints(client: httpx.AsyncClient, calls: int) -> list[tuple]:
    results = []
    for name, path, params in ENDPOINTS:
        for _ in range(10):
            response = await client.get(path, params=params)
            assert response.status_code == 200, response.text
        samples: list[float] = []
        deadline = time.monotonic() + 30  # the slow endpoints: as many calls as fit in 30 s
        while len(samples) < calls and (len(samples) < 10 or time.monotonic() < deadline):
            began = time.perf_counter()
            response = await client.get(path, params=params)
            samples.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200
        size = len(response.content)
        p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
        results.append((name, p50, p99, len(samples), size))
    return results


# STORE_EVENTS without its summary upserts: the commit path before the summary tables.
BEFORE_SUMMARIES = telemetry.AsyncpgStatement.of(
    telemetry.STORE_EVENTS[: telemetry.STORE_EVENTS.index("), executions AS (")]
    + ")"
    + telemetry.STORE_EVENTS[telemetry.STORE_EVENTS.index("\nSELECT 'known'") :]
)


class StorageBeforeSummaries(telemetry.Storage):
    """The commit path as it was before the summary tables: one statement, no hands."""

    async def store(self, events):
        current = telemetry.COMMIT_STATEMENTS[telemetry.STORE_EVENTS]
        telemetry.COMMIT_STATEMENTS[telemetry.STORE_EVENTS] = BEFORE_SUMMARIES
        try:
            writer = await self._writer_connection()
            return await self._store_rows(writer, events, telemetry.statement_rows(events))
        finally:
            telemetry.COMMIT_STATEMENTS[telemetry.STORE_EVENTS] = current


def ingest_batch(rng: random.Random, helps: int) -> list[dict]:
    """50 events as a client posts them: executions, and `helps` help beats."""
    now = dt.datetime.now(dt.UTC)
    raw = []
    while len(raw) < 50 - helps:
        document = synthetic_document(0, now, rng)
        if document["status"] is not None:
            raw.append({key: document[key] for key in POSTED if document[key] is not None})
    raw += [
        {"student_id": rng.choice(STUDENTS), "event_type": "help", "course_id": COURSE}
        for _ in range(helps)
    ]
    events = telemetry.normalise_batch(raw, now, telemetry.Settings())
    return [{**event, "received_at": now} for event in events]


async def time_ingest(storage: telemetry.Storage, url: str, batches: int) -> dict:
    """ms per 50-event batch through Storage.store: executions only, and with 5 help
    beats; each with the summaries and before them, interleaved."""
    before = StorageBeforeSummaries(url, pool_size=2)
    await before.connect()
    rng = random.Random(5)
    samples: dict[tuple[str, str], list[float]] = {}

    for number in range(batches):
        helps = 5 if number % 4 >= 2 else 0
        target = storage if number % 2 == 0 else before
        events = ingest_batch(rng, helps)
        began = time.perf_counter()
        async with target.commit_order():
            await target.store(events)
        kind = (
            "executions only" if helps == 0 else "with 5 help beats",
            "summaries" if target is storage else "before",
        )
        samples.setdefault(kind, []).append((time.perf_counter() - began) * 1000)
    await before.disconnect()
    return {
        kind: (percentile(values, 0.5), percentile(values, 0.99))
        for kind, values in sorted(samples.items())
    }


async def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("databases").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    options = parser.parse_args()
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE
    try:
        await load(url, options.events)
        app = telemetry.create_app(telemetry.Settings(database_url=url, dashboard_tokens=TOKENS))
        began = time.perf_counter()
        async with LifespanManager(app, startup_timeout=600) as manager:
            startup = time.perf_counter() - began
            await raise_hands(url)
            transport = httpx.ASGITransport(app=manager.app)
            endpoints = {}
            for token in TOKENS:
                headers = {"Authorization": f"Bearer {token.secret}"}
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://bench", headers=headers
                ) as client:
                    endpoints[token.name] = await time_endpoints(client, options.calls)
            ingest = await time_ingest(app.state.service.storage, url, options.batches)
    finally:
        if not options.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.close()
    print(f"\n{options.events:,} events, {len(STUDENTS)} students, PostgreSQL")
    print(f"start-up, filling student_counts from the events: {startup:.1f} s")
    for token, results in endpoints.items():
        print(f"\ntoken of {token}")
        print(f"{'endpoint':<22} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6} {'bytes':>8}")
        for name, p50, p99, calls, size in results:
            print(f"{name:<22} {p50:8.1f} {p99:8.1f} {calls:6} {size:8,}")
    print(f"\n{'50-event batch':<32} {'p50 ms':>8} {'p99 ms':>8}")
    for (batch, path), (p50, p99) in ingest.items():
        print(f"{batch + ', ' + path:<32} {p50:8.2f} {p99:8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
