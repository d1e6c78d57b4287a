"""Storage: events, students and the dashboard summaries in SQLite or PostgreSQL, and the
commit order that makes ids safe to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import re
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from databases import Database, DatabaseURL

from telemetry.errors import ApiError
from telemetry.events import EARLIEST_OCCURRED_AT, error_text

logger = logging.getLogger(__name__)


SCHEMA_PATH = Path(__file__).parent.parent / "schema.sql"


# An event's non-null fields win over the student's row (upserted_student replays this).
ON_STUDENT_CONFLICT = """
ON CONFLICT (student_id) DO UPDATE SET
    name = COALESCE(excluded.name, students.name),
    course_id = COALESCE(excluded.course_id, students.course_id),
    team = COALESCE(excluded.team, students.team),
    last_seen = excluded.last_seen
"""


# SQLite has no arrays: it stores a batch one event at a time, in one transaction.
UPSERT_STUDENT = f"""
INSERT INTO students (student_id, name, course_id, team, first_seen, last_seen)
VALUES (:student_id, :name, :course_id, :team, :seen, :seen)
{ON_STUDENT_CONFLICT}
RETURNING name, course_id, team
"""


SELECT_EVENT_ID = "SELECT id FROM events WHERE event_id = :event_id"


INSERT_EVENT = """
INSERT INTO events (
    event_id, student_id, event_type, occurred_at, received_at, course_id, session_id,
    notebook_path, cell_id, cell_index, execution_count, source, status, error,
    duration_ms, seq, outputs, outputs_truncated, extra
) VALUES (
    :event_id, :student_id, :event_type, :occurred_at, :received_at, :course_id, :session_id,
    :notebook_path, :cell_id, :cell_index, :execution_count, :source, :status, :error,
    :duration_ms, :seq, :outputs, :outputs_truncated, :extra
)
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""


def column_types(columns: str) -> dict[str, str]:
    """A table's `column type, ...` as {column: type}, in order."""
    return dict(column.split(maxsplit=1) for column in columns.split(","))


# The dashboard summaries of schema.sql, upserted at commit time from each batch's deltas.
CELL_RUN_TYPES = column_types(
    "student_id text, notebook_path text, cell_key text, course_id text, cell_id text, "
    "cell_index integer, runs bigint, errors bigint, last_status text, last_error text, "
    "last_event_id bigint"
)


ON_CELL_RUN_CONFLICT = """
ON CONFLICT (student_id, notebook_path, cell_key) DO UPDATE SET
    course_id = COALESCE(excluded.course_id, cell_runs.course_id),
    cell_id = excluded.cell_id,
    cell_index = COALESCE(excluded.cell_index, cell_runs.cell_index),
    runs = cell_runs.runs + excluded.runs,
    errors = cell_runs.errors + excluded.errors,
    last_status = excluded.last_status,
    last_error = excluded.last_error,
    last_event_id = excluded.last_event_id
"""


# cell_runs added up per course ('' for none) and cell, so the class view reads one row a cell.
CELL_TOTAL_TYPES = column_types(
    "course_id text, notebook_path text, cell_key text, cell_id text, cell_index integer, "
    "students_ran bigint, runs bigint, errors bigint"
)


ON_CELL_TOTAL_CONFLICT = """
ON CONFLICT (course_id, notebook_path, cell_key) DO UPDATE SET
    cell_id = COALESCE(excluded.cell_id, cell_totals.cell_id),
    cell_index = COALESCE(excluded.cell_index, cell_totals.cell_index),
    students_ran = cell_totals.students_ran + excluded.students_ran,
    runs = cell_totals.runs + excluded.runs,
    errors = cell_totals.errors + excluded.errors
"""


# Per student, so a page of students reads a row each, not all their events.
STUDENT_COUNT_TYPES = column_types(
    "student_id text, events bigint, executions bigint, errors bigint"
)


ON_STUDENT_COUNT_CONFLICT = """
ON CONFLICT (student_id) DO UPDATE SET
    events = student_counts.events + excluded.events,
    executions = student_counts.executions + excluded.executions,
    errors = student_counts.errors + excluded.errors
"""


# Once, when student_counts is new and events are not (a database from before it).
COUNT_STUDENT_COUNTS = "SELECT COUNT(*) FROM (SELECT 1 FROM student_counts LIMIT 1) t"


FILL_STUDENT_COUNTS = """
INSERT INTO student_counts (student_id, events, executions, errors)
SELECT student_id, COUNT(*), COUNT(status), SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END)
FROM events GROUP BY student_id
"""


ACTIVITY_TYPES = column_types(
    "course_id text, minute text, executions bigint, errors bigint, help bigint"
)


ON_ACTIVITY_CONFLICT = """
ON CONFLICT (course_id, minute) DO UPDATE SET
    executions = activity.executions + excluded.executions,
    errors = activity.errors + excluded.errors,
    help = activity.help + excluded.help
"""


HAND_TYPES = column_types(
    "raise_id bigint, student_id text, raised_at timestamptz, last_beat_at timestamptz, "
    "state text, on_my_way_by text, on_my_way_at timestamptz"
)


HAND_TIMES = ("raised_at", "last_beat_at", "on_my_way_at")


ON_HAND_CONFLICT = """
ON CONFLICT (raise_id) DO UPDATE SET
    last_beat_at = excluded.last_beat_at,
    state = excluded.state,
    on_my_way_by = excluded.on_my_way_by,
    on_my_way_at = excluded.on_my_way_at
"""


HAND_COLUMNS = list(HAND_TYPES)


# A row of statement_rows, as STORE_EVENTS reads it.
STATEMENT_ROW_TYPES = column_types(
    "event_id text, student_id text, event_type text, occurred_at timestamptz, course_id text, "
    "session_id text, notebook_path text, cell_id text, cell_index integer, "
    "execution_count integer, source text, status text, error jsonb, "
    "duration_ms double precision, seq bigint, outputs jsonb, outputs_truncated boolean, "
    "extra jsonb, student_name text, team text, cell_key text, error_text text"
)


# PostgreSQL stores a whole group-committed batch in one statement: the rows travel as
# one JSON array (see statement_rows), so the text is the same for any batch size, and
# being one statement it is one transaction with no BEGIN/COMMIT round trips. It answers
# with the batch's already stored event_ids, the new ids, each student's row as it was
# before, from which Python replays the documents that one-by-one upserts would have given,
# and the highest id committed before the batch (its statement snapshot predates the insert).
# Known ids are looked up event by event rather than by `= ANY(array)`: once asyncpg's
# prepared statement gets a generic plan, the latter scans the whole table (90 ms per 500
# events at 100k rows).
STORE_EVENTS = f"""
WITH incoming AS (
    SELECT * FROM ROWS FROM (jsonb_to_recordset(CAST(:rows AS jsonb)) AS (
        {", ".join(f"{field} {kind}" for field, kind in STATEMENT_ROW_TYPES.items())}
    )) WITH ORDINALITY AS t ({", ".join(STATEMENT_ROW_TYPES)}, position)
), known AS (
    -- A lookup per event: a plan made while events was small hashed the whole table.
    SELECT i.event_id, e.id FROM incoming i
    CROSS JOIN LATERAL (SELECT id FROM events WHERE event_id = i.event_id LIMIT 1) e
), fresh AS (
    SELECT DISTINCT ON (i.event_id) i.* FROM incoming i
    WHERE NOT EXISTS (SELECT FROM known k WHERE k.event_id = i.event_id)
    ORDER BY i.event_id, i.position
), student_updates AS (
    SELECT student_id,
        (array_agg(student_name ORDER BY position DESC)
            FILTER (WHERE student_name IS NOT NULL))[1] AS name,
        (array_agg(course_id ORDER BY position DESC)
            FILTER (WHERE course_id IS NOT NULL))[1] AS course_id,
        (array_agg(team ORDER BY position DESC) FILTER (WHERE team IS NOT NULL))[1] AS team
    FROM fresh GROUP BY student_id
), previous AS (
    SELECT s.student_id, s.name, s.course_id, s.team
    FROM students s JOIN student_updates u ON u.student_id = s.student_id
), upserted_students AS (
    INSERT INTO students (student_id, name, course_id, team, first_seen, last_seen)
    SELECT student_id, name, course_id, team,
           CAST(:received_at AS timestamptz), CAST(:received_at AS timestamptz)
    FROM student_updates
    {ON_STUDENT_CONFLICT}
    RETURNING student_id, course_id
), inserted AS (
    -- ORDER BY position makes the identity hand out ids in the batch's order.
    INSERT INTO events (
        event_id, student_id, event_type, occurred_at, received_at, course_id, session_id,
        notebook_path, cell_id, cell_index, execution_count, source, status, error,
        duration_ms, seq, outputs, outputs_truncated, extra
    )
    SELECT event_id, student_id, event_type, occurred_at, CAST(:received_at AS timestamptz),
           course_id, session_id, notebook_path, cell_id, cell_index, execution_count,
           source, status, error, duration_ms, seq, outputs, outputs_truncated, extra
    FROM fresh ORDER BY position
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, id
), lookups AS (
    -- The planner cannot know how many rows a CTE holds, guesses one, and joined CTEs by
    -- nested loops: 100 of the 110 ms of a 500-event batch. A jsonb object finds its keys
    -- by binary search.
    SELECT (SELECT jsonb_object_agg(event_id, id) FROM inserted) AS ids,
           (SELECT jsonb_object_agg(student_id, course_id) FROM upserted_students) AS courses
), stored AS (
    -- The fresh events the insert kept, with their ids and the course their documents show.
    SELECT f.*, CAST(l.ids ->> f.event_id AS bigint) AS id,
           COALESCE(f.course_id, l.courses ->> f.student_id) AS course
    FROM fresh f, lookups l WHERE l.ids ? f.event_id
), executions AS (
    SELECT student_id, COALESCE(notebook_path, '') AS notebook_path, cell_key, cell_id,
           cell_index, status, error_text, id, course
    FROM stored WHERE status IS NOT NULL
), run_updates AS (
    SELECT student_id, notebook_path, cell_key,
           (array_agg(course ORDER BY id DESC) FILTER (WHERE course IS NOT NULL))[1] AS course_id,
           (array_agg(cell_id ORDER BY id DESC))[1] AS cell_id,
           (array_agg(cell_index ORDER BY id DESC) FILTER (WHERE cell_index IS NOT NULL))[1]
               AS cell_index,
           COUNT(*) AS runs, COUNT(*) FILTER (WHERE status = 'error') AS errors,
           (array_agg(status ORDER BY id DESC))[1] AS last_status,
           (array_agg(error_text ORDER BY id DESC))[1] AS last_error,
           MAX(id) AS last_event_id
    FROM executions GROUP BY student_id, notebook_path, cell_key
), cell_run_updates AS (
    INSERT INTO cell_runs ({", ".join(CELL_RUN_TYPES)})
    SELECT {", ".join(CELL_RUN_TYPES)} FROM run_updates
    {ON_CELL_RUN_CONFLICT}
), cell_total_updates AS (
    -- cell_runs as it was before this statement: a student new to the cell has no row yet.
    INSERT INTO cell_totals ({", ".join(CELL_TOTAL_TYPES)})
    SELECT COALESCE(r.course_id, c.course_id, ''), r.notebook_path, r.cell_key,
           MAX(r.cell_id), MAX(r.cell_index), COUNT(*) FILTER (WHERE c.student_id IS NULL),
           SUM(r.runs), SUM(r.errors)
    FROM run_updates r
    LEFT JOIN cell_runs c ON c.student_id = r.student_id
        AND c.notebook_path = r.notebook_path AND c.cell_key = r.cell_key
    GROUP BY COALESCE(r.course_id, c.course_id, ''), r.notebook_path, r.cell_key
    {ON_CELL_TOTAL_CONFLICT}
), count_updates AS (
    INSERT INTO student_counts ({", ".join(STUDENT_COUNT_TYPES)})
    SELECT student_id, COUNT(*), COUNT(status), COUNT(*) FILTER (WHERE status = 'error')
    FROM stored GROUP BY student_id
    {ON_STUDENT_COUNT_CONFLICT}
), activity_updates AS (
    INSERT INTO activity ({", ".join(ACTIVITY_TYPES)})
    SELECT COALESCE(course, ''), :minute, COUNT(*), COUNT(*) FILTER (WHERE status = 'error'), 0
    FROM executions GROUP BY COALESCE(course, '')
    {ON_ACTIVITY_CONFLICT}
)
SELECT 'known' AS kind, event_id AS key, id, NULL AS name, NULL AS course_id, NULL AS team
FROM known
UNION ALL
SELECT 'inserted', event_id, id, NULL, NULL, NULL FROM inserted
UNION ALL
SELECT 'student', student_id, NULL, name, course_id, team FROM previous
UNION ALL
SELECT 'follows', NULL, (SELECT COALESCE(MAX(id), 0) FROM events), NULL, NULL, NULL
"""


