"""What help took: per raise, the wait until someone answered it (on my way, else a
dismissal) and how long the hand stayed up, and those figures per helper and per student.
Reads hand_raises and hand_endings (written by classview.record_hands); writes nothing.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from telemetry.classview import (
    RAISED_IN_SCOPE,
    as_datetime,
    format_timestamp,
    hand_is_live,
    in_course,
)

if TYPE_CHECKING:
    from telemetry.storage import Storage

PAGE_SIZE = 1_000

# Raises from :since in the course, team and scope asked for, through hand_raises_raised_idx.
# A LEFT JOIN keeps hand_raises the outer side: PostgreSQL's generic plan for this prepared
# statement (after five runs) guesses one student matches the optional filters, and led
# with students, probing hand_raises_raised_idx once per student. Every raise has its student.
RAISES_FROM = f"""
FROM hand_raises h LEFT JOIN students s ON s.student_id = h.student_id
LEFT JOIN hand_endings x ON x.raise_id = h.raise_id
WHERE h.raised_at >= :since
  AND {in_course("s.course_id")} AND (CAST(:team AS TEXT) IS NULL OR s.team = :team)
  AND {RAISED_IN_SCOPE}"""
RAISE_FIELDS = """h.raise_id, h.student_id, s.name, s.team, s.course_id, h.raised_at,
       h.last_beat_at, h.state, h.on_my_way_by, h.on_my_way_at, x.ended_at, x.ended_how,
       x.ended_by"""
# Oldest first after :after (the CSV), newest first before :before_id (the JSON's pages).
SELECT_RAISES = (
    f"SELECT {RAISE_FIELDS} {RAISES_FROM} AND h.raise_id > :after ORDER BY h.raise_id LIMIT :limit"
)
SELECT_NEWEST_RAISES = f"""SELECT {RAISE_FIELDS} {RAISES_FROM} AND h.raise_id < :before_id
ORDER BY h.raise_id DESC LIMIT :limit"""
# Only what the medians need, every raise at once: no formatted times, no documents.
SELECT_FIGURE_ROWS = f"""SELECT h.student_id, s.name, h.raised_at, h.last_beat_at, h.state,
       h.on_my_way_by, h.on_my_way_at, x.ended_at, x.ended_how, x.ended_by {RAISES_FROM}"""

RAISE_COLUMNS = (
    "raise_id student_id name team course_id raised_at on_my_way_at on_my_way_by ended_at "
    "ended_how ended_by answered_by wait_seconds up_seconds"
).split()


def seconds_between(start: Any, end: Any) -> float | None:
    if start is None or end is None:
        return None
    return round((as_datetime(end) - as_datetime(start)).total_seconds(), 3)


def ending(row: Mapping[str, Any], now: dt.datetime) -> tuple[Any, str | None]:
    """(ended_at, how) of a raise; (None, None) while it beats. A raise that stopped beating
    ended at its last beat: "timeout", or its state for raises older than hand_endings."""
    if row["ended_at"] is not None:
        return row["ended_at"], row["ended_how"]
    if hand_is_live(row, now):
        return None, None
    return row["last_beat_at"], "timeout" if row["state"] == "up" else row["state"]


def answer_and_end(row: Mapping[str, Any], now: dt.datetime) -> tuple[Any, Any, Any, Any]:
    """(answered_at, answered_by, ended_at, ended_how) of a raise: answered by "on my way",
    else by a dismissal."""
    ended_at, how = ending(row, now)
    answered_at, answered_by = row["on_my_way_at"], row["on_my_way_by"]
    if answered_at is None and how == "dismissed":
        answered_at, answered_by = ended_at, row["ended_by"]
    return answered_at, answered_by, ended_at, how


def raise_document(row: Mapping[str, Any], now: dt.datetime) -> dict:
    """One raise with its wait (to on my way, else to a dismissal) and its time up."""
    answered_at, answered_by, ended_at, how = answer_and_end(row, now)
    return {
        **{name: row[name] for name in ("raise_id", "student_id", "name", "team", "course_id")},
        "raised_at": format_timestamp(row["raised_at"]),
        "on_my_way_at": row["on_my_way_at"] and format_timestamp(row["on_my_way_at"]),
        "on_my_way_by": row["on_my_way_by"],
        "ended_at": ended_at and format_timestamp(ended_at),
        "ended_how": how,
        "ended_by": row["ended_by"],
        "answered": answered_at is not None,
        "answered_by": answered_by,
        "wait_seconds": seconds_between(row["raised_at"], answered_at),
        "up_seconds": seconds_between(row["raised_at"], ended_at),
    }


def raise_figures(row: Mapping[str, Any], now: dt.datetime) -> dict:
    """Of one raise, only what help_figures reads."""
    answered_at, answered_by, ended_at, _ = answer_and_end(row, now)
    return {
        "student_id": row["student_id"],
        "name": row["name"],
        "answered": answered_at is not None,
        "answered_by": answered_by,
        "wait_seconds": seconds_between(row["raised_at"], answered_at),
        "up_seconds": seconds_between(row["raised_at"], ended_at),
    }


def since_params(storage: Storage, params: Mapping[str, Any]) -> dict:
    return {**params, "since": storage.db_time(params["since"])}


async def raises_page(
    storage: Storage, params: Mapping[str, Any], after: int, now: dt.datetime
) -> list[dict]:
    """Raises oldest first after raise `after`, a page at a time (the CSV)."""
    query = {**since_params(storage, params), "after": after, "limit": PAGE_SIZE}
    return [raise_document(row, now) for row in await storage.rows(SELECT_RAISES, query)]


async def newest_raises(storage: Storage, params: Mapping[str, Any], now: dt.datetime) -> list:
    """Raises newest first before `before_id`, `limit` of them."""
    rows = await storage.rows(SELECT_NEWEST_RAISES, since_params(storage, params))
    return [raise_document(row, now) for row in rows]


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def group_figures(raises: list[dict], key: str) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for document in raises:
        groups.setdefault(document[key], []).append(document)
    return groups


def help_figures(raises: list[dict]) -> dict:
    """The summary, per helper (who answered) and per student, over documents of raises."""
    answered = [document for document in raises if document["answered"]]
    helpers = sorted(
        group_figures(answered, "answered_by").items(),
        key=lambda item: (-len(item[1]), item[0] or ""),
    )
    students = group_figures(raises, "student_id")
    return {
        "summary": {
            "raises": len(raises),
            "answered": len(answered),
            "median_wait_seconds": median(d["wait_seconds"] for d in answered),
            "median_up_seconds": median(d["up_seconds"] for d in raises),
        },
        "helpers": [
            {"helper": helper, "raises_answered": len(group),
             "median_wait_seconds": median(d["wait_seconds"] for d in group)}
            for helper, group in helpers
        ],
        "students": [
            {"student_id": student_id, "name": group[-1]["name"], "raises": len(group),
             "answered": sum(d["answered"] for d in group),
             "median_wait_seconds": median(d["wait_seconds"] for d in group),
             "median_up_seconds": median(d["up_seconds"] for d in group)}
            for student_id, group in sorted(students.items())
        ],
    }  # fmt: skip


async def help_stats(storage: Storage, params: Mapping[str, Any], now: dt.datetime) -> dict:
    """help_figures over every raise from `since` in the token's courses."""
    rows = await storage.rows(SELECT_FIGURE_ROWS, since_params(storage, params))
    return help_figures([raise_figures(row, now) for row in rows])
