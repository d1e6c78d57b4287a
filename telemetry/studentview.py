"""The students as the dashboard's table and the read API see them: counts, place, hand, and
classview's rules (streaks, stalled, status) applied to their latest runs. Reads only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from telemetry.classview import (
    EVENT_IN_SCOPE,
    HAND_TYPES,
    RAISED_IN_SCOPE,
    STALLED_MINUTES_DEFAULT,
    STREAK_LOOKBACK_EXECUTIONS,
    STUCK_ERROR_STREAK,
    as_datetime,
    error_streak,
    format_timestamp,
    hand_document,
    in_course,
    is_struggling,
    last_place,
    stalled_since,
    streak_started,
    student_status,
)

if TYPE_CHECKING:
    from telemetry.storage import Storage

# Correlated subqueries, each an index range on events (student_id, id): the cost follows the
# page's students, not the whole table (a join on the events of a page of them hashed every
# event). `recent`: their latest executions as [id, cell_id, status, received_at];
# aggregates keep no order in SQLite.
SELECT_STUDENT_PAGE = f"""
SELECT page.*, last.event_type AS last_event_type, notebook.notebook_path AS last_notebook_path,
       notebook.cell_id AS last_cell_id, notebook.cell_index AS last_cell_index,
       {", ".join(f"hand.{column} AS hand_{column}" for column in HAND_TYPES)}
FROM (
    SELECT s.student_id, s.name, s.course_id, s.team, s.first_seen, s.last_seen,
        COALESCE(c.events, 0) AS event_count, COALESCE(c.executions, 0) AS execution_count,
        COALESCE(c.errors, 0) AS error_count,
        (SELECT MAX(e.id) FROM events e
         WHERE e.student_id = s.student_id AND {EVENT_IN_SCOPE}) AS last_event_id,
        {last_place("s.student_id")} AS last_place_id,
        (SELECT MAX(h.raise_id) FROM hand_raises h
         WHERE h.student_id = s.student_id AND {RAISED_IN_SCOPE}) AS last_raise_id,
        (SELECT json_agg(json_build_array(r.id, r.cell_id, r.status, r.received_at)) FROM (
            SELECT e.id, e.cell_id, e.status, e.received_at FROM events e
            WHERE e.student_id = s.student_id AND e.status IS NOT NULL AND {EVENT_IN_SCOPE}
            ORDER BY e.id DESC LIMIT {STREAK_LOOKBACK_EXECUTIONS}) r) AS recent
    FROM students s LEFT JOIN student_counts c ON c.student_id = s.student_id
    WHERE s.student_id > :after AND {in_course("s.course_id")}
      AND (CAST(:team AS TEXT) IS NULL OR s.team = :team)
    ORDER BY s.student_id
    LIMIT :limit
) page
LEFT JOIN events last ON last.id = page.last_event_id
LEFT JOIN events notebook ON notebook.id = page.last_place_id
LEFT JOIN hand_raises hand ON hand.raise_id = page.last_raise_id
ORDER BY page.student_id
"""

STUDENT_COLUMNS = (
    "student_id name course_id team first_seen last_seen event_count execution_count "
    "error_count last_event_id last_event_type last_notebook_path last_cell_id last_cell_index"
).split()


def student_document(
    row: Mapping[str, Any], runs: list[tuple[str | None, str, str]], now: dt.datetime,
    stalled_after: dt.timedelta,
) -> dict:  # fmt: skip
    """One student as the read API and the dashboard's table see them; `runs` are their
    latest (cell_id, status, received_at), oldest first."""
    cell, count = error_streak([(cell_id, status) for cell_id, status, _ in runs])
    statuses = [status for _, status, _ in runs]
    latest = None
    if row["hand_state"] is not None:  # most students have no hand
        latest = {column: row[f"hand_{column}"] for column in HAND_TYPES}
    hand = hand_document(latest, now)
    raised = hand is not None and hand["state"] == "up"
    last_seen = as_datetime(row["last_seen"])
    stalled = stalled_since(runs, last_seen, now, stalled_after)
    document = {column: row[column] for column in STUDENT_COLUMNS}
    document.update(
        first_seen=format_timestamp(row["first_seen"]),
        last_seen=format_timestamp(row["last_seen"]),
        last_status=statuses[-1] if statuses else None,
        last_run_at=runs[-1][2] if runs else None,
        hand_raised=raised,
        **{
            f"hand_{key}": hand[key] if raised else None
            for key in ("raised_at", "last_beat_at", "on_my_way")
        },  # fmt: skip
        error_streak=count,
        streak_cell_id=cell,
        streak_started_at=streak_started(runs) if count else None,
        stuck=count >= STUCK_ERROR_STREAK,
        recent_statuses=statuses,
        struggling=is_struggling(statuses),
        stalled=stalled is not None,
        stalled_since=stalled,
    )
    document["status"] = student_status(document, last_seen, now)
    return document


async def students_page(
    storage: Storage, params: Mapping[str, Any], now: dt.datetime,
    stalled_minutes: int = STALLED_MINUTES_DEFAULT,
) -> list[dict]:  # fmt: skip
    """Students matching parse_students_query's params, by student_id, with their counts
    and their hands and status as they are at `now`."""
    documents, stalled_after = [], dt.timedelta(minutes=stalled_minutes)
    for row in await storage.rows(SELECT_STUDENT_PAGE, params):
        recent = sorted(orjson.loads(row["recent"] or "[]"))
        runs = [(cell, status, format_timestamp(as_datetime(at))) for _, cell, status, at in recent]
        documents.append(student_document(row, runs, now, stalled_after))
    return documents