SELECT_EXISTING_EVENT_IDS = """
SELECT e.event_id, e.id
FROM unnest(CAST(:event_ids AS text[])) AS t (event_id)
JOIN events e ON e.event_id = t.event_id
"""


# The fields statement_rows copies from each event; it derives the other two.
STORE_EVENTS_FIELDS = [
    field for field in STATEMENT_ROW_TYPES if field not in ("cell_key", "error_text")
]


STUDENT_FIELDS = {"name": "student_name", "course_id": "course_id", "team": "team"}


SELECT_MAX_EVENT_ID = "SELECT COALESCE(MAX(id), 0) FROM events"


# Serialises commit-and-publish across processes, so ids reach the bus in id order.
COMMIT_LOCK_KEY = 0x7E1E_3E7E


LOCK_COMMITS = "SELECT pg_advisory_lock(:key)"


# One retention pass at a time across processes, by a lock the others do not wait for.
RETENTION_LOCK_KEY = 0x7E1E_DE1E


TRY_LOCK = "SELECT pg_try_advisory_lock(:key) AS locked"


# Frees either lock, the commit order or a retention pass.
UNLOCK = "SELECT pg_advisory_unlock(:key)"


# Held until its transaction ends. Several dynos may start at once, and CREATE ... IF NOT
# EXISTS races without SCHEMA_LOCK_KEY; erasure and retention take COMMIT_LOCK_KEY this way.
LOCK_UNTIL_COMMIT = "SELECT pg_advisory_xact_lock(:key)"


SCHEMA_LOCK_KEY = 0x7E1E_5C4E


# The whole of the SQLite/PostgreSQL difference in DDL: SQLite needs INTEGER PRIMARY KEY
# for its row ids and has no jsonb.
SQLITE_REWRITES = {
    "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "JSONB": "TEXT",
}


EVENT_COLUMNS = (
    "id event_id event_type student_id student_name team course_id session_id notebook_path "
    "cell_id cell_index execution_count source status error duration_ms seq outputs "
    "outputs_truncated occurred_at received_at extra"
).split()


JSON_COLUMNS = ("error", "outputs", "extra")


# A scoped token's courses travel as one JSON array parameter, `:courses` (SQLite has no
# arrays), NULL for an unscoped token; {courses} becomes the dialect's set of its elements.
COURSE_SETS = {
    "postgres": "(SELECT jsonb_array_elements_text(CAST(:courses AS jsonb)))",
    "sqlite": "(SELECT value FROM json_each(:courses))",
}


def in_scope(course: str) -> str:
    """The read API's one course guard: a row is read only if its course is the token's."""
    return f"(CAST(:courses AS TEXT) IS NULL OR {course} IN {{courses}})"


def in_course(course: str) -> str:
    """The rows of the course asked for, if any (`:course_id`), that the token may read."""
    return f"(CAST(:course_id AS TEXT) IS NULL OR {course} = :course_id) AND {in_scope(course)}"


# An event `e` of student `s` is in scope by its own course, else the student's (as its
# document shows it). A student of two courses is read, by a token of one, only through
# that course's events: their last notebook, executions and hands elsewhere stay out. Their
# counts (student_counts) are over every course: counting per course read every event of
# every student of the page, 7 s for 300 students at a million events (bench/aggregates.py).
EVENT_COURSE = "COALESCE(e.course_id, s.course_id)"


EVENT_IN_SCOPE = in_scope(EVENT_COURSE)


# A hand `h` of student `s` is in scope by the help event that raised it.
RAISED_IN_SCOPE = f"""(CAST(:courses AS TEXT) IS NULL OR EXISTS (
    SELECT 1 FROM events e WHERE e.id = h.raise_id AND {EVENT_IN_SCOPE}))"""


# The read API selects the same documents as the stream sends (see event_document): the
# student's name and team, and the student's course when the event names none.
EVENT_DOCUMENT_SOURCES = {
    "student_name": "s.name",
    "team": "s.team",
    "course_id": EVENT_COURSE,
}


EVENT_DOCUMENT_COLUMNS = ", ".join(
    f"{EVENT_DOCUMENT_SOURCES.get(column, 'e.' + column)} AS {column}" for column in EVENT_COLUMNS
)


SELECT_EVENT_DOCUMENTS = f"""
SELECT {EVENT_DOCUMENT_COLUMNS}
FROM events e JOIN students s ON s.student_id = e.student_id"""


# Replay and catch-up: the same documents as live delivery, in id order.
SELECT_EVENTS_AFTER = f"""{SELECT_EVENT_DOCUMENTS}
WHERE e.id > :after_id
ORDER BY e.id
LIMIT :limit
"""
# How many events follow an id, counting no further than :cap (an index range, no documents).
COUNT_EVENTS_AFTER = """
SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE id > :after_id ORDER BY id LIMIT :cap) t
"""


# The read API's optional filters are `CAST(:x AS TEXT) IS NULL OR ...`: asyncpg cannot type
# a bare NULL.
EVENT_FILTER_CLAUSES = f"""
  AND (CAST(:student_id AS TEXT) IS NULL OR e.student_id = :student_id)
  AND {in_course(EVENT_COURSE)}
  AND (CAST(:event_type AS TEXT) IS NULL OR e.event_type = :event_type)
  AND (CAST(:notebook_path AS TEXT) IS NULL OR e.notebook_path = :notebook_path)"""


SELECT_EVENT_PAGE = f"""{SELECT_EVENT_DOCUMENTS}
WHERE e.id > :since_id AND e.id < :before_id {EVENT_FILTER_CLAUSES}
  AND (NOT CAST(:collapse_beats AS BOOLEAN) OR e.event_type <> 'help'
       OR EXISTS (SELECT 1 FROM hand_raises h WHERE h.raise_id = e.id))
ORDER BY e.id DESC
LIMIT :limit
"""


# CSV export: the same documents and filters, oldest first, in keyset pages.
SELECT_EVENT_EXPORT = f"""{SELECT_EVENT_DOCUMENTS}
WHERE e.id > :since_id {EVENT_FILTER_CLAUSES}
ORDER BY e.id
LIMIT :limit
"""


