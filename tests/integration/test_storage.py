"""The storage layer against the real PostgreSQL and the SQLite default."""

import asyncio
import datetime as dt

import pytest

from telemetry.config import Settings, normalise_database_url
from telemetry.ingest import normalise_batch
from telemetry.storage import Storage

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def events(*raws: dict) -> list[dict]:
    normalised = normalise_batch(list(raws), NOW, Settings())
    return [{**event, "received_at": NOW} for event in normalised]


async def test_events_are_stored_with_increasing_ids_and_the_student_upserted(storage) -> None:
    batch = await storage.store(
        events(
            {"student_id": "s1", "event_type": "a", "student_name": "Ada", "course_id": "c1"},
            {"student_id": "s1", "event_type": "b", "team": "T"},
        )
    )
    first, second = (item.document for item in batch.results)
    assert second["id"] > first["id"]
    assert second["student_name"] == "Ada" and second["team"] == "T"
    assert second["course_id"] == "c1"  # the student's course when the event names none
    row = await storage.database.fetch_one("SELECT name, course_id, team FROM students")
    assert (row["name"], row["course_id"], row["team"]) == ("Ada", "c1", "T")


async def test_duplicate_event_id_is_stored_once(storage) -> None:
    raw = {"student_id": "s1", "event_type": "a", "event_id": "same"}
    first = (await storage.store(events(raw))).results
    again = (await storage.store(events(raw, raw))).results
    assert [item.duplicate for item in first + again] == [False, True, True]
    assert {item.document["id"] for item in first + again} == {first[0].document["id"]}
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM events") == 1


# Two batches: repeats within a batch and across them, students' fields set bit by bit.
BATCHES = [
    [
        {"event_id": "e1", "student_id": "s1", "student_name": "Ada", "outputs": [{"t": "1"}],
         "extra_field": 1},
        {"event_id": "e2", "student_id": "s1", "team": "red", "course_id": "c1"},
        {"event_id": "e1", "student_id": "s1", "student_name": "Not stored"},
        {"event_id": "e3", "student_id": "s2", "error": "NameError", "cell_index": 4,
         "duration_ms": 2.5},
    ],
    [
        {"event_id": "e2", "student_id": "s1", "student_name": "Not stored either"},
        {"event_id": "e4", "student_id": "s1", "student_name": "Ada L."},
        {"event_id": "e5", "student_id": "s3", "seq": 7},
    ],
]  # fmt: skip


def batch(raws: list[dict]) -> list[dict]:
    return events(*({"event_type": "cell_executed", **raw} for raw in raws))


async def test_repeated_event_ids_answer_the_first_id_as_duplicates(storage) -> None:
    first, second = [(await storage.store(batch(raws))).results for raws in BATCHES]
    assert [item.receipt() for item in first + second] == [
        {"id": 1, "event_id": "e1", "duplicate": False},
        {"id": 2, "event_id": "e2", "duplicate": False},
        {"id": 1, "event_id": "e1", "duplicate": True},
        {"id": 3, "event_id": "e3", "duplicate": False},
        {"id": 2, "event_id": "e2", "duplicate": True},
        {"id": 4, "event_id": "e4", "duplicate": False},
        {"id": 5, "event_id": "e5", "duplicate": False},
    ]
    # Each document shows the student as they are after its batch; a duplicate changes nothing.
    assert (first[1].document["student_name"], first[1].document["team"]) == ("Ada", "red")
    assert (second[1].document["student_name"], second[1].document["team"]) == ("Ada L.", "red")


async def test_postgresql_and_sqlite_store_the_same_documents(
    postgres_database_url, sqlite_database_url
) -> None:
    storages = [Storage(postgres_database_url, 1), Storage(sqlite_database_url, 1)]
    for storage in storages:
        await storage.connect()
    try:
        postgres, sqlite = [[await s.store(batch(raws)) for raws in BATCHES] for s in storages]
        assert postgres == sqlite
        rows = "SELECT * FROM students ORDER BY student_id"
        students = [
            [tuple(row._mapping.values())[:4] for row in await s.database.fetch_all(rows)]
            for s in storages
        ]
        assert students[0] == students[1] and len(students[0]) == 3
    finally:
        for storage in storages:
            await storage.disconnect()


