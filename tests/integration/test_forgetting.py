"""Erasure and retention in the storage layer, on PostgreSQL and SQLite: nothing of the
forgotten stays in any table, and the class summaries equal those of a database that never
held it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.cellview import cells
from telemetry.classview import activity
from telemetry.config import Settings
from telemetry.forgetting import FORGOTTEN_TABLES, erase_course, erase_student, retain
from telemetry.ingest import normalise_batch
from telemetry.storage import Storage
from telemetry.studentview import students_page
from tests.conftest import fresh_postgres_database, wait_for

T0 = dt.datetime(2026, 11, 26, 9, 0, 30, tzinfo=dt.UTC)
ADA, BOB, CY = "ada@uni.edu", "bob@uni.edu", "cy@uni.edu"
C1, C2 = "course-one", "course-two"
NAMES = {ADA: "Ada Lovelace", BOB: "Bob Stone", CY: "Cy Young"}
TEAMS = {ADA: "Red", BOB: "Red"}  # Cy has none: activity_teams counts Ada's and Bob's


def run(student: str, course: str | None, notebook: str, cell: str, status: str) -> dict:
    return {
        "student_id": student,
        "student_name": NAMES[student],
        "team": TEAMS.get(student),
        "event_type": "cell_executed",
        "course_id": course,
        "notebook_path": notebook,
        "cell_id": cell,
        "cell_index": int(cell[-1]),
        "status": status,
        "error": {"ename": "NameError", "evalue": "x"} if status == "error" else None,
    }


def raise_hand(student: str, course: str | None) -> dict:
    return {"student_id": student, "event_type": "help", "course_id": course}


# A class of three, in batches a minute apart. Cy works in C2, then in C1, so C1 is Cy's
# course; Ada's second run names no course and belongs to C1 through her.
CLASS = [
    [
        run(ADA, C1, "lists.ipynb", "cell1", "error"),
        run(BOB, C1, "lists.ipynb", "cell1", "ok"),
        run(CY, C2, "loops.ipynb", "cell1", "error"),
    ],
    [
        raise_hand(ADA, C1),
        {**raise_hand(ADA, C1), "event_type": "help_stop"},
        run(ADA, None, "lists.ipynb", "cell1", "error"),
        run(BOB, C1, "lists.ipynb", "cell2", "error"),
        run(CY, C1, "lists.ipynb", "cell1", "ok"),
    ],
    [
        run(ADA, C1, "lists.ipynb", "cell2", "ok"),
        raise_hand(BOB, C1),
        raise_hand(CY, C1),
    ],
]


async def store(storage: Storage, batches: Iterable[list[dict]], start: dt.datetime) -> None:
    for minute, raws in enumerate(batches):
        at = start + dt.timedelta(minutes=minute)
        if raws:
            events = normalise_batch(raws, at, Settings())
            await storage.store([{**event, "received_at": at} for event in events])


def only(keep, batches: list[list[dict]]) -> list[list[dict]]:
    return [[raw for raw in raws if keep(raw)] for raws in batches]


@pytest.fixture
async def twin(database_url: str, tmp_path: Path) -> AsyncIterator[Storage]:
    """A second, empty database on the same backend: what a database that never held the
    forgotten events looks like."""

    async def connected(url: str) -> Storage:
        storage = Storage(url, pool_size=3)
        await storage.connect()
        return storage

    if database_url.startswith("sqlite"):
        storage = await connected(f"sqlite:///{tmp_path / 'twin.db'}")
        try:
            yield storage
        finally:
            await storage.disconnect()
        return
    async with fresh_postgres_database() as url:
        storage = await connected(url)
        try:
            yield storage
        finally:
            await storage.disconnect()


async def every_row(storage: Storage) -> dict[str, list[dict]]:
    return {
        table: [
            dict(row._mapping) for row in await storage.database.fetch_all(f"SELECT * FROM {table}")
        ]
        for table in FORGOTTEN_TABLES
    }


async def mentions(storage: Storage, *texts: str) -> list[tuple[str, dict]]:
    """Every row, in every table, with any of `texts` in any column."""
    return [
        (table, row)
        for table, rows in (await every_row(storage)).items()
        for row in rows
        if any(text in str(value) for value in row.values() for text in texts)
    ]


# Columns that differ between two databases holding the same story: ids and sighting times,
# and the status that follows them.
LOCAL_COLUMNS = {
    "id",
    "last_event_id",
    "raise_id",
    "first_seen",
    "last_seen",
    "event_id",
    "status",
    "stalled",
    "stalled_since",
}  # these three follow last_seen


async def class_view(storage: Storage) -> dict:
    """The summaries, the students and the aggregates, without database-local ids."""
    rows = await every_row(storage)
    view = {
        table: sorted(
            (tuple(sorted((k, str(v)) for k, v in row.items() if k not in LOCAL_COLUMNS)))
            for row in rows[table]
        )
        for table in FORGOTTEN_TABLES
        if table != "events"
    }
    view["cells"] = await cells(
        storage, {"course_id": None, "notebook_path": None, "limit": 200, "courses": None}
    )
    for course in (None, C1, C2):
        view[f"activity {course}"] = await activity(
            storage,
            {"course_id": course, "minutes": 10, "courses": None},
            T0 + dt.timedelta(minutes=5),
        )
    students = await students_page(
        storage,
        {"after": "", "course_id": None, "team": None, "limit": 100, "courses": None},
        T0 + dt.timedelta(minutes=3),
    )
    view["students"] = [
        {k: v for k, v in student.items() if k not in LOCAL_COLUMNS} for student in students
    ]
    return view


async def test_an_erased_student_is_in_no_table_and_the_class_view_forgets_them(
    storage, twin
) -> None:
    await store(storage, CLASS, T0)
    deleted = await erase_student(storage, ADA)
    assert deleted == {
        "events": 5, "students": 1, "cell_runs": 2, "hand_raises": 1, "hand_endings": 1,
        "student_counts": 1, "activity": 0, "activity_teams": 0, "active_minutes": 3,
    }  # fmt: skip
    assert await mentions(storage, ADA, NAMES[ADA]) == []
    await store(twin, only(lambda raw: raw["student_id"] != ADA, CLASS), T0)
    assert await class_view(storage) == await class_view(twin)


async def test_erasing_the_only_student_of_a_cell_and_course_removes_them(storage, twin) -> None:
    lonely = [[run(ADA, "course-nine", "alone.ipynb", "cell1", "error")], *CLASS]
    await store(storage, lonely, T0)
    deleted = await erase_student(storage, ADA)
    assert (deleted["cell_runs"], deleted["activity"], deleted["activity_teams"]) == (3, 1, 1)
    assert await mentions(storage, ADA, NAMES[ADA], "course-nine", "alone.ipynb") == []
    await store(twin, only(lambda raw: raw["student_id"] != ADA, lonely), T0)
    assert await class_view(storage) == await class_view(twin)


async def test_erasing_an_unknown_student_deletes_nothing(storage) -> None:
    await store(storage, CLASS, T0)
    before = await every_row(storage)
    assert set((await erase_student(storage, "nobody")).values()) == {0}
    assert await every_row(storage) == before


async def test_an_erased_student_seen_again_is_a_new_sighting(storage) -> None:
    await store(storage, CLASS, T0)
    await erase_student(storage, ADA)
    await store(storage, [[run(ADA, C1, "lists.ipynb", "cell1", "ok")]], T0 + dt.timedelta(hours=1))
    (ada,) = [
        student
        for student in await students_page(
            storage,
            {"after": "", "course_id": None, "team": None, "limit": 100, "courses": None},
            T0 + dt.timedelta(hours=1),
        )
        if student["student_id"] == ADA
    ]
    assert (ada["event_count"], ada["execution_count"], ada["error_count"]) == (1, 1, 0)


async def test_an_erased_course_keeps_only_its_students_other_courses(storage, twin) -> None:
    await store(storage, CLASS, T0)
    deleted = await erase_course(storage, C1)
    assert (deleted["events"], deleted["students"], deleted["student_counts"]) == (10, 2, 2)
    assert await mentions(storage, ADA, BOB, NAMES[ADA], NAMES[BOB], C1, "lists.ipynb") == []
    # Cy stays, with the C2 run alone, and C2 as course.
    await store(twin, only(lambda raw: raw.get("course_id") == C2, CLASS), T0)
    assert await class_view(storage) == await class_view(twin)
    assert await storage.student_course(CY) == (True, C2)


async def test_retention_deletes_what_was_received_before_the_cutoff_in_bounded_batches(
    storage, twin
) -> None:
    cutoff = T0 + dt.timedelta(days=1)
    old = [[run(ADA, C1, "lists.ipynb", f"cell{n % 3}", "error") for n in range(7)]]
    old += [[run(BOB, C1, "lists.ipynb", "cell1", "ok"), raise_hand(BOB, C1)]]
    old += [[run(BOB, C1, "lists.ipynb", "cell2", "error")]]
    await store(storage, old, cutoff - dt.timedelta(seconds=1) - dt.timedelta(minutes=2))
    new = [
        [
            run(BOB, C1, "lists.ipynb", "cell1", "error"),
            run(CY, C2, "loops.ipynb", "cell1", "ok"),
        ]
    ]
    await store(storage, new, cutoff + dt.timedelta(seconds=1))
    totals = await retain(storage, cutoff, batch_size=3)
    assert totals is not None
    assert (totals["events"], totals["batches"]) == (10, 4)  # 3 + 3 + 3 + 1
    assert (totals["students"], totals["hand_raises"]) == (1, 1)  # Ada had nothing newer
    assert await mentions(storage, ADA, NAMES[ADA]) == []
    await store(twin, new, cutoff + dt.timedelta(seconds=1))
    assert await class_view(storage) == await class_view(twin)
    again = await retain(storage, cutoff, batch_size=3)
    assert again is not None and (again["events"], again["batches"]) == (0, 1)


async def test_events_received_exactly_at_the_cutoff_are_kept(storage) -> None:
    cutoff = T0 + dt.timedelta(days=1)
    await store(
        storage, [[run(ADA, C1, "a.ipynb", "cell1", "ok")]], cutoff - dt.timedelta(microseconds=1)
    )
    await store(storage, [[run(BOB, C1, "a.ipynb", "cell1", "ok")]], cutoff)
    totals = await retain(storage, cutoff, batch_size=1_000)
    assert totals is not None and totals["events"] == 1
    rows = await storage.database.fetch_all("SELECT student_id FROM events")
    assert [row._mapping["student_id"] for row in rows] == [BOB]


async def test_one_retention_pass_at_a_time_across_processes(postgres_database_url) -> None:
    first, second = (Storage(postgres_database_url, pool_size=3) for _ in range(2))
    await first.connect()
    await second.connect()
    try:
        async with first.database.connection() as connection:
            await connection.execute("SELECT pg_advisory_lock(:key)", {"key": 0x7E1E_DE1E})
            assert await retain(second, T0, batch_size=10) is None
            await connection.execute("SELECT pg_advisory_unlock(:key)", {"key": 0x7E1E_DE1E})
        assert await retain(second, T0, batch_size=10) is not None
    finally:
        await first.disconnect()
        await second.disconnect()


async def test_the_service_forgets_old_events_at_start_and_logs_the_pass(
    database_url, caplog
) -> None:
    now = dt.datetime.now(dt.UTC)
    storage = Storage(database_url, pool_size=3)
    await storage.connect()
    try:
        await store(
            storage, [[run(ADA, C1, "a.ipynb", "cell1", "ok")]] * 2, now - dt.timedelta(days=2)
        )
        await store(
            storage, [[run(BOB, C1, "a.ipynb", "cell1", "ok")]], now - dt.timedelta(hours=23)
        )
    finally:
        await storage.disconnect()
    app = create_app(Settings(database_url=database_url, retention_days=1))
    with caplog.at_level(logging.INFO, logger="telemetry"):
        async with LifespanManager(app):
            await wait_for(lambda: any("retention:" in r.getMessage() for r in caplog.records))
            rows = await app.state.service.storage.database.fetch_all(
                "SELECT student_id FROM events"
            )
    assert [row._mapping["student_id"] for row in rows] == [BOB]
    (line,) = [r.getMessage() for r in caplog.records if "retention:" in r.getMessage()]
    assert line.startswith("retention: deleted 2 events, 1 students,"), line


# Each summary against what it summarises: rows that disagree.
INCONSISTENCIES = {
    "student_counts": """
        SELECT c.student_id FROM student_counts c
        LEFT JOIN (SELECT student_id, COUNT(*) AS n FROM events GROUP BY student_id) e
            ON e.student_id = c.student_id
        WHERE COALESCE(e.n, 0) <> c.events""",
    "students": """
        SELECT s.student_id FROM students s
        WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.student_id = s.student_id)
        UNION ALL
        SELECT e.student_id FROM events e
        WHERE NOT EXISTS (SELECT 1 FROM students s WHERE s.student_id = e.student_id)""",
    "cell_runs": """
        SELECT c.student_id FROM cell_runs c
        LEFT JOIN (SELECT student_id, notebook_path, cell_id, COUNT(*) AS n FROM events
                   WHERE status IS NOT NULL GROUP BY student_id, notebook_path, cell_id) e
            ON e.student_id = c.student_id AND e.notebook_path = c.notebook_path
            AND e.cell_id = c.cell_key
        WHERE COALESCE(e.n, 0) <> c.runs""",
}


async def test_erasure_racing_ingest_of_the_same_student_leaves_every_summary_true(api) -> None:
    storage = api.service.storage

    async def keep_posting() -> None:
        for n in range(30):
            batch = [run(ADA, C1, "lists.ipynb", f"cell{n % 3}", "error"),
                     run(BOB, C1, "lists.ipynb", "cell1", "ok")]  # fmt: skip
            assert (await api.post("/api/v1/events", json=batch)).status_code == 201

    async def keep_erasing() -> None:
        for _ in range(15):
            await erase_student(storage, ADA)

    await asyncio.gather(keep_posting(), keep_erasing(), keep_erasing())
    for summary, sql in INCONSISTENCIES.items():
        assert await storage.database.fetch_all(sql) == [], summary