# Correlated subqueries, each an index range on events (student_id, id): the cost follows
# the page's students, not the whole table.
SELECT_STUDENT_PAGE = f"""
SELECT page.*, last.event_type AS last_event_type, notebook.notebook_path AS last_notebook_path,
       notebook.cell_id AS last_cell_id, notebook.cell_index AS last_cell_index,
       {", ".join(f"hand.{column} AS hand_{column}" for column in HAND_COLUMNS)}
FROM (
    SELECT s.student_id, s.name, s.course_id, s.team, s.first_seen, s.last_seen,
        COALESCE(c.events, 0) AS event_count, COALESCE(c.executions, 0) AS execution_count,
        COALESCE(c.errors, 0) AS error_count,
        (SELECT MAX(e.id) FROM events e
         WHERE e.student_id = s.student_id AND {EVENT_IN_SCOPE}) AS last_event_id,
        (SELECT MAX(e.id) FROM events e
         WHERE e.student_id = s.student_id AND e.notebook_path IS NOT NULL
           AND {EVENT_IN_SCOPE}) AS last_notebook_id,
        (SELECT MAX(h.raise_id) FROM hand_raises h
         WHERE h.student_id = s.student_id AND {RAISED_IN_SCOPE}) AS last_raise_id
    FROM students s LEFT JOIN student_counts c ON c.student_id = s.student_id
    WHERE s.student_id > :after AND {in_course("s.course_id")}
    ORDER BY s.student_id
    LIMIT :limit
) page
LEFT JOIN events last ON last.id = page.last_event_id
LEFT JOIN events notebook ON notebook.id = page.last_notebook_id
LEFT JOIN hand_raises hand ON hand.raise_id = page.last_raise_id
ORDER BY page.student_id
"""


# The latest executions of the students from `after` (exclusive) to `through`, newest
# first, for the error streak (see error_streak).
SELECT_RECENT_EXECUTIONS = f"""
SELECT student_id, cell_id, status FROM (
    SELECT e.student_id, e.cell_id, e.status,
           ROW_NUMBER() OVER (PARTITION BY e.student_id ORDER BY e.id DESC) AS recency
    FROM events e JOIN students s ON s.student_id = e.student_id
    WHERE e.student_id > :after AND e.student_id <= :through AND e.status IS NOT NULL
      AND {EVENT_IN_SCOPE}
) recent
WHERE recency <= :depth
ORDER BY student_id, recency DESC
"""


# PostgreSQL: each student's latest executions by a backward walk of events_student_idx;
# the window above reads every execution of the page's students (5 s at 1M events).
SELECT_RECENT_EXECUTIONS_LATERAL = f"""
SELECT s.student_id, r.cell_id, r.status FROM students s
CROSS JOIN LATERAL (
    SELECT e.id, e.cell_id, e.status FROM events e
    WHERE e.student_id = s.student_id AND e.status IS NOT NULL AND {EVENT_IN_SCOPE}
    ORDER BY e.id DESC LIMIT :depth
) r
WHERE s.student_id > :after AND s.student_id <= :through
ORDER BY s.student_id, r.id
"""


# A student is stuck after this many errors in a row on one cell; the dashboard uses the
# same rule (static/dashboard.js) for live updates.
STUCK_ERROR_STREAK = 3


STREAK_LOOKBACK_EXECUTIONS = 20


# Struggling, unlike stuck, survives moving between cells: this many errors among the
# last STREAK_LOOKBACK_EXECUTIONS executions, any cells (13 errors in 35 runs trips it).
STRUGGLING_ERRORS = 6


# A raised hand is a heartbeat: cell-monitor-extension repeats `help` every 10 s (its older
# release every 5 s, and never sends help_stop). Three missed 10 s beats lower the hand.
HAND_TIMEOUT = dt.timedelta(seconds=30)


HAND_EVENTS = frozenset(("help", "help_stop", "help_dismissed", "help_on_my_way"))


# Presence, as the dashboard shows it: active within ACTIVE, idle within IDLE, then away.
ACTIVE = dt.timedelta(minutes=2)


IDLE = dt.timedelta(minutes=10)


# The rules above as the page reads them (in the session answer), so it never copies them.
CLASS_RULES = {
    "hand_timeout_seconds": HAND_TIMEOUT.total_seconds(),
    "stuck_error_streak": STUCK_ERROR_STREAK,
    "recent_executions": STREAK_LOOKBACK_EXECUTIONS,
    "struggling_errors": STRUGGLING_ERRORS,
    "active_seconds": ACTIVE.total_seconds(),
    "idle_seconds": IDLE.total_seconds(),
}


def upsert_one(table: str, types: Mapping[str, str], on_conflict: str) -> str:
    """One row's upsert, for SQLite."""
    return (
        f"INSERT INTO {table} ({', '.join(types)}) "
        f"VALUES ({', '.join(':' + column for column in types)}) {on_conflict}"
    )


def upsert_arrays(table: str, types: Mapping[str, str], on_conflict: str) -> str:
    """A whole batch's upsert in one PostgreSQL statement, one typed array per column."""
    arrays = ", ".join(f"CAST(:{column} AS {kind}[])" for column, kind in types.items())
    return f"INSERT INTO {table} ({', '.join(types)}) SELECT * FROM unnest({arrays}) {on_conflict}"


SUMMARY_UPSERTS = {
    "cell_runs": (CELL_RUN_TYPES, ON_CELL_RUN_CONFLICT),
    "cell_totals": (CELL_TOTAL_TYPES, ON_CELL_TOTAL_CONFLICT),
    "activity": (ACTIVITY_TYPES, ON_ACTIVITY_CONFLICT),
    "student_counts": (STUDENT_COUNT_TYPES, ON_STUDENT_COUNT_CONFLICT),
    "hand_raises": (HAND_TYPES, ON_HAND_CONFLICT),
}


UPSERT_ONE = {table: upsert_one(table, *spec) for table, spec in SUMMARY_UPSERTS.items()}


UPSERT_ARRAYS = {table: upsert_arrays(table, *spec) for table, spec in SUMMARY_UPSERTS.items()}


# Beating raises only: an index range on last_beat_at, whatever the table's history.
SELECT_BEATING_HANDS = f"""
SELECT h.raise_id, h.student_id, h.raised_at, h.last_beat_at, h.state, h.on_my_way_by,
       h.on_my_way_at, s.name, s.team, s.course_id,
       place.notebook_path, place.cell_id, place.cell_index
FROM hand_raises h
JOIN students s ON s.student_id = h.student_id
LEFT JOIN events place ON place.id = (
    SELECT MAX(e.id) FROM events e
    WHERE e.student_id = h.student_id AND e.notebook_path IS NOT NULL AND {EVENT_IN_SCOPE}
)
WHERE h.last_beat_at >= :cutoff AND h.state <> 'stopped'
  AND {in_course("s.course_id")} AND {RAISED_IN_SCOPE}
ORDER BY h.raised_at, h.raise_id
"""


HAND_PLACE_COLUMNS = ("name", "team", "course_id", "notebook_path", "cell_id", "cell_index")


SELECT_STUDENT_COURSE = "SELECT course_id FROM students WHERE student_id = :student_id"


# Every course a student's events were shown in (see EVENT_IN_SCOPE), theirs if none.
SELECT_STUDENT_COURSES = f"""
SELECT DISTINCT {EVENT_COURSE} AS course_id
FROM students s LEFT JOIN events e ON e.student_id = s.student_id
WHERE s.student_id = :student_id
"""


CELL_RUN_FILTERS = f"""
    {in_course("course_id")}
    AND (CAST(:notebook_path AS TEXT) IS NULL OR notebook_path = :notebook_path)
"""


SELECT_CELL_TOTALS = f"""
SELECT notebook_path, cell_key, MAX(cell_id) AS cell_id, MAX(cell_index) AS cell_index,
       CAST(SUM(students_ran) AS BIGINT) AS students_ran, CAST(SUM(runs) AS BIGINT) AS runs,
       CAST(SUM(errors) AS BIGINT) AS errors
FROM cell_totals
WHERE {CELL_RUN_FILTERS}
GROUP BY notebook_path, cell_key
"""


# The students whose latest run of a cell failed, per cell and error text, through the
# partial index cell_runs_failing_idx: a class view reads the failing, not all 28,000 runs.
# {students} is the dialect's JSON array aggregate (see JSON_ARRAY_AGGREGATES).
SELECT_FAILING_GROUPS = f"""
SELECT notebook_path, cell_key, last_error, {{students}} AS students FROM cell_runs
WHERE last_status = 'error' AND {CELL_RUN_FILTERS}
GROUP BY notebook_path, cell_key, last_error
"""


JSON_ARRAY_AGGREGATES = {
    "postgres": "json_agg(student_id)",
    "sqlite": "json_group_array(student_id)",
}


SELECT_CELL_RUN_COURSE = """
SELECT course_id FROM cell_runs
WHERE student_id = :student_id AND notebook_path = :notebook_path AND cell_key = :cell_key
"""


TOP_ERRORS = 5


SELECT_ACTIVITY = f"""
SELECT minute, CAST(SUM(executions) AS BIGINT) AS executions,
       CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(help) AS BIGINT) AS help
FROM activity
WHERE minute >= :first AND {in_course("course_id")}
GROUP BY minute
"""


SELECT_LATEST_HAND = f"""
SELECT {", ".join(HAND_COLUMNS)} FROM hand_raises WHERE student_id = :student_id
ORDER BY raise_id DESC LIMIT 1
"""


# PostgreSQL: every student of a batch at once, each an index lookup.
SELECT_LATEST_HANDS = f"""
SELECT h.* FROM unnest(CAST(:student_ids AS text[])) AS t (student_id)
CROSS JOIN LATERAL (
    SELECT {", ".join(HAND_COLUMNS)} FROM hand_raises h WHERE h.student_id = t.student_id
    ORDER BY raise_id DESC LIMIT 1
) h
"""


