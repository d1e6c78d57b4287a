"""The class view: the rules behind the dashboard (raised hands, error streaks, stuck,
struggling, presence, the courses a token reads) and the reads that apply them: students, the
help queue, activity. The rules need no database: storage applies next_hand as it
stores, and the reads here are given the Storage. The cell views are in cellview.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from telemetry.storage import Storage


# One text form for every timestamp emitted, sortable as text, as SQLite stores it; a batch's
# events share received_at and often occurred_at, so the cache saves most strftime calls.
@functools.lru_cache(maxsize=1024)
def format_timestamp(value: dt.datetime | str) -> str:
    if isinstance(value, str):
        return value
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def as_datetime(value: dt.datetime | str) -> dt.datetime:  # SQLite keeps our UTC text
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return moment.astimezone(dt.UTC)


def minute_of(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


# A scoped token's courses travel as one JSON array parameter, `:courses`, NULL for all.
def in_scope(course: str) -> str:
    """The read API's one course guard: a row is read only if its course is the token's."""
    return (
        f"(CAST(:courses AS TEXT) IS NULL OR {course} IN "
        "(SELECT value FROM jsonb_array_elements_text(CAST(:courses AS JSONB))))"
    )


def in_course(course: str) -> str:
    """The rows of the course asked for, if any (`:course_id`), that the token may read."""
    return f"(CAST(:course_id AS TEXT) IS NULL OR {course} = :course_id) AND {in_scope(course)}"


# An event `e` of student `s` is in scope by its own course, else the student's, as its
# document shows it. A student's counts (student_counts) are over every course.
EVENT_COURSE = "COALESCE(e.course_id, s.course_id)"
EVENT_IN_SCOPE = in_scope(EVENT_COURSE)

# A raised hand is a heartbeat: cell-monitor-extension repeats `help` every 10 s (its older
# release every 5 s, and never sends help_stop). Three missed 10 s beats lower the hand.
HAND_TIMEOUT = dt.timedelta(seconds=30)
HAND_EVENTS = ("help", "help_stop", "help_dismissed", "help_on_my_way")


def hand_is_live(hand: Mapping[str, Any] | None, moment: dt.datetime) -> bool:
    """Still beating at `moment`: not lowered by help_stop, last beat within HAND_TIMEOUT."""
    return (
        hand is not None
        and hand["state"] != "stopped"
        and moment - as_datetime(hand["last_beat_at"]) <= HAND_TIMEOUT
    )


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
        return {"raise_id": document["id"], "student_id": document["student_id"],
                "raised_at": at, "last_beat_at": at, "state": "up", "on_my_way_by": None,
                "on_my_way_at": None}  # fmt: skip
    hand = dict(hand)
    if kind == "help":
        hand["last_beat_at"] = at
    elif kind == "help_stop":
        hand["state"] = "stopped"
    elif hand["state"] == "up" and kind == "help_dismissed":
        hand["state"] = "dismissed"
    elif hand["state"] == "up" and kind == "help_on_my_way":
        extra = document.get("extra")
        by = extra.get("by") if isinstance(extra, Mapping) else None
        hand.update(on_my_way_by=by, on_my_way_at=at)
    return hand


HAND_COLUMNS = """raise_id BIGINT, student_id TEXT, raised_at TIMESTAMPTZ, last_beat_at TIMESTAMPTZ,
    state TEXT, on_my_way_by TEXT, on_my_way_at TIMESTAMPTZ"""
HAND_TYPES = dict(column.split() for column in HAND_COLUMNS.split(","))

# The latest raise of each of `:students`: the state next_hand starts from.
SELECT_LATEST_HANDS = f"""
SELECT {", ".join(HAND_TYPES)} FROM hand_raises WHERE raise_id IN (
    SELECT (SELECT MAX(h.raise_id) FROM hand_raises h WHERE h.student_id = value)
    FROM jsonb_array_elements_text(CAST(:students AS JSONB)))"""

UPSERT_HANDS = f"""
INSERT INTO hand_raises ({", ".join(HAND_TYPES)})
SELECT {", ".join(f"CAST(value ->> '{name}' AS {kind})" for name, kind in HAND_TYPES.items())}
FROM jsonb_array_elements(CAST(:hands AS JSONB)) WHERE true
ON CONFLICT (raise_id) DO UPDATE SET last_beat_at = excluded.last_beat_at,
    state = excluded.state, on_my_way_by = excluded.on_my_way_by,
    on_my_way_at = excluded.on_my_way_at"""


# How a raise ended, written once when it did: help_stop ("stopped") or a dismissal, with who
# dismissed. A raise left without a beat ended at its last beat, known only when read.
INSERT_ENDINGS = """
INSERT INTO hand_endings (raise_id, student_id, ended_at, ended_how, ended_by)
SELECT CAST(value ->> 'raise_id' AS BIGINT), value ->> 'student_id',
       CAST(value ->> 'ended_at' AS TIMESTAMPTZ), value ->> 'ended_how', value ->> 'ended_by'