async def test_replay_returns_what_was_broadcast(storage) -> None:
    raw = {
        "student_id": "s1",
        "event_type": "cell_executed",
        "occurred_at": "2026-11-26T11:00:00.123456Z",
        "source": "print('hi')",
        "status": "error",
        "error": {"ename": "E", "evalue": "v", "traceback": ["t"]},
        "outputs": [{"text": "hi", "n": 1.5}],
        "duration_ms": 3,
        "seq": 4,
        "cell_index": 0,
        "custom": {"nested": [1, "two"]},
    }
    stored = await storage.store(events(raw, {"student_id": "s2", "event_type": "x"}))
    live = [item.document for item in stored.results]
    assert await storage.events_after(0, 10) == live
    assert await storage.events_after(live[0]["id"], 10) == live[1:]
    assert await storage.events_after(0, 1) == live[:1]


async def test_replay_gives_the_students_course_as_live_delivery_does(storage) -> None:
    stored = await storage.store(
        events(
            {"student_id": "s1", "event_type": "a", "course_id": "c1"},
            {"student_id": "s1", "event_type": "b"},
        )
    )
    live = [item.document for item in stored.results]
    assert [document["course_id"] for document in live] == ["c1", "c1"]
    assert await storage.events_after(0, 10) == live


async def test_a_batch_follows_the_highest_id_committed_before_it(storage) -> None:
    first = await storage.store(
        events({"student_id": "s", "event_type": "a"}, {"student_id": "s", "event_type": "b"})
    )
    duplicate = {
        "student_id": "s",
        "event_type": "a",
        "event_id": first.results[0].document["event_id"],
    }
    second = await storage.store(events(duplicate, {"student_id": "s", "event_type": "c"}))
    assert (first.follows, second.follows) == (0, first.results[-1].document["id"])
    assert second.results[1].document["id"] > second.follows


async def test_failed_batch_stores_nothing(storage) -> None:
    good = events({"student_id": "s1", "event_type": "a"})[0]
    bad = {**good, "event_id": "other", "event_type": None}  # violates NOT NULL
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error type differs by backend
        await storage.store([good, bad])
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM events") == 0
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM students") == 0


async def test_a_batch_is_committed_when_store_returns_inside_the_commit_order(storage) -> None:
    other = Storage(str(storage.database.url), pool_size=1)
    await other.connect()
    try:
        async with storage.commit_order():
            [stored] = (await storage.store(events({"student_id": "s", "event_type": "a"}))).results
            assert await other.max_event_id() == stored.document["id"]
    finally:
        await other.disconnect()


STAGING_TABLE_SIZE = """SELECT SUM(pg_relation_size(oid)) FROM pg_class
WHERE relname = 'incoming' AND relpersistence = 't'"""


async def test_the_staging_table_does_not_grow_with_the_events_stored(
    postgres_database_url,
) -> None:
    # Autovacuum never visits temporary tables: unvacuumed, each batch scans all before it.
    storage = Storage(postgres_database_url, pool_size=2)
    await storage.connect()
    try:
        sizes = []
        for number in range(12):
            batch = [{"student_id": f"s{n % 40}", "event_type": "a", "cell_index": n % 9,
                      "status": "ok", "event_id": f"{number}-{n}"} for n in range(500)]  # fmt: skip
            async with storage.commit_order():
                await storage.store(events(*batch))
            sizes.append(await storage.database.fetch_val(STAGING_TABLE_SIZE))
        assert max(sizes[4:]) <= 2 * max(sizes[:4]), sizes
    finally:
        await storage.disconnect()


async def test_schema_applies_again_safely(storage) -> None:
    await storage.apply_schema()
    assert await storage.max_event_id() == 0


async def test_several_connections_can_apply_the_schema_at_once(postgres_database_url) -> None:
    storages = [Storage(postgres_database_url, pool_size=1) for _ in range(4)]
    try:
        await asyncio.gather(*(storage.connect() for storage in storages))
        tables = await storages[0].database.fetch_all(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert [row._mapping["tablename"] for row in tables] == [
        "active_minutes", "activity", "activity_teams", "cell_runs", "events", "hand_endings",
        "hand_raises", "student_counts",
        "students",
    ]  # fmt: skip
    finally:
        for storage in storages:
            await storage.disconnect()


async def test_sslmode_in_the_url_is_enforced_not_ignored(postgres_database_url) -> None:
    url = normalise_database_url(postgres_database_url + "?sslmode=require")
    storage = Storage(url, pool_size=1)
    with pytest.raises(Exception, match="(?i)ssl"):
        await storage.connect()