# Forgetting: erasure and retention. Events leave in one of three ways, each a subquery of
# the doomed events: a student's, a course's (events naming it, and events naming no course
# of students whose course it is: the course's dashboards show those as its own), or the
# oldest batch received before a cutoff. Students left with no event go with them; a student
# of a course who has events elsewhere stays, with those, and takes their latest course.
# Statements read the doomed rows themselves: `events.id IN (doomed)` got a hash join over
# every event (30 ms a batch at 100,000 events).
DOOMED_EVENTS = {
    "student": "SELECT * FROM events WHERE student_id = :subject",
    "course": """
        SELECT * FROM events WHERE course_id = :subject
        UNION ALL
        SELECT e.* FROM students s JOIN events e ON e.student_id = s.student_id
        WHERE s.course_id = :subject AND e.course_id IS NULL""",
    # From where the last batch ended: the index's deleted entries before it, not yet
    # vacuumed, made each batch slower than the last (40 to 100 ms over a million).
    "expired": """
        SELECT * FROM events
        WHERE received_at < :cutoff AND (received_at, id) > (:after_at, :after_id)
        ORDER BY received_at, id LIMIT :batch_size""",
}


# Whose events are doomed; retention's batch also tells where it ends.
SELECT_DOOMED_OWNERS = {
    "student": f"SELECT DISTINCT student_id FROM ({DOOMED_EVENTS['student']}) d",
    "course": f"SELECT DISTINCT student_id FROM ({DOOMED_EVENTS['course']}) d",
    "expired": f"SELECT student_id, received_at, id FROM ({DOOMED_EVENTS['expired']}) d",
}


# Lists of students travel as one parameter: :owners, whose events are doomed, and :gone,
# those of them left with no event once the doomed are deleted.
STUDENT_LIST = {
    "postgres": "SELECT unnest(CAST(:{name} AS text[])) AS student_id",
    "sqlite": "SELECT value AS student_id FROM json_each(:{name})",
}


# Their counts spare a walk over each student's deleted index entries.
SELECT_GONE = {
    dialect: f"""
        SELECT o.student_id FROM ({students.format(name="owners")}) o
        LEFT JOIN student_counts c ON c.student_id = o.student_id
        WHERE CASE WHEN c.events > 0 THEN FALSE
                   ELSE NOT EXISTS (SELECT 1 FROM events e WHERE e.student_id = o.student_id) END"""
    for dialect, students in STUDENT_LIST.items()
}


# The UTC minute of receipt, as activity keys it (minute_of).
RECEIPT_MINUTE = {
    "postgres": """to_char(e.received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI"Z"')""",
    "sqlite": "substr(e.received_at, 1, 16) || 'Z'",
}


# The summaries are corrected in SQL by what leaves, before it leaves. Every statement of a
# forgetting runs in one transaction under the commit order, so all read the same doomed rows.
# The doomed executions per student and cell, as cell_runs keys them (cell_key).
DOOMED_RUNS = """
SELECT e.student_id, COALESCE(e.notebook_path, '') AS notebook_path,
       CASE WHEN e.cell_id <> '' THEN e.cell_id
            WHEN e.cell_index IS NOT NULL THEN '#' || CAST(e.cell_index AS TEXT)
            ELSE '' END AS cell_key,
       COUNT(*) AS gone_runs, SUM(CASE WHEN e.status = 'error' THEN 1 ELSE 0 END) AS gone_errors
FROM ({doomed}) e WHERE e.status IS NOT NULL
GROUP BY 1, 2, 3
"""


# A run summary left with no run counts its student out of the cell's total.
SUBTRACT_CELL_TOTALS = f"""
UPDATE cell_totals SET students_ran = students_ran - d.gone_students,
    runs = runs - d.gone_runs, errors = errors - d.gone_errors
FROM (
    SELECT COALESCE(c.course_id, '') AS course_id, c.notebook_path, c.cell_key,
           SUM(CASE WHEN c.runs <= g.gone_runs THEN 1 ELSE 0 END) AS gone_students,
           SUM(g.gone_runs) AS gone_runs, SUM(g.gone_errors) AS gone_errors
    FROM ({DOOMED_RUNS}) g JOIN cell_runs c ON c.student_id = g.student_id
        AND c.notebook_path = g.notebook_path AND c.cell_key = g.cell_key
    GROUP BY COALESCE(c.course_id, ''), c.notebook_path, c.cell_key
) d
WHERE cell_totals.course_id = d.course_id AND cell_totals.notebook_path = d.notebook_path
  AND cell_totals.cell_key = d.cell_key
"""


SUBTRACT_CELL_RUNS = f"""
UPDATE cell_runs SET runs = runs - g.gone_runs, errors = errors - g.gone_errors
FROM ({DOOMED_RUNS}) g
WHERE cell_runs.student_id = g.student_id AND cell_runs.notebook_path = g.notebook_path
  AND cell_runs.cell_key = g.cell_key
"""


SUBTRACT_ACTIVITY = """
UPDATE activity SET executions = executions - d.gone_executions,
    errors = errors - d.gone_errors, help = help - d.gone_help
FROM (
    SELECT COALESCE(e.course_id, s.course_id, '') AS course_id, {minute} AS minute,
           SUM(CASE WHEN e.status IS NULL THEN 0 ELSE 1 END) AS gone_executions,
           SUM(CASE WHEN e.status = 'error' THEN 1 ELSE 0 END) AS gone_errors,
           SUM(CASE WHEN h.raise_id IS NULL THEN 0 ELSE 1 END) AS gone_help
    FROM ({doomed}) e JOIN students s ON s.student_id = e.student_id
    LEFT JOIN hand_raises h ON h.raise_id = e.id
    GROUP BY COALESCE(e.course_id, s.course_id, ''), {minute}
) d
WHERE activity.course_id = d.course_id AND activity.minute = d.minute
"""


SUBTRACT_STUDENT_COUNTS = """
UPDATE student_counts SET events = events - d.gone_events,
    executions = executions - d.gone_executions, errors = errors - d.gone_errors
FROM (
    SELECT student_id, COUNT(*) AS gone_events, COUNT(status) AS gone_executions,
           SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS gone_errors
    FROM ({doomed}) e GROUP BY student_id
) d
WHERE student_counts.student_id = d.student_id
"""


# A student of an erased course who stays: their course is their latest remaining one.
REASSIGN_COURSE = """
UPDATE students SET course_id = (
    SELECT e.course_id FROM events e
    WHERE e.student_id = students.student_id AND e.course_id IS NOT NULL
    ORDER BY e.id DESC LIMIT 1
)
WHERE course_id = :subject
"""


# The rows that go with the doomed events, then with the students left with none.
FORGOTTEN_WITH_EVENTS = {
    "cell_runs": "runs <= 0",
    "cell_totals": "students_ran <= 0",
    "activity": "executions <= 0 AND errors <= 0 AND help <= 0",
    "hand_raises": "raise_id IN (SELECT id FROM ({doomed}) d)",
    "events": "id IN (SELECT id FROM ({doomed}) d)",
}


FORGOTTEN_WITH_STUDENTS = ("cell_runs", "hand_raises", "student_counts", "students")


# More rows that go, by scope: a course's summaries whole, whatever the subtraction left;
# retention's hands and activity minutes older than the cutoff.
FORGOTTEN_SCOPE_ROWS = {
    ("course", "cell_runs"): "course_id = :subject",
    ("course", "cell_totals"): "course_id = :subject",
    ("course", "activity"): "course_id = :subject",
    ("expired", "hand_raises"): "last_beat_at < :cutoff",
    ("expired", "activity"): "minute < :minute",
}


FORGOTTEN_TABLES = (
    "events", "students", "cell_runs", "hand_raises", "student_counts", "cell_totals", "activity"
)  # fmt: skip


Steps = list[tuple[str | None, str]]


def delete_step(table: str, rows: str) -> Steps:
    """Count the rows (SELECT COUNT(*) AS n, its table named), then delete them."""
    return [
        (table, f"SELECT COUNT(*) AS n FROM {table} WHERE {rows}"),
        (None, f"DELETE FROM {table} WHERE {rows}"),
    ]


def forgetting_steps(scope: str, dialect: str) -> tuple[Steps, Steps]:
    """The statements of one forgetting, in order: those before SELECT_GONE, those after."""
    doomed = DOOMED_EVENTS[scope]

    def with_events(table: str) -> Steps:
        rows = FORGOTTEN_WITH_EVENTS[table].format(doomed=doomed)
        more = FORGOTTEN_SCOPE_ROWS.get((scope, table))
        return delete_step(table, f"({rows}) OR {more}" if more else rows)

    gone = STUDENT_LIST[dialect].format(name="gone")
    return [
        (None, SUBTRACT_CELL_TOTALS.format(doomed=doomed)),
        (None, SUBTRACT_CELL_RUNS.format(doomed=doomed)),
        *with_events("cell_runs"),
        *with_events("cell_totals"),
        (None, SUBTRACT_ACTIVITY.format(doomed=doomed, minute=RECEIPT_MINUTE[dialect])),
        *with_events("activity"),
        *with_events("hand_raises"),
        (None, SUBTRACT_STUDENT_COUNTS.format(doomed=doomed)),
        *with_events("events"),
        *([(None, REASSIGN_COURSE)] if scope == "course" else []),
    ], [
        step
        for table in FORGOTTEN_WITH_STUDENTS
        for step in delete_step(table, f"student_id IN ({gone})")
    ]


FORGETTING = {
    (scope, dialect): forgetting_steps(scope, dialect)
    for scope in DOOMED_EVENTS
    for dialect in ("postgres", "sqlite")
}


NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


def dialect_sql(sql: str, dialect: str) -> str:
    """A statement with its dialect's JSON aggregate and course set filled in."""
    return sql.replace("{students}", JSON_ARRAY_AGGREGATES[dialect]).replace(
        "{courses}", COURSE_SETS[dialect]
    )