FROM jsonb_array_elements(CAST(:endings AS JSONB)) WHERE true
ON CONFLICT (raise_id) DO NOTHING"""


def hand_ending(before: Any, after: Any, event: Mapping[str, Any], at: dt.datetime) -> Any:
    """The ending row of the raise `event` lowered (`before` -> `after`), or None."""
    if after is None or after["state"] == "up":
        return None
    if before is not None and before["raise_id"] == after["raise_id"] and before["state"] != "up":
        return None  # lowered before: a help_stop after a dismissal ends nothing new
    extra = event.get("extra")
    by = extra.get("by") if isinstance(extra, Mapping) and after["state"] == "dismissed" else None
    return {"raise_id": after["raise_id"], "student_id": after["student_id"], "ended_by": by,
            "ended_at": format_timestamp(at), "ended_how": after["state"]}  # fmt: skip


async def record_hands(
    storage: Storage, connection: Any, events: list[dict], at: dt.datetime
) -> None:
    """Apply a batch's new HAND_EVENTS, with their ids, in id order, to their students' latest
    raises, in the batch's transaction on `connection`; the raises they end, to hand_endings."""
    students = orjson.dumps(sorted({event["student_id"] for event in events})).decode()
    latest = await storage.rows(SELECT_LATEST_HANDS, {"students": students}, connection)
    hands = {row["student_id"]: dict(row) for row in latest}
    endings = []
    for event in events:
        before = hands.get(event["student_id"])
        hands[event["student_id"]] = next_hand(before, event, at)
        endings.append(hand_ending(before, hands[event["student_id"]], event, at))
    rows = [
        {name: format_timestamp(value) if name.endswith("_at") and value else value
         for name, value in hand.items()}
        for hand in hands.values() if hand is not None
    ]  # fmt: skip
    await storage.execute(UPSERT_HANDS, {"hands": orjson.dumps(rows).decode()}, connection)
    if any(endings):
        endings_json = orjson.dumps([ending for ending in endings if ending]).decode()
        await storage.execute(INSERT_ENDINGS, {"endings": endings_json}, connection)


# A student is stuck after this many errors in a row on one cell; the dashboard uses the
# same rule (static/dashboard.js) for live updates.
STUCK_ERROR_STREAK = 3
STREAK_LOOKBACK_EXECUTIONS = 20
# Struggling, unlike stuck, survives moving between cells: this many errors among the
# last STREAK_LOOKBACK_EXECUTIONS executions, any cells.
STRUGGLING_ERRORS = 6
# Presence, as the dashboard shows it: active within ACTIVE, idle within IDLE, then away.
ACTIVE = dt.timedelta(minutes=2)
IDLE = dt.timedelta(minutes=10)

# Stalled: no progress for the STALLED_MINUTES setting (see stalled_since).
STALLED_MINUTES_DEFAULT = 10
# One status per student, the first that holds, most urgent first (see student_status).
STATUSES = ("help", "stuck", "stalled", "struggling", "active", "idle", "away")

