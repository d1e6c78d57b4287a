"""How long the storage layer takes to store one group-committed batch, and what part of
that is the Python replay of the documents (`batch_results`), on PostgreSQL and SQLite.

    /work/venv/bin/python bench/store_batches.py [--batches 200]

Creates and drops its own PostgreSQL database (`BENCH_PG_ADMIN`, default the local server)
and a SQLite file in a temporary directory. Each batch holds new events of 20 students, one
repeated event id, and names set on some events, as a classroom posts them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import telemetry

PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BATCH_SIZES = (1, 50, 500)


def make_batch(size: int) -> list[dict]:
    now = dt.datetime.now(dt.UTC)
    raws = [
        {"student_id": f"s{n % 20}", "event_type": "cell_executed", "event_id": uuid.uuid4().hex,
         "student_name": f"Student {n % 20}" if n % 7 == 0 else None, "source": "x = 1\n" * 10}
        for n in range(size)
    ]  # fmt: skip
    if size > 1:
        raws[-1]["event_id"] = raws[0]["event_id"]
    events = telemetry.normalise_batch(raws, now, telemetry.Settings(max_batch_events=size))
    return [{**event, "received_at": now} for event in events]


def replay_seconds(events: list[dict], stored: list[telemetry.StoredEvent]) -> float:
    """batch_results alone, fed what the statement answered for this batch."""
    inserted = {item.document["event_id"]: item.document["id"] for item in stored}
    fresh = telemetry.first_occurrences(events, {})
    started = time.perf_counter()
    telemetry.batch_results(events, fresh, {}, inserted, {})
    return time.perf_counter() - started


async def measure(storage: telemetry.Storage, size: int, batches: int) -> tuple[float, float]:
    """Median milliseconds per batch: the whole store, and the replay within it."""
    store, replay = [], []
    for _ in range(batches):
        events = make_batch(size)
        started = time.perf_counter()
        async with storage.commit_order():
            stored = await storage.store(events)
        store.append(time.perf_counter() - started)
        replay.append(replay_seconds(events, stored.results))
    return statistics.median(store) * 1000, statistics.median(replay) * 1000


async def main(batches: int) -> None:
    name = f"telemetry_bench_store_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory() as directory:
            urls = {
                "PostgreSQL": PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name,
                "SQLite": f"sqlite:///{Path(directory) / 'bench.db'}",
            }
            print(f"{'database':<11} {'events':>6} {'store ms':>9} {'replay ms':>10}")
            for label, url in urls.items():
                storage = telemetry.Storage(url, pool_size=2)
                await storage.connect()
                try:
                    for size in BATCH_SIZES:
                        store_ms, replay_ms = await measure(storage, size, batches)
                        print(f"{label:<11} {size:>6} {store_ms:>9.2f} {replay_ms:>10.3f}")
                finally:
                    await storage.disconnect()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="batches per size (median)")
    asyncio.run(main(parser.parse_args().batches))