@dataclass(frozen=True)
class AsyncpgStatement:
    """A :name statement in asyncpg's $n form, converted once, for the commit path.

    `databases` compiles every statement through SQLAlchemy on every call: 0.6 ms for
    STORE_EVENTS, paid per batch on the event loop that also serves the requests.
    """

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, sql: str) -> AsyncpgStatement:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        return cls(NAMED_PARAMETER.sub(number, sql), tuple(names))

    async def fetch(self, connection: asyncpg.Connection, values: Mapping[str, Any]) -> list:
        return await connection.fetch(self.sql, *(values[name] for name in self.names))


@functools.cache
def asyncpg_statement(sql: str) -> AsyncpgStatement:
    return AsyncpgStatement.of(sql)


COMMIT_STATEMENTS = {
    sql: AsyncpgStatement.of(sql)
    for sql in (
        STORE_EVENTS,
        SELECT_EXISTING_EVENT_IDS,
        LOCK_COMMITS,
        UNLOCK,
        SELECT_LATEST_HANDS,
        *UPSERT_ARRAYS.values(),
    )
}


# The aggregates read up to thousands of rows: SQLAlchemy's row processing in `databases`
# took 28 ms for 7,200 rows that asyncpg's own records decode in a few.
FAST_READS = {
    sql: AsyncpgStatement.of(dialect_sql(sql, "postgres"))
    for sql in (
        SELECT_CELL_TOTALS,
        SELECT_FAILING_GROUPS,
        SELECT_ACTIVITY,
        SELECT_RECENT_EXECUTIONS_LATERAL,
    )
}


# A database that does not answer a connection attempt within this is down, for ingest.
CONNECT_TIMEOUT_SECONDS = 3.0


class StorageUnavailable(Exception):
    """The database could not store or read right now; the client should retry."""


RETRY_AFTER_SECONDS = 2