# The rules above as the page reads them (in the session answer), so it never copies them.
CLASS_RULES = {
    "hand_timeout_seconds": HAND_TIMEOUT.total_seconds(),
    "stuck_error_streak": STUCK_ERROR_STREAK,
    "recent_executions": STREAK_LOOKBACK_EXECUTIONS,
    "struggling_errors": STRUGGLING_ERRORS,
    "active_seconds": ACTIVE.total_seconds(),
    "idle_seconds": IDLE.total_seconds(),
    "stalled_minutes": STALLED_MINUTES_DEFAULT,
}


def class_rules(stalled_minutes: int) -> dict:
    return {**CLASS_RULES, "stalled_minutes": stalled_minutes}


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


def is_struggling(statuses: list[str]) -> bool:
    """STRUGGLING_ERRORS among the last STREAK_LOOKBACK_EXECUTIONS statuses (oldest first)."""
    return statuses[-STREAK_LOOKBACK_EXECUTIONS:].count("error") >= STRUGGLING_ERRORS


def streak_started(runs: list[tuple[str | None, str, str]]) -> str:
    """When error_streak's streak began, over (cell_id, status, received_at) runs, oldest
    first, that have one: the time of its first error, read backwards from its last."""
    last = max(index for index, (_, status, _) in enumerate(runs) if status == "error")
    cell, started = runs[last][0], runs[last][2]
    for cell_id, status, at in reversed(runs[:last]):
        if cell_id == cell and status == "error":
            started = at
        elif cell_id == cell or status == "error":
            break
    return started


def stalled_since(
    runs: list[tuple[str | None, str, str]], last_seen: dt.datetime, now: dt.datetime,
    stalled_after: dt.timedelta,
) -> str | None:  # fmt: skip
    """When a student's stall began, if they are stalled at `now`, else None. Their latest run
    failed and they are not away, and either they are active and have failed on that cell
    for `stalled_after` (no ok there since), or they went quiet after it (idle)."""
    if not runs or runs[-1][1] != "error" or now - last_seen >= IDLE:
        return None
    if now - last_seen >= ACTIVE:
        return runs[-1][2]
    started = streak_started(runs)
    return started if now - as_datetime(started) >= stalled_after else None


def student_status(document: Mapping[str, Any], last_seen: dt.datetime, now: dt.datetime) -> str:
    """The first of STATUSES that holds for a student document: a flag, else presence."""
    for status in STATUSES[:4]:
        if document["hand_raised" if status == "help" else status]:
            return status
    quiet = now - last_seen
    return "active" if quiet < ACTIVE else "idle" if quiet < IDLE else "away"


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


# A hand `h` is in scope by the help event that raised it.
RAISED_IN_SCOPE = f"""(CAST(:courses AS TEXT) IS NULL OR EXISTS (
    SELECT 1 FROM events e WHERE e.id = h.raise_id AND {EVENT_IN_SCOPE}))"""


def last_place(student_id: str) -> str:
    """The id of the student's latest event in a notebook with a cell, else in a notebook:
    help beats and saves carry a notebook but no cell, and must not lose the student's place."""

    def latest(condition: str) -> str:
        return f"""(SELECT MAX(e.id) FROM events e
            WHERE e.student_id = {student_id} AND {condition} AND {EVENT_IN_SCOPE})"""

    in_notebook = "e.notebook_path IS NOT NULL"
    has_cell = f"{in_notebook} AND (e.cell_id IS NOT NULL OR e.cell_index IS NOT NULL)"
    return f"COALESCE({latest(has_cell)}, {latest(in_notebook)})"


