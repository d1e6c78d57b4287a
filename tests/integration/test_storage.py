"""The storage layer against the real PostgreSQL and the SQLite default."""

import asyncio
import datetime as dt

import pytest

from telemetry import Settings, Storage, normalise_batch

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def events(*raws: dict) -> list[dict]:
    normalised = normalise_batch(list(raws), NOW, Settings())
    return [{**event, "received_at": NOW} for event in normalised]


async def no_publish(stored) -> None:
    return None


async def test_events_are_stored_with_increasing_ids_and_the_student_upserted(storage) -> None:
    stored = await storage.store(
        events(
            {"student_id": "s1", "event_type": "a", "student_name": "Ada", "course_id": "c1"},
            {"student_id": "s1", "event_type": "b", "team": "T"},
        ),
        no_publish,
    )
    first, second = (item.document for item in stored)
    assert second["id"] > first["id"]
    assert second["student_name"] == "Ada" and second["team"] == "T"
    assert second["course_id"] == "c1"  # the student's course when the event names none
    row = await storage.database.fetch_one("SELECT name, course_id, team FROM students")
    assert (row["name"], row["course_id"], row["team"]) == ("Ada", "c1", "T")


async def test_duplicate_event_id_is_stored_once(storage) -> None:
    raw = {"student_id": "s1", "event_type": "a", "event_id": "same"}
    first = await storage.store(events(raw), no_publish)
    again = await storage.store(events(raw, raw), no_publish)
    assert [item.duplicate for item in first + again] == [False, True, True]
    assert {item.document["id"] for item in first + again} == {first[0].document["id"]}
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM events") == 1


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
    stored = await storage.store(events(raw, {"student_id": "s2", "event_type": "x"}), no_publish)
    live = [item.document for item in stored]
    assert await storage.events_after(0, 10) == live
    assert await storage.events_after(live[0]["id"], 10) == live[1:]
    assert await storage.events_after(0, 1) == live[:1]


async def test_replay_gives_the_students_course_as_live_delivery_does(storage) -> None:
    stored = await storage.store(
        events(
            {"student_id": "s1", "event_type": "a", "course_id": "c1"},
            {"student_id": "s1", "event_type": "b"},
        ),
        no_publish,
    )
    live = [item.document for item in stored]
    assert [document["course_id"] for document in live] == ["c1", "c1"]
    assert await storage.events_after(0, 10) == live


async def test_failed_batch_stores_nothing(storage) -> None:
    good = events({"student_id": "s1", "event_type": "a"})[0]
    bad = {**good, "event_id": "other", "event_type": None}  # violates NOT NULL
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error type differs by backend
        await storage.store([good, bad], no_publish)
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM events") == 0
    assert await storage.database.fetch_val("SELECT COUNT(*) FROM students") == 0


async def test_after_commit_runs_with_the_new_rows_committed(storage) -> None:
    seen = []

    async def publish(stored) -> None:
        seen.append(await storage.max_event_id())

    stored = await storage.store(events({"student_id": "s", "event_type": "a"}), publish)
    assert seen == [stored[0].document["id"]]


async def test_schema_applies_again_safely(storage) -> None:
    await storage.apply_schema()
    assert await storage.max_event_id() == 0


async def test_several_processes_can_apply_the_schema_at_once(postgres_database_url) -> None:
    storages = [Storage(postgres_database_url, pool_size=1) for _ in range(4)]
    await asyncio.gather(*(storage.connect() for storage in storages))
    for storage in storages:
        await storage.disconnect()


async def test_sslmode_in_the_url_is_enforced_not_ignored(postgres_database_url) -> None:
    from telemetry import normalise_database_url

    url = normalise_database_url(postgres_database_url + "?sslmode=require")
    storage = Storage(url, pool_size=1)
    with pytest.raises(Exception, match="(?i)ssl"):
        await storage.connect()