def storage_unavailable(what_failed: str) -> ApiError:
    # 503, not 4xx: the JupyterLab clients retry 5xx and drop an event on any 4xx.
    return ApiError(
        503,
        "storage_unavailable",
        f"{what_failed}; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


# A batch's events share received_at, and often occurred_at: strftime was 14% of the
# 50-event ingest profile.
@functools.lru_cache(maxsize=1024)
def format_timestamp(value: dt.datetime | str) -> str:
    """One text form for every timestamp we emit, sortable as text (SQLite stores this form)."""
    if isinstance(value, str):
        return value
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def split_statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def event_document(event: dict[str, Any], event_id: int, student: Mapping[str, Any]) -> dict:
    """The stored event as dashboards see it, live and on replay alike."""
    document = {column: event.get(column) for column in EVENT_COLUMNS}
    document.update(
        id=event_id,
        student_name=student["name"],
        team=student["team"],
        course_id=event["course_id"] or student["course_id"],
        occurred_at=format_timestamp(event["occurred_at"]),
        received_at=format_timestamp(event["received_at"]),
        error_text=error_text(event["error"]),
    )
    return document


def row_document(row: Mapping[str, Any]) -> dict:
    document = {column: row[column] for column in EVENT_COLUMNS}
    for column in JSON_COLUMNS:
        if document[column] is not None:
            document[column] = orjson.loads(document[column])
    document["outputs_truncated"] = bool(document["outputs_truncated"])
    document["occurred_at"] = format_timestamp(document["occurred_at"])
    document["received_at"] = format_timestamp(document["received_at"])
    document["error_text"] = error_text(document["error"])
    return document


def error_streak(executions: Iterable[tuple[str | None, str]]) -> tuple[str | None, int]:
    """(cell_id, errors in a row) over (cell_id, status) executions, oldest first.

    An error on another cell starts a new streak; a success on the streak's cell ends it;
    successes elsewhere leave it alone (a student often re-runs earlier cells to fix one).
    """
    cell, count = None, 0
    for cell_id, status in executions:
        if status == "error":
            cell, count = cell_id, (count + 1 if count and cell_id == cell else 1)
        elif count and cell_id == cell:
            cell, count = None, 0
    return cell, count


def student_document(
    row: Mapping[str, Any], executions: list[tuple[str | None, str]], now: dt.datetime
) -> dict:
    """One student as the read API and the dashboard's table see them; `executions` are
    their latest (cell_id, status), oldest first."""
    cell, count = error_streak(executions)
    statuses = [status for _, status in executions]
    latest = None
    if row["hand_state"] is not None:
        latest = {column: row[f"hand_{column}"] for column in HAND_COLUMNS}
    hand = hand_document(latest, now)
    raised = hand is not None and hand["state"] == "up"
    return {
        "student_id": row["student_id"],
        "name": row["name"],
        "course_id": row["course_id"],
        "team": row["team"],
        "first_seen": format_timestamp(row["first_seen"]),
        "last_seen": format_timestamp(row["last_seen"]),
        "event_count": row["event_count"],
        "execution_count": row["execution_count"],
        "error_count": row["error_count"],
        "last_event_id": row["last_event_id"],
        "last_event_type": row["last_event_type"],
        "last_notebook_path": row["last_notebook_path"],
        "last_cell_id": row["last_cell_id"],
        "last_cell_index": row["last_cell_index"],
        "last_status": statuses[-1] if statuses else None,
        "hand_raised": raised,
        "hand_raised_at": hand["raised_at"] if raised else None,
        "hand_last_beat_at": hand["last_beat_at"] if raised else None,
        "hand_on_my_way": hand["on_my_way"] if raised else None,
        "error_streak": count,
        "streak_cell_id": cell,
        "stuck": count >= STUCK_ERROR_STREAK,
        "recent_statuses": statuses,
        "struggling": is_struggling(statuses),
    }


CELL_RUN_KEY = ("student_id", "notebook_path", "cell_key")


def cell_key(document: Mapping[str, Any]) -> str:
    """A cell's identity within its notebook: its id, else its index, else ''."""
    if document.get("cell_id"):
        return document["cell_id"]
    return "" if document.get("cell_index") is None else f"#{document['cell_index']}"


def cell_run_rows(documents: Iterable[Mapping[str, Any]]) -> list[dict]:
    """What a batch of stored documents (id order) adds to cell_runs: one row per cell run."""
    rows: dict[tuple[str, str, str], dict] = {}
    for document in documents:
        if document.get("status") is None:
            continue
        key = (document["student_id"], document.get("notebook_path") or "", cell_key(document))
        row = rows.setdefault(key, dict(zip(CELL_RUN_KEY, key, strict=True)))
        failed = document["status"] == "error"
        row.update(
            course_id=document.get("course_id") or row.get("course_id"),
            cell_id=document.get("cell_id"),
            cell_index=first_present(document.get("cell_index"), row.get("cell_index")),
            runs=row.get("runs", 0) + 1,
            errors=row.get("errors", 0) + failed,
            last_status=document["status"],
            last_error=error_text(document.get("error")) if failed else None,
            last_event_id=document["id"],
        )
    return list(rows.values())


def first_present(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def student_count_rows(documents: Iterable[Mapping[str, Any]]) -> list[dict]:
    """What a batch of stored documents adds to student_counts."""
    rows: dict[str, dict] = {}
    for document in documents:
        student = document["student_id"]
        zeros = {"student_id": student, "events": 0, "executions": 0, "errors": 0}
        row = rows.setdefault(student, zeros)
        row["events"] += 1
        row["executions"] += document.get("status") is not None
        row["errors"] += document.get("status") == "error"
    return list(rows.values())


def minute_of(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


def activity_rows(
    documents: Iterable[Mapping[str, Any]], raised: Iterable[Mapping[str, Any]], minute: str
) -> list[dict]:
    """What a batch adds to activity: its executions, errors and new raised hands, per course."""
    rows: dict[str, dict] = {}

    def row(document: Mapping[str, Any]) -> dict:
        course = document.get("course_id") or ""
        zeros = {"course_id": course, "minute": minute, "executions": 0, "errors": 0, "help": 0}
        return rows.setdefault(course, zeros)

    for document in documents:
        if document.get("status") is not None:
            row(document)["executions"] += 1
            row(document)["errors"] += document["status"] == "error"
    for document in raised:
        row(document)["help"] += 1
    return list(rows.values())


def as_datetime(value: dt.datetime | str) -> dt.datetime:
    """A timestamp as either database returns it (SQLite keeps our UTC text)."""
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return moment.astimezone(dt.UTC)


def hand_is_live(hand: Mapping[str, Any] | None, moment: dt.datetime) -> bool:
    """Still beating at `moment`: not lowered by help_stop, last beat within HAND_TIMEOUT."""
    return (
        hand is not None
        and hand["state"] != "stopped"
        and moment - as_datetime(hand["last_beat_at"]) <= HAND_TIMEOUT
    )


def instructor_name(document: Mapping[str, Any]) -> str | None:
    extra = document.get("extra")
    return extra.get("by") if isinstance(extra, Mapping) else None


def next_hand(hand: Mapping[str, Any] | None, document: Mapping[str, Any], at: dt.datetime) -> Any:
    """A student's latest raise (or None) after one of their HAND_EVENTS, received at `at`.

    A `help` raises a hand unless a raise is still beating, in which case it is one more
    beat; beats after a dismissal keep the hand down, as the extension beats on until the
    student lowers it. help_stop ends a raise; the next `help` raises anew.
    """
    kind = document["event_type"]
    if hand is None or not hand_is_live(hand, at):
        if kind != "help":
            return hand
        return {
            "raise_id": document["id"],
            "student_id": document["student_id"],
            "raised_at": at,
            "last_beat_at": at,
            "state": "up",
            "on_my_way_by": None,
            "on_my_way_at": None,
        }
    hand = dict(hand)
    if kind == "help":
        hand["last_beat_at"] = at
    elif kind == "help_stop":
        hand["state"] = "stopped"
    elif hand["state"] == "up" and kind == "help_dismissed":
        hand["state"] = "dismissed"
    elif hand["state"] == "up" and kind == "help_on_my_way":
        hand.update(on_my_way_by=instructor_name(document), on_my_way_at=at)
    return hand


def hand_document(hand: Mapping[str, Any] | None, now: dt.datetime) -> dict | None:
    """A raise still beating at `now`, as the read API shows it; None for none."""
    if hand is None or not hand_is_live(hand, now):
        return None
    on_my_way = None
    if hand["on_my_way_at"] is not None:
        on_my_way = {"by": hand["on_my_way_by"], "at": format_timestamp(hand["on_my_way_at"])}
    return {
        "student_id": hand["student_id"],
        "state": hand["state"],
        "raised_at": format_timestamp(hand["raised_at"]),
        "last_beat_at": format_timestamp(hand["last_beat_at"]),
        "on_my_way": on_my_way,
    }


def is_struggling(statuses: list[str]) -> bool:
    """STRUGGLING_ERRORS among the last STREAK_LOOKBACK_EXECUTIONS statuses (oldest first)."""
    return statuses[-STREAK_LOOKBACK_EXECUTIONS:].count("error") >= STRUGGLING_ERRORS


def notebook_name(path: str | None) -> str | None:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else None


def cell_label(path: str | None, index: int | None) -> str:
    """How the dashboard names a cell: `[4] lists.ipynb`, never by its id."""
    return f"[{'?' if index is None else index}] {notebook_name(path) or '(no notebook)'}"


def cell_documents(
    totals: Iterable[Mapping[str, Any]], failing: Iterable[Mapping[str, Any]]
) -> list[dict]:
    """SELECT_CELL_TOTALS rows with their SELECT_FAILING_GROUPS rows (one per cell and error
    text), most failing students first."""
    students: dict[tuple[str, str], list[str]] = {}
    texts: dict[tuple[str, str], Counter[str]] = {}
    for row in failing:
        key = (row["notebook_path"], row["cell_key"])
        ids = orjson.loads(row["students"])
        students.setdefault(key, []).extend(ids)
        texts.setdefault(key, Counter())[row["last_error"] or "(no message)"] += len(ids)
    documents = []
    for row in totals:
        key = (row["notebook_path"], row["cell_key"])
        documents.append(cell_document(row, students.get(key, []), texts.get(key, Counter())))
    documents.sort(
        key=lambda document: (
            -document["students_failing"],
            -document["errors"],
            document["notebook_path"] or "",
            -1 if document["cell_index"] is None else document["cell_index"],
        )
    )
    return documents


def cell_document(row: Mapping[str, Any], failing: list[str], texts: Counter[str]) -> dict:
    path = row["notebook_path"] or None
    ranked = sorted(texts.items(), key=lambda item: (-item[1], item[0]))
    return {
        "notebook_path": path,
        "notebook_name": notebook_name(path),
        "cell_id": row["cell_id"],
        "cell_index": row["cell_index"],
        "label": cell_label(path, row["cell_index"]),
        "students_ran": row["students_ran"],
        "runs": row["runs"],
        "errors": row["errors"],
        "students_failing": len(failing),
        "failing_student_ids": sorted(failing),
        "top_errors": [{"error": text, "students": count} for text, count in ranked[:TOP_ERRORS]],
    }


def cell_total_rows(runs: Iterable[Mapping[str, Any]], priors: Mapping[tuple, Any]) -> list[dict]:
    """What cell_run_rows add to cell_totals; priors holds each run's cell_runs row before
    (its course_id), absent for a student new to the cell."""
    totals: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        key = tuple(run[column] for column in CELL_RUN_KEY)
        prior = priors.get(key)
        course = run["course_id"] or (prior["course_id"] if prior else None) or ""
        total = totals.setdefault(
            (course, run["notebook_path"], run["cell_key"]),
            {"course_id": course, "notebook_path": run["notebook_path"],
             "cell_key": run["cell_key"], "cell_id": None, "cell_index": None,
             "students_ran": 0, "runs": 0, "errors": 0},
        )  # fmt: skip
        total["cell_id"] = first_present(run["cell_id"], total["cell_id"])
        total["cell_index"] = first_present(run["cell_index"], total["cell_index"])
        total["students_ran"] += prior is None
        total["runs"] += run["runs"]
        total["errors"] += run["errors"]
    return list(totals.values())


def activity_series(
    rows: Iterable[Mapping[str, Any]], first: dt.datetime, minutes: int
) -> list[dict]:
    """One entry per minute from `first`, zeros where nothing happened."""
    counts = {row["minute"]: row for row in rows}
    series = []
    for step in range(minutes):
        minute = minute_of(first + dt.timedelta(minutes=step))
        row = counts.get(minute, {})
        totals = {name: row.get(name, 0) for name in ("executions", "errors", "help")}
        series.append({"minute": minute.removesuffix("Z") + ":00Z", **totals})
    return series


@dataclass
class StoredEvent:
    document: dict
    duplicate: bool

    def receipt(self) -> dict:
        return {
            "id": self.document["id"],
            "event_id": self.document["event_id"],
            "duplicate": self.duplicate,
        }


@dataclass(eq=False)
class StoredBatch:
    """A committed batch: the highest id committed before it, which its bus message carries
    so that a gap before it shows, and what each event became, in order. The committer reads
    `results` while the next batch's statement runs: their replay is 2.8 ms of Python for
    500 events, which PostgreSQL would otherwise wait for."""

    follows: int
    replay: Callable[[], list[StoredEvent]]

    @functools.cached_property
    def results(self) -> list[StoredEvent]:
        return self.replay()

    @classmethod
    def of(cls, results: list[StoredEvent], follows: int) -> StoredBatch:
        return cls(follows, lambda: results)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredBatch):
            return NotImplemented
        return (self.follows, self.results) == (other.follows, other.results)


def first_occurrences(events: list[dict], known: Mapping[str, int]) -> list[dict]:
    """The events to insert: not stored before, and the first of any repeated event_id."""
    seen: set[str] = set(known)
    fresh = []
    for event in events:
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            fresh.append(event)
    return fresh


def upserted_student(student: Mapping[str, Any] | None, event: Mapping[str, Any]) -> dict:
    """UPSERT_STUDENT's effect in Python: an event's non-null fields win over the row's."""
    student = student or {"name": None, "course_id": None, "team": None}
    return {
        column: student[column] if event[key] is None else event[key]
        for column, key in STUDENT_FIELDS.items()
    }


def batch_results(
    events: list[dict],
    fresh: list[dict],
    known: Mapping[str, int],
    inserted: Mapping[str, int],
    previous: dict[str, dict],
) -> list[StoredEvent]:
    """Per event, in the request's order, what storing them one by one would have returned."""
    students = dict(previous)
    documents = {}
    for event in fresh:
        student = upserted_student(students.get(event["student_id"]), event)
        students[event["student_id"]] = student
        if event["event_id"] in inserted:
            documents[event["event_id"]] = event_document(
                event, inserted[event["event_id"]], student
            )
    results = []
    for event in events:
        document = documents.pop(event["event_id"], None)
        if document is not None:
            results.append(StoredEvent(document, duplicate=False))
        else:
            stored_id = inserted.get(event["event_id"]) or known[event["event_id"]]
            results.append(StoredEvent({"id": stored_id, "event_id": event["event_id"]}, True))
    return results


def statement_rows(events: list[dict]) -> str:
    """A batch's rows for STORE_EVENTS, one JSON array, empty fields left out. The committer
    sends the rows of each POST as encoded when it arrived: 22 typed arrays cost asyncpg
    1.8 ms per 500 events, on the commit's path, and this 0.15 ms, on the request's."""
    return orjson.dumps(
        [
            {
                **{
                    field: event[field]
                    for field in STORE_EVENTS_FIELDS
                    if event.get(field) is not None
                },
                "cell_key": cell_key(event),
                "error_text": error_text(event["error"]) if event["status"] == "error" else None,
            }
            for event in events
        ]
    ).decode()


def joined_rows(parts: Iterable[str]) -> str:
    """The statement_rows of several batches as those of one."""
    return "[" + ",".join(part[1:-1] for part in parts if part != "[]") + "]"


class Storage:
    """Events and students in PostgreSQL or SQLite, behind a few verbs."""

    def __init__(self, url: str, pool_size: int) -> None:
        self.is_postgres = url.startswith("postgresql")
        # On PostgreSQL the committer has a connection of its own, one of pool_size.
        options = {"min_size": 1, "max_size": max(pool_size - 1, 1)} if self.is_postgres else {}
        self.database = Database(url, **options)
        self._writer: asyncpg.Connection | None = None
        self.dialect = "postgres" if self.is_postgres else "sqlite"
        # SQLite's commit order: one writer at a time in the process, erasure included.
        self._sqlite_writes = asyncio.Lock()

    async def connect(self) -> None:
        await self.database.connect()
        await self.apply_schema()

    async def disconnect(self) -> None:
        self._drop_writer()
        await self.database.disconnect()

    async def apply_schema(self) -> None:
        sql = SCHEMA_PATH.read_text()
        if not self.is_postgres:
            for postgres_only, sqlite_form in SQLITE_REWRITES.items():
                sql = sql.replace(postgres_only, sqlite_form)
        async with self.database.transaction():
            if self.is_postgres:
                await self.database.execute(LOCK_UNTIL_COMMIT, {"key": SCHEMA_LOCK_KEY})
            for statement in split_statements(sql):
                await self.database.execute(statement)
            if not await self.database.fetch_val(COUNT_STUDENT_COUNTS):
                await self.database.execute(FILL_STUDENT_COUNTS)

    def db_time(self, moment: dt.datetime) -> dt.datetime | str:
        # asyncpg wants aware datetimes; SQLite keeps our sortable UTC text.
        return moment if self.is_postgres else format_timestamp(moment)

    async def ping(self) -> None:
        await self.database.fetch_val("SELECT 1")

    async def max_event_id(self) -> int:
        return int(await self.database.fetch_val(SELECT_MAX_EVENT_ID))

    async def events_after(self, after_id: int, limit: int) -> list[dict]:
        rows = await self.database.fetch_all(
            SELECT_EVENTS_AFTER, {"after_id": after_id, "limit": limit}
        )
        return [row_document(row._mapping) for row in rows]

    async def count_events_after(self, after_id: int, cap: int) -> int:
        params = {"after_id": after_id, "cap": cap}
        return int(await self.database.fetch_val(COUNT_EVENTS_AFTER, params))

    async def events_page(self, params: Mapping[str, Any]) -> list[dict]:
        """Events matching parse_events_query's params, newest first."""
        rows = await self.fetch_all(SELECT_EVENT_PAGE, params)
        return [row_document(row._mapping) for row in rows]

    async def events_export(self, params: Mapping[str, Any]) -> list[dict]:
        """Events matching parse_export_query's params after `since_id`, oldest first."""
        rows = await self.fetch_all(SELECT_EVENT_EXPORT, params)
        return [row_document(row._mapping) for row in rows]

    async def students_page(self, params: Mapping[str, Any], now: dt.datetime) -> list[dict]:
        """Students matching parse_students_query's params, by student_id, with their counts
        and their hands as they are at `now`."""
        rows = [row._mapping for row in await self.fetch_all(SELECT_STUDENT_PAGE, params)]
        if not rows:
            return []
        executions: dict[str, list[tuple[str | None, str]]] = {}
        recent = await self.fetch_many(
            SELECT_RECENT_EXECUTIONS_LATERAL if self.is_postgres else SELECT_RECENT_EXECUTIONS,
            {
                "after": params["after"],
                "through": rows[-1]["student_id"],
                "depth": STREAK_LOOKBACK_EXECUTIONS,
                "courses": params["courses"],
            },
        )
        for row in recent:
            executions.setdefault(row["student_id"], []).append((row["cell_id"], row["status"]))
        return [student_document(row, executions.get(row["student_id"], []), now) for row in rows]

    async def hands(self, params: Mapping[str, Any], now: dt.datetime) -> list[dict]:
        """Raises still beating at `now`, oldest first, with where their student last was."""
        cutoff = self.db_time(now - HAND_TIMEOUT)
        filters = {"cutoff": cutoff, "course_id": params["course_id"], "courses": params["courses"]}
        hands = []
        for row in await self.fetch_all(SELECT_BEATING_HANDS, filters):
            hand = hand_document(row._mapping, now)
            if hand is not None:
                where = {column: row._mapping[column] for column in HAND_PLACE_COLUMNS}
                hands.append(hand | where)
        return hands

    async def latest_hand(self, student_id: str) -> dict | None:
        row = await self.database.fetch_one(SELECT_LATEST_HAND, {"student_id": student_id})
        return None if row is None else dict(row._mapping)

    async def student_course(self, student_id: str) -> tuple[bool, str | None]:
        """Whether the student was ever seen, and their course."""
        row = await self.database.fetch_one(SELECT_STUDENT_COURSE, {"student_id": student_id})
        return (False, None) if row is None else (True, row._mapping["course_id"])

    async def student_courses(self, student_id: str) -> list[str | None]:
        rows = await self.database.fetch_all(SELECT_STUDENT_COURSES, {"student_id": student_id})
        return sorted((row._mapping["course_id"] for row in rows), key=str)

    async def cells(self, params: Mapping[str, Any]) -> list[dict]:
        """Per notebook and cell, who ran it and who is failing there now (see cell_documents)."""
        filters = {name: params[name] for name in ("course_id", "notebook_path", "courses")}
        totals = await self.fetch_many(SELECT_CELL_TOTALS, filters)
        failing = await self.fetch_many(SELECT_FAILING_GROUPS, filters)
        return cell_documents(totals, failing)[: params["limit"]]

    async def fetch_all(self, sql: str, params: Mapping[str, Any]) -> list:
        """Rows of a statement written with the dialect placeholders of dialect_sql."""
        return await self.database.fetch_all(dialect_sql(sql, self.dialect), dict(params))

    async def fetch_many(self, sql: str, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Rows of one of the FAST_READS; asyncpg's records directly on PostgreSQL."""
        if not self.is_postgres:
            return [row._mapping for row in await self.fetch_all(sql, params)]
        async with self.database.connection() as connection:
            return await FAST_READS[sql].fetch(connection.raw_connection, params)

    async def activity(self, params: Mapping[str, Any], now: dt.datetime) -> list[dict]:
        """Executions, errors and raised hands per minute, the last `minutes`, oldest first."""
        minutes = params["minutes"]
        first = now - dt.timedelta(minutes=minutes - 1)
        filters = {name: params[name] for name in ("course_id", "courses")}
        rows = await self.fetch_many(SELECT_ACTIVITY, {**filters, "first": minute_of(first)})
        return activity_series([dict(row) for row in rows], first, minutes)

    @contextlib.asynccontextmanager
    async def commit_order(self) -> AsyncIterator[None]:
        """While held, no other process commits: store, then publish, inside it.

        On PostgreSQL an advisory lock spans the INSERT and the PUBLISH, so ids reach the bus
        in id order across processes; within a process the one committer task does the rest.
        """
        if not self.is_postgres:
            async with self._sqlite_writes, self.database.connection():
                yield
            return
        writer = await self._writer_connection()
        try:
            await COMMIT_STATEMENTS[LOCK_COMMITS].fetch(writer, {"key": COMMIT_LOCK_KEY})
            yield
        except BaseException:
            self._drop_writer()  # its session's end releases the lock
            raise
        try:
            await COMMIT_STATEMENTS[UNLOCK].fetch(writer, {"key": COMMIT_LOCK_KEY})
        except Exception as error:  # committed and published: only the lock is left to free
            logger.warning("could not release the commit lock: %r", error)
            self._drop_writer()

    async def erase_student(self, student_id: str) -> dict[str, int]:
        """Delete every row of a student from every table and take them out of the class
        summaries, in one transaction: the rows deleted per table. A later event of theirs
        is a new sighting."""
        return (await self._forget("student", {"subject": student_id}))[0]

    async def erase_course(self, course_id: str) -> dict[str, int]:
        """Delete a course's events and summaries, and its students left with no event
        (see DOOMED_EVENTS), in one transaction: the rows deleted per table."""
        return (await self._forget("course", {"subject": course_id}))[0]

    async def retain(self, cutoff: dt.datetime, batch_size: int) -> dict[str, int] | None:
        """One retention pass: forget the events received before `cutoff`, with their students'
        rows if nothing else is left of them, `batch_size` oldest at a time, each batch in one
        short transaction, until one comes back short. The rows deleted per table and the
        batches taken; None while another process runs a pass."""
        async with self.database.connection() as connection:
            if self.is_postgres:
                rows = await self._query(connection, TRY_LOCK, {"key": RETENTION_LOCK_KEY})
                if not rows[0]["locked"]:
                    return None
            try:
                totals = dict.fromkeys((*FORGOTTEN_TABLES, "batches"), 0)
                params = {
                    "cutoff": self.db_time(cutoff),
                    "minute": minute_of(cutoff),
                    "batch_size": batch_size,
                    "after_at": self.db_time(EARLIEST_OCCURRED_AT),
                    "after_id": 0,
                }
                while True:
                    started = time.monotonic()
                    deleted, doomed = await self._forget("expired", params)
                    # Rest as long as the batch took: ingest gets the commit order, and the
                    # database's share of the CPU, at least half the time.
                    await asyncio.sleep(time.monotonic() - started)
                    totals["batches"] += 1
                    for table, count in deleted.items():
                        totals[table] += count
                    if deleted["events"] < batch_size:
                        return totals
                    # The next batch starts after the (received_at, id) where this one ended.
                    last = max((row["received_at"], row["id"]) for row in doomed)
                    params["after_at"], params["after_id"] = last
            finally:
                if self.is_postgres:
                    await self._query(connection, UNLOCK, {"key": RETENTION_LOCK_KEY})

    async def _forget(
        self, scope: str, params: dict[str, Any]
    ) -> tuple[dict[str, int], list[Mapping[str, Any]]]:
        """The rows deleted per table, and what SELECT_DOOMED_OWNERS found."""
        deleted = dict.fromkeys(FORGOTTEN_TABLES, 0)
        lock = contextlib.nullcontext() if self.is_postgres else self._sqlite_writes
        async with lock, self.database.connection() as connection, connection.transaction():
            if self.is_postgres:  # no batch commits half-way through, nor reads the doomed
                await self._query(connection, LOCK_UNTIL_COMMIT, {"key": COMMIT_LOCK_KEY})
            doomed = await self._query(connection, SELECT_DOOMED_OWNERS[scope], params)
            owners = {row["student_id"] for row in doomed}
            if scope == "student":  # and their row, should they have no event
                owners.add(params["subject"])
            values = {**params, "owners": self._list(owners)}
            before, after = FORGETTING[(scope, self.dialect)]
            await self._run_steps(connection, before, values, deleted)
            gone = await self._query(connection, SELECT_GONE[self.dialect], values)
            values["gone"] = self._list(row["student_id"] for row in gone)
            await self._run_steps(connection, after, values, deleted)
        return deleted, doomed

    def _list(self, items: Iterable[str]) -> list[str] | str:
        """A list parameter: an array for asyncpg, JSON for SQLite's json_each."""
        return sorted(items) if self.is_postgres else orjson.dumps(sorted(items)).decode()

    async def _run_steps(
        self, connection: Any, steps: Steps, values: dict[str, Any], deleted: dict[str, int]
    ) -> None:
        for table, sql in steps:
            rows = await self._query(connection, sql, values)
            if table is not None:
                deleted[table] += rows[0]["n"]

    async def _query(
        self, connection: Any, sql: str, values: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]:
        """A statement on a `databases` connection: asyncpg's own on PostgreSQL, for its list
        parameters."""
        if self.is_postgres:
            return await asyncpg_statement(sql).fetch(connection.raw_connection, values)
        names = set(NAMED_PARAMETER.findall(sql))
        values = {name: value for name, value in values.items() if name in names}
        if not sql.lstrip().startswith("SELECT"):  # SQLAlchemy reads no rows of a DML
            await connection.execute(sql, values)
            return []
        return [row._mapping for row in await connection.fetch_all(sql, values)]

    async def _writer_connection(self) -> asyncpg.Connection:
        """The committer's own connection, opened again after any failure.

        Not one of `databases`' pooled connections: those are bound to their task, and one
        whose backend was terminated while being released stays marked as acquired for that
        task ("Connection is already acquired"), so a long-lived committer would never store
        again.
        """
        if self._writer is None or self._writer.is_closed():
            url = DatabaseURL(str(self.database.url))
            ssl = url.options.get("ssl")
            self._writer = await asyncpg.connect(
                host=url.hostname,
                port=url.port,
                user=url.username,
                password=url.password,
                database=url.database,
                ssl={"true": True, "false": False}.get(ssl.lower(), ssl) if ssl else None,
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
        return self._writer

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.terminate()
            self._writer = None

    async def store(self, events: list[dict], rows: str | None = None) -> StoredBatch:
        """Store a batch in one transaction, with the dashboard summaries: what each event
        became, in the batch's order. On PostgreSQL, STORE_EVENTS updates cell_runs,
        cell_totals, student_counts and activity itself, so a batch without help events stays
        one statement (a transaction and separate upserts cost 2.7 ms per 50-event batch).
        `rows`: statement_rows(events), if the caller has it already."""
        if not self.is_postgres:
            async with self.database.connection() as connection, connection.transaction():
                follows = await connection.fetch_val(SELECT_MAX_EVENT_ID)
                results = [await self._store_one(connection, event) for event in events]
                documents = [item.document for item in results if not item.duplicate]
                if documents:
                    await self._summarise(connection, documents, events[0]["received_at"])
                return StoredBatch.of(results, follows)
        writer = await self._writer_connection()
        rows = statement_rows(events) if rows is None else rows
        if not any(event["event_type"] in HAND_EVENTS for event in events):
            return await self._store_rows(writer, events, rows)
        async with writer.transaction():
            stored = await self._store_rows(writer, events, rows)
            documents = [item.document for item in stored.results if not item.duplicate]
            await self._record_hands(writer, documents, events[0]["received_at"])
        return stored

    async def _store_rows(
        self, writer: asyncpg.Connection, events: list[dict], rows: str
    ) -> StoredBatch:
        received_at = events[0]["received_at"] if events else dt.datetime.now(dt.UTC)
        values = {"rows": rows, "received_at": received_at, "minute": minute_of(received_at)}
        answer = await COMMIT_STATEMENTS[STORE_EVENTS].fetch(writer, values)
        found: dict[str, dict] = {"known": {}, "inserted": {}, "student": {}, "follows": {}}
        for row in answer:
            found[row["kind"]][row["key"]] = dict(row) if row["kind"] == "student" else row["id"]
        known, inserted = found["known"], found["inserted"]
        fresh = first_occurrences(events, known)
        lost = [event["event_id"] for event in fresh if event["event_id"] not in inserted]
        if lost:  # a writer outside the commit order stored them first
            existing = await COMMIT_STATEMENTS[SELECT_EXISTING_EVENT_IDS].fetch(
                writer, {"event_ids": lost}
            )
            known.update({row["event_id"]: row["id"] for row in existing})
        replay = functools.partial(batch_results, events, fresh, known, inserted, found["student"])
        return StoredBatch(found["follows"][None], replay)

    async def _summarise(self, connection: Any, documents: list[dict], at: dt.datetime) -> None:
        """SQLite's summaries, in its batch transaction (STORE_EVENTS writes PostgreSQL's)."""
        runs = cell_run_rows(documents)
        priors = {}
        for run in runs:
            key = {column: run[column] for column in CELL_RUN_KEY}
            prior = await connection.fetch_one(SELECT_CELL_RUN_COURSE, key)
            if prior is not None:
                priors[tuple(key.values())] = prior._mapping
        await self._upsert(connection, "cell_totals", cell_total_rows(runs, priors))
        await self._upsert(connection, "cell_runs", runs)
        await self._upsert(connection, "student_counts", student_count_rows(documents))
        await self._upsert(connection, "activity", activity_rows(documents, [], minute_of(at)))
        await self._record_hands(connection, documents, at)

    async def _record_hands(self, connection: Any, documents: list[dict], at: dt.datetime) -> None:
        """Apply a batch's help events to their students' latest raises; count the new raises
        in activity."""
        helps = [document for document in documents if document["event_type"] in HAND_EVENTS]
        if not helps:
            return
        hands = await self._latest_hands(connection, sorted({d["student_id"] for d in helps}))
        raised = []
        for document in helps:
            hand = next_hand(hands.get(document["student_id"]), document, at)
            hands[document["student_id"]] = hand
            if hand is not None and hand["raise_id"] == document["id"]:
                raised.append(document)
        rows = [dict(hand) for hand in hands.values() if hand is not None]
        for row in rows:
            for column in HAND_TIMES:
                if row[column] is not None:
                    row[column] = self.db_time(as_datetime(row[column]))
        await self._upsert(connection, "hand_raises", rows)
        await self._upsert(connection, "activity", activity_rows([], raised, minute_of(at)))

    async def _upsert(self, connection: Any, table: str, rows: list[dict]) -> None:
        """One summary table's rows: a statement of arrays on PostgreSQL, one by one on SQLite."""
        if not self.is_postgres:
            for row in rows:
                await connection.execute(UPSERT_ONE[table], row)
        elif rows:
            columns = SUMMARY_UPSERTS[table][0]
            arrays = {column: [row[column] for row in rows] for column in columns}
            await COMMIT_STATEMENTS[UPSERT_ARRAYS[table]].fetch(connection, arrays)

    async def _latest_hands(self, connection: Any, students: list[str]) -> dict[str, dict]:
        if self.is_postgres:
            statement = COMMIT_STATEMENTS[SELECT_LATEST_HANDS]
            rows = await statement.fetch(connection, {"student_ids": students})
        else:
            rows = []
            for student in students:
                row = await connection.fetch_one(SELECT_LATEST_HAND, {"student_id": student})
                rows += [] if row is None else [row._mapping]
        return {row["student_id"]: dict(row) for row in rows}

    async def _store_one(self, connection: Any, event: dict) -> StoredEvent:
        existing = await connection.fetch_val(SELECT_EVENT_ID, {"event_id": event["event_id"]})
        if existing is None:
            student = await connection.fetch_one(
                UPSERT_STUDENT,
                {
                    "student_id": event["student_id"],
                    "name": event["student_name"],
                    "course_id": event["course_id"],
                    "team": event["team"],
                    "seen": format_timestamp(event["received_at"]),
                },
            )
            new_id = await connection.fetch_val(INSERT_EVENT, self._event_values(event))
            if new_id is not None:
                return StoredEvent(event_document(event, new_id, student._mapping), duplicate=False)
            # A concurrent writer stored the same event_id first.
            existing = await connection.fetch_val(SELECT_EVENT_ID, {"event_id": event["event_id"]})
        return StoredEvent({"id": existing, "event_id": event["event_id"]}, duplicate=True)

    @staticmethod
    def _event_values(event: dict) -> dict[str, Any]:
        """INSERT_EVENT's values, for SQLite: JSON as text, timestamps as our sortable UTC text."""
        values = {column: event[column] for column in EVENT_COLUMNS[1:] if column in event}
        del values["student_name"], values["team"]
        for column in JSON_COLUMNS:
            if values[column] is not None:
                values[column] = orjson.dumps(values[column]).decode()
        for column in ("occurred_at", "received_at"):
            values[column] = format_timestamp(event[column])
        return values


# Retention: a pass at start, then every RETENTION_INTERVAL_SECONDS. Each batch is a short
# transaction under the commit order, so ingest waits at most one batch: 1,000 events took
# 16 to 30 ms on PostgreSQL with a million stored (bench/retention.py).
RETENTION_INTERVAL_SECONDS = 300.0


RETENTION_BATCH_EVENTS = 1_000


async def keep_retention(storage: Storage, days: int) -> None:
    """Forget, for ever, what was received more than `days` ago (the server's clock, which
    clients cannot set)."""
    while True:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        started = time.monotonic()
        try:
            totals = await storage.retain(cutoff, RETENTION_BATCH_EVENTS)
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


async def read_storage(read: Awaitable[Any]) -> Any:
    """A read for the read API; a database failure becomes 503, as for writes."""
    try:
        return await read
    except Exception as error:  # the driver's errors differ by backend
        logger.warning("read failed: %r", error)
        raise storage_unavailable("the database could not be read") from None
