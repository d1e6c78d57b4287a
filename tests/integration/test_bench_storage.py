"""The set-based PostgreSQL batch path (issue 5) against the one-event-at-a-time path."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

import telemetry

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RECEIVED_AT = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


async def open_storage(admin: asyncpg.Connection) -> telemetry.Storage:
    name = f"telemetry_bench_test_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    storage = telemetry.Storage(ADMIN_URL.rsplit("/", 1)[0] + "/" + name, pool_size=2)
    await storage.connect()
    storage.database_name = name
    return storage


@pytest.fixture
async def storages() -> AsyncIterator[tuple[telemetry.Storage, telemetry.Storage]]:
    """Two fresh PostgreSQL databases: one for the batch path, one for the per-event path."""
    admin = await asyncpg.connect(ADMIN_URL)
    opened = [await open_storage(admin), await open_storage(admin)]
    try:
        yield opened[0], opened[1]
    finally:
        for storage in opened:
            await storage.disconnect()
            await admin.execute(f'DROP DATABASE IF EXISTS "{storage.database_name}" WITH (FORCE)')
        await admin.close()


def event(event_id: str, student_id: str, **fields: object) -> dict:
    settings = telemetry.Settings()
    errors = telemetry.FieldErrors()
    raw = {"event_id": event_id, "student_id": student_id, "event_type": "cell_executed"}
    normalised = telemetry.normalise_event(
        {**raw, **fields}, "event", RECEIVED_AT, settings, errors
    )
    assert normalised is not None, errors.details
    return {**normalised, "received_at": RECEIVED_AT}


BATCHES = [
    [
        event("e1", "s1", student_name="Ada", outputs=[{"text": "1"}], extra_field=1),
        event("e2", "s1", team="red", course_id="c1"),
        event("e1", "s1", student_name="Not stored"),
        event("e3", "s2", error="NameError", cell_index=4, duration_ms=2.5),
    ],
    [
        event("e2", "s1", student_name="Not stored either"),
        event("e4", "s1", student_name="Ada L."),
        event("e5", "s3", seq=7),
    ],
]


async def store_one_by_one(storage: telemetry.Storage, events: list[dict]) -> list:
    async with storage.database.connection() as connection:
        async with connection.transaction():
            return [await storage._store_one(connection, item) for item in events]


async def students(storage: telemetry.Storage) -> list[tuple]:
    rows = await storage.database.fetch_all("SELECT * FROM students ORDER BY student_id")
    return [tuple(row._mapping.values()) for row in rows]


async def publish_nothing(stored: list) -> None:
    return None


async def test_batches_store_what_one_by_one_stores(storages) -> None:
    batch_path, per_event_path = storages
    for batch in BATCHES:
        stored = await batch_path.store(batch, publish_nothing)
        expected = await store_one_by_one(per_event_path, batch)
        assert stored == expected
    assert await students(batch_path) == await students(per_event_path)
    assert await batch_path.events_after(0, 100) == await per_event_path.events_after(0, 100)


async def test_repeated_event_id_in_one_batch_is_a_duplicate_of_the_first(storages) -> None:
    batch_path, _ = storages
    stored = await batch_path.store(BATCHES[0], publish_nothing)
    assert [item.receipt() for item in stored] == [
        {"id": 1, "event_id": "e1", "duplicate": False},
        {"id": 2, "event_id": "e2", "duplicate": False},
        {"id": 1, "event_id": "e1", "duplicate": True},
        {"id": 3, "event_id": "e3", "duplicate": False},
    ]
    assert stored[1].document["student_name"] == "Ada"
    assert stored[1].document["team"] == "red"


async def test_event_ids_stored_by_an_earlier_batch_are_duplicates(storages) -> None:
    batch_path, _ = storages
    await batch_path.store(BATCHES[0], publish_nothing)
    published: list = []

    async def publish(stored: list) -> None:
        published.extend(item.document for item in stored if not item.duplicate)

    stored = await batch_path.store(BATCHES[1], publish)
    assert [(item.receipt()["id"], item.duplicate) for item in stored] == [
        (2, True),
        (4, False),
        (5, False),
    ]
    assert [document["id"] for document in published] == [4, 5]
