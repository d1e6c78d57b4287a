"""Forgetting: erasure of a student or a course, and retention, from the events and from the
summaries, each in one transaction under the commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from telemetry.classview import format_timestamp
from telemetry.events import EARLIEST_OCCURRED_AT
from telemetry.storage import RECEIPT_MINUTE, UNLOCK, Storage
from telemetry.summaries import CELL_KEY

logger = logging.getLogger(__name__)

# The rows deleted per table, in the order erasure answers and retention logs them.
FORGOTTEN_TABLES = (
    "events", "students", "cell_runs", "hand_raises", "hand_endings", "student_counts",
    "activity", "activity_teams", "active_minutes",
)  # fmt: skip

# The doomed events, with the keys of the summary rows that counted them at ingest: the
# course and team their document shows, the minute, the cell; `raised` if a hand bears their
# id. The team is the student's now: one who changed team since keeps counts in the old one.
CREATE_DOOMED = """
CREATE TEMP TABLE IF NOT EXISTS doomed (
    id BIGINT PRIMARY KEY, student_id TEXT, course_id TEXT, minute TEXT, notebook_path TEXT,
    cell_key TEXT, status TEXT, raised INTEGER, team TEXT
)"""

DOOMED_COLUMNS = f"""
e.id, e.student_id, COALESCE(e.course_id, s.course_id, ''), {RECEIPT_MINUTE},
COALESCE(e.notebook_path, ''), {CELL_KEY}, e.status,
CASE WHEN EXISTS (SELECT 1 FROM hand_raises h WHERE h.raise_id = e.id) THEN 1 ELSE 0 END,
s.team FROM events e JOIN students s ON s.student_id = e.student_id"""

# A student's events; a course's (those naming it, and those naming none of the students
# whose course it is, as its dashboards show them); the oldest batch received before a
# cutoff, from where the last batch ended, sparing a walk over the index's deleted entries.
DOOMED = {
    "student": f"SELECT {DOOMED_COLUMNS} WHERE e.student_id = :subject",
    "course": f"""SELECT {DOOMED_COLUMNS} WHERE e.course_id = :subject
        UNION ALL SELECT {DOOMED_COLUMNS} WHERE s.course_id = :subject AND e.course_id IS NULL""",
    "expired": f"""SELECT {DOOMED_COLUMNS}
        WHERE e.received_at < :cutoff AND (e.received_at, e.id) > (:after_at, :after_id)
        ORDER BY e.received_at, e.id LIMIT :batch_size""",
}

# The summaries lose what the doomed events added to them, by the same keys: counting them
# anew would read every event left of their students, in every retention batch.
SUBTRACT_DOOMED = [
    """UPDATE student_counts SET events = student_counts.events - d.events,
        executions = student_counts.executions - d.executions,
        errors = student_counts.errors - d.errors
    FROM (SELECT student_id, COUNT(*) AS events, COUNT(status) AS executions,
                 COUNT(*) FILTER (WHERE status = 'error') AS errors
          FROM doomed GROUP BY student_id) d
    WHERE student_counts.student_id = d.student_id""",
    """UPDATE cell_runs SET runs = cell_runs.runs - d.runs, errors = cell_runs.errors - d.errors
    FROM (SELECT student_id, notebook_path, cell_key, COUNT(*) AS runs,
                 COUNT(*) FILTER (WHERE status = 'error') AS errors
          FROM doomed WHERE status IS NOT NULL GROUP BY student_id, notebook_path, cell_key) d
    WHERE cell_runs.student_id = d.student_id AND cell_runs.notebook_path = d.notebook_path
      AND cell_runs.cell_key = d.cell_key""",
    """UPDATE activity SET executions = activity.executions - d.executions,
        errors = activity.errors - d.errors, help = activity.help - d.help
    FROM (SELECT course_id, minute, COUNT(status) AS executions,
                 COUNT(*) FILTER (WHERE status = 'error') AS errors, SUM(raised) AS help
          FROM doomed GROUP BY course_id, minute) d
    WHERE activity.course_id = d.course_id AND activity.minute = d.minute""",
    """UPDATE activity_teams SET executions = activity_teams.executions - d.executions,
        errors = activity_teams.errors - d.errors, help = activity_teams.help - d.help
    FROM (SELECT course_id, team, minute, COUNT(status) AS executions,
                 COUNT(*) FILTER (WHERE status = 'error') AS errors, SUM(raised) AS help
          FROM doomed WHERE team IS NOT NULL GROUP BY course_id, team, minute) d
    WHERE activity_teams.course_id = d.course_id AND activity_teams.team = d.team
      AND activity_teams.minute = d.minute""",
]

# Then the rows left with nothing to count go, and the students left with no event. A run
# summary whose latest run is doomed goes too: it would show that run's error.
DELETE_FORGOTTEN = {
    "hand_raises": "DELETE FROM hand_raises WHERE raise_id IN (SELECT id FROM doomed) RETURNING 1",
    "hand_endings": """DELETE FROM hand_endings WHERE raise_id IN (SELECT id FROM doomed)
        RETURNING 1""",
    "events": "DELETE FROM events WHERE id IN (SELECT id FROM doomed) RETURNING received_at, id",
    # Read after the events went: a minute of a student's stays while any event of it does.
    "active_minutes": f"""DELETE FROM active_minutes WHERE (course_id, minute, student_id)
            IN (SELECT course_id, minute, student_id FROM doomed)
        AND NOT EXISTS (SELECT 1 FROM events e JOIN students s ON s.student_id = e.student_id
            WHERE e.student_id = active_minutes.student_id
              AND {RECEIPT_MINUTE} = active_minutes.minute
              AND COALESCE(e.course_id, s.course_id, '') = active_minutes.course_id) RETURNING 1""",
    "cell_runs": """DELETE FROM cell_runs WHERE (student_id, notebook_path, cell_key)
            IN (SELECT student_id, notebook_path, cell_key FROM doomed)
        AND (runs <= 0 OR last_event_id IN (SELECT id FROM doomed)) RETURNING 1""",
    "activity": """DELETE FROM activity WHERE (course_id, minute)
            IN (SELECT course_id, minute FROM doomed)
        AND executions <= 0 AND help <= 0 RETURNING 1""",
    "activity_teams": """DELETE FROM activity_teams WHERE (course_id, team, minute)
            IN (SELECT course_id, team, minute FROM doomed)
        AND executions <= 0 AND help <= 0 RETURNING 1""",
    "student_counts": """DELETE FROM student_counts
        WHERE student_id IN (SELECT student_id FROM doomed) AND events <= 0 RETURNING 1""",
    "students": """DELETE FROM students WHERE student_id IN (SELECT student_id FROM doomed)
        AND NOT EXISTS (SELECT 1 FROM student_counts c WHERE c.student_id = students.student_id)
        RETURNING 1""",
}

# A student of an erased course who stays takes the course of their latest remaining event.
REASSIGN_COURSE = """
UPDATE students SET course_id = (
    SELECT e.course_id FROM events e
    WHERE e.student_id = students.student_id AND e.course_id IS NOT NULL
    ORDER BY e.id DESC LIMIT 1
) WHERE course_id = :course"""


async def forget(
    storage: Storage, scope: str, params: dict[str, Any]
) -> tuple[dict[str, int], tuple[Any, int] | None]:
    """Forget the DOOMED events of a scope in one transaction: the rows deleted per table,
    and the (received_at, id) of the last doomed event."""
    async with storage.exclusive() as connection:
        for sql in (CREATE_DOOMED, "DELETE FROM doomed"):
            await storage.execute(sql, {}, connection)
        await storage.execute(f"INSERT INTO doomed {DOOMED[scope]}", params, connection)
        for sql in SUBTRACT_DOOMED:
            await storage.execute(sql, {}, connection)
        gone = {}
        for table, sql in DELETE_FORGOTTEN.items():
            gone[table] = await storage.rows(sql, {}, connection)
        await storage.execute(REASSIGN_COURSE, {"course": params.get("course")}, connection)
    last = max(((row["received_at"], row["id"]) for row in gone["events"]), default=None)
    return {table: len(gone[table]) for table in FORGOTTEN_TABLES}, last


async def erase_student(storage: Storage, student_id: str) -> dict[str, int]:
    """Delete every row of a student from every table and take them out of the class
    summaries, in one transaction: the rows deleted per table. A later event of theirs
    is a new sighting."""
    return (await forget(storage, "student", {"subject": student_id}))[0]


async def erase_course(storage: Storage, course_id: str) -> dict[str, int]:
    """Delete a course's events and summaries, and its students left with no event (see
    DOOMED), in one transaction: the rows deleted per table. A student who has events
    elsewhere stays, with the course of their latest."""
    return (await forget(storage, "course", {"subject": course_id, "course": course_id}))[0]


# One retention pass at a time across processes, by a lock the others do not wait for.
RETENTION_LOCK_KEY = 0x7E1E_DE1E
TRY_LOCK = "SELECT pg_try_advisory_lock(:key) AS locked"


@contextlib.asynccontextmanager
async def one_pass_at_a_time(storage: Storage) -> AsyncIterator[bool]:
    # On PostgreSQL a session lock, on the connection the pass's transactions then use.
    if not storage.is_postgres:  # one process: config.py refuses workers without Redis
        yield True
        return
    key = {"key": RETENTION_LOCK_KEY}
    async with storage.database.connection() as connection:
        [row] = await storage.rows(TRY_LOCK, key, connection)
        try:
            yield row["locked"]
        finally:
            if row["locked"]:
                await storage.execute(UNLOCK, key, connection)


async def retain(storage: Storage, cutoff: dt.datetime, batch_size: int) -> dict[str, int] | None:
    """One retention pass: forget the events received before `cutoff`, with their students'
    rows if nothing else is left of them, `batch_size` oldest at a time, each batch in one
    short transaction, until one comes back short. The rows deleted per table and the
    batches taken; None while another process runs a pass."""
    async with one_pass_at_a_time(storage) as mine:
        if not mine:
            return None
        totals = dict.fromkeys((*FORGOTTEN_TABLES, "batches"), 0)
        params = {"cutoff": storage.db_time(cutoff), "batch_size": batch_size, "after_id": 0}
        params["after_at"] = storage.db_time(EARLIEST_OCCURRED_AT)
        while True:
            started = time.monotonic()
            deleted, last = await forget(storage, "expired", params)
            # Rest as long as the batch took: ingest gets the commit order, and the
            # database's share of the CPU, at least half the time.
            await asyncio.sleep(time.monotonic() - started)
            totals["batches"] += 1
            for table, count in deleted.items():
                totals[table] += count
            if deleted["events"] < batch_size:
                return totals
            params["after_at"], params["after_id"] = last


# A pass at start, then every RETENTION_INTERVAL_SECONDS; each batch is a short transaction
# under the commit order, so ingest waits for at most one batch (bench/retention.py).
RETENTION_INTERVAL_SECONDS = 300.0
RETENTION_BATCH_EVENTS = 1_000


async def keep_retention(storage: Storage, days: int) -> None:
    """Forget, for ever, what was received more than `days` ago (the server's clock, which
    clients cannot set)."""
    while True:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        started = time.monotonic()
        try:
            totals = await retain(storage, cutoff, RETENTION_BATCH_EVENTS)
        except Exception as error:  # the database may be down: the next pass tries again
            logger.warning("retention pass failed: %r", error)
        else:
            if totals is None:
                logger.info("retention: another process is running a pass")
            else:
                batches = totals.pop("batches")
                logger.info(
                    "retention: deleted %s, received before %s, in %d batches, %.1f s",
                    ", ".join(f"{count} {table}" for table, count in totals.items()),
                    format_timestamp(cutoff),
                    batches,
                    time.monotonic() - started,
                )
        await asyncio.sleep(RETENTION_INTERVAL_SECONDS)