# Beating raises only: an index range on last_beat_at, whatever the table's history.
SELECT_BEATING_HANDS = f"""
SELECT h.raise_id, h.student_id, h.raised_at, h.last_beat_at, h.state, h.on_my_way_by,
       h.on_my_way_at, s.name, s.team, s.course_id,
       place.notebook_path, place.cell_id, place.cell_index
FROM hand_raises h
JOIN students s ON s.student_id = h.student_id
LEFT JOIN events place ON place.id = {last_place("h.student_id")}
WHERE h.last_beat_at >= :cutoff AND h.state <> 'stopped'
  AND {in_course("s.course_id")} AND {RAISED_IN_SCOPE}
ORDER BY h.raised_at, h.raise_id
"""

HAND_PLACE_COLUMNS = ("name", "team", "course_id", "notebook_path", "cell_id", "cell_index")


async def hands(storage: Storage, params: Mapping[str, Any], now: dt.datetime) -> list[dict]:
    """Raises still beating at `now`, oldest first, with where their student last was."""
    found, cutoff = [], storage.db_time(now - HAND_TIMEOUT)
    for row in await storage.rows(SELECT_BEATING_HANDS, {**params, "cutoff": cutoff}):
        hand = hand_document(row, now)
        if hand is not None:
            found.append(hand | {column: row[column] for column in HAND_PLACE_COLUMNS})
    return found


SELECT_LATEST_HAND = f"""
SELECT {", ".join(HAND_TYPES)} FROM hand_raises WHERE student_id = :student_id
ORDER BY raise_id DESC LIMIT 1"""


async def latest_hand(storage: Storage, student_id: str) -> dict | None:
    rows = await storage.rows(SELECT_LATEST_HAND, {"student_id": student_id})
    return dict(rows[0]) if rows else None


ACTIVITY_SUMS = """SELECT minute, CAST(SUM(executions) AS BIGINT) AS executions,
       CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(help) AS BIGINT) AS help"""
SELECT_ACTIVITY = f"""{ACTIVITY_SUMS}
FROM activity WHERE minute >= :first AND {in_course("course_id")}
GROUP BY minute"""
# One team's (`:team`): activity_teams counts each event in the team its document shows.
SELECT_TEAM_ACTIVITY = f"""{ACTIVITY_SUMS}
FROM activity_teams WHERE minute >= :first AND team = :team AND {in_course("course_id")}
GROUP BY minute"""

SELECT_ACTIVE = f"""
SELECT minute, COUNT(DISTINCT student_id) AS active
FROM active_minutes WHERE minute >= :first AND {in_course("course_id")}
  AND (CAST(:team AS TEXT) IS NULL
       OR student_id IN (SELECT student_id FROM students WHERE team = :team))
GROUP BY minute"""

SERIES_COUNTS = ("executions", "errors", "help", "active")


def activity_series(
    rows: Iterable[Mapping[str, Any]], first: dt.datetime, minutes: int
) -> list[dict]:
    """One entry per minute from `first`, zeros where nothing happened."""
    counts = {row["minute"]: dict(row) for row in rows}
    series = []
    for step in range(minutes):
        minute = minute_of(first + dt.timedelta(minutes=step))
        row = counts.get(minute, {})
        totals = {name: row.get(name, 0) for name in SERIES_COUNTS}
        series.append({"minute": minute.removesuffix("Z") + ":00Z", **totals})
    return series


async def activity(storage: Storage, params: Mapping[str, Any], now: dt.datetime) -> list[dict]:
    """Executions, errors, raised hands and active students per minute, the last `minutes`,
    oldest first, of everyone or of one team."""
    first = now - dt.timedelta(minutes=params["minutes"] - 1)
    query = {**params, "team": params.get("team"), "first": minute_of(first)}
    sql = SELECT_TEAM_ACTIVITY if params.get("team") else SELECT_ACTIVITY
    rows = {row["minute"]: dict(row) for row in await storage.rows(sql, query)}
    for row in await storage.rows(SELECT_ACTIVE, query):
        rows.setdefault(row["minute"], {"minute": row["minute"]})["active"] = row["active"]
    return activity_series(rows.values(), first, params["minutes"])
