"""The rules behind the dashboard: raised hands, struggling, error texts, cells, CSV."""

import datetime as dt

import pytest

from telemetry.access import is_ingest_request
from telemetry.application import redact_url
from telemetry.classview import (
    activity_series,
    hand_document,
    is_struggling,
    next_hand,
)
from telemetry.config import ConfigError
from telemetry.errors import ApiError
from telemetry.events import camel_case_origins, error_text, parse_instructor, strip_ansi
from telemetry.readapi import csv_line, event_csv_row, parse_activity_query, parse_cells_query
from telemetry.storage import check_sqlite_version

T0 = dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC)


def replay(*steps: tuple[str, float]) -> dict | None:
    """Apply (event_type, seconds after T0) help events of one student; ids count from 1."""
    hand = None
    for number, (kind, seconds) in enumerate(steps, start=1):
        document = {"id": number, "student_id": "ada", "event_type": kind, "extra": {"by": "Lee"}}
        hand = next_hand(hand, document, T0 + dt.timedelta(seconds=seconds))
    return hand


def state_at(hand: dict | None, seconds: float) -> str | None:
    shown = hand_document(hand, T0 + dt.timedelta(seconds=seconds))
    return None if shown is None else shown["state"]


@pytest.mark.parametrize(
    ("steps", "seconds", "raise_id", "state"),
    [
        ([("help", 0)], 0, 1, "up"),
        ([("help", 0), ("help", 10), ("help", 20)], 20, 1, "up"),  # beats
        ([("help", 0), ("help", 10)], 40, 1, "up"),  # 30 s after the last beat: still up
        ([("help", 0), ("help", 10)], 40.5, 1, None),  # three missed beats: down
        ([("help", 0), ("help", 5), ("help", 10)], 10, 1, "up"),  # the older 5 s release
        ([("help", 0), ("help", 31)], 31, 2, "up"),  # a lapse, then a new hand
        ([("help", 0), ("help_stop", 5)], 5, 1, None),
        ([("help", 0), ("help_stop", 5), ("help", 6)], 6, 3, "up"),  # lowered and raised again
        ([("help", 0), ("help_dismissed", 5)], 5, 1, "dismissed"),
        ([("help", 0), ("help_dismissed", 5), ("help", 10)], 10, 1, "dismissed"),  # beats on
        ([("help", 0), ("help_dismissed", 5), ("help", 10)], 41, 1, None),
        ([("help", 0), ("help_dismissed", 5), ("help", 50)], 50, 3, "up"),  # after a lapse
        ([("help", 0), ("help_dismissed", 5), ("help_stop", 8), ("help", 9)], 9, 4, "up"),
        ([("help_stop", 0)], 0, None, None),
        ([("help_dismissed", 0)], 0, None, None),
    ],
)
def test_a_raised_hand_is_a_heartbeat(steps, seconds, raise_id, state) -> None:
    hand = replay(*steps)
    assert (hand and hand["raise_id"]) == raise_id
    assert state_at(hand, seconds) == state


def test_raised_at_is_the_first_help_and_beats_move_only_the_last_beat() -> None:
    hand = replay(("help", 0), ("help", 10), ("help", 20))
    shown = hand_document(hand, T0 + dt.timedelta(seconds=21))
    assert shown["raised_at"] == "2026-11-27T09:00:00.000000Z"
    assert shown["last_beat_at"] == "2026-11-27T09:00:20.000000Z"


def test_on_my_way_records_who_and_a_new_raise_forgets_it() -> None:
    hand = replay(("help", 0), ("help_on_my_way", 3))
    shown = hand_document(hand, T0 + dt.timedelta(seconds=4))
    assert shown["state"] == "up"
    assert shown["on_my_way"] == {"by": "Lee", "at": "2026-11-27T09:00:03.000000Z"}
    again = replay(("help", 0), ("help_on_my_way", 3), ("help_stop", 4), ("help", 5))
    assert hand_document(again, T0 + dt.timedelta(seconds=5))["on_my_way"] is None


def test_hands_read_back_from_sqlite_as_text_follow_the_same_rule() -> None:
    stored = {**replay(("help", 0)), "raised_at": "2026-11-27T09:00:00.000000Z"}
    stored["last_beat_at"] = "2026-11-27T09:00:00.000000Z"
    assert state_at(stored, 30) == "up" and state_at(stored, 31) is None


@pytest.mark.parametrize(
    ("statuses", "struggling"),
    [
        ([], False),
        (["error"] * 5, False),
        (["error"] * 6, True),
        (["ok", "error"] * 10, True),
        (["error"] * 6 + ["ok"] * 15, False),  # the errors fell out of the last 20
        (["ok", "ok", "error"] * 7, True),  # one in three, on any cells
    ],
)
def test_struggling_is_six_errors_in_the_last_twenty_runs(statuses, struggling) -> None:
    assert is_struggling(statuses) is struggling


@pytest.mark.parametrize(
    ("error", "text"),
    [
        ({"ename": "NameError", "evalue": "name 'x'"}, "NameError: name 'x'"),
        ({"ename": None, "evalue": "\x1b[0;31mZero\x1b[0m: x"}, "Zero: x"),
        ({"ename": "E", "evalue": "[0;31mboom[0m"}, "E: boom"),
        ({"ename": "E", "evalue": ""}, "E"),
        ({"ename": None, "evalue": None}, None),
        (None, None),
        ({"ename": "E", "evalue": "y" * 400}, "E: " + "y" * 297),
    ],
)  # fmt: skip
def test_error_text_is_ename_evalue_without_colour_codes(error, text) -> None:
    assert error_text(error) == text


# An IPython traceback as some clients send it in place of the message: colours, frames, In[N].
TRACEBACK = (
    "\x1b[0;31m" + "-" * 75 + "\x1b[0m\n"
    "\x1b[0;31mKeyError\x1b[0m" + " " * 30 + "Traceback (most recent call last)\n"
    "Cell \x1b[0;32mIn[11], line 2\x1b[0m\n----> 2 df['price']\n\n"
    "\x1b[0;31mKeyError\x1b[0m: 'price'\n"
)


@pytest.mark.parametrize(
    "error",
    [
        {"ename": None, "evalue": TRACEBACK},  # a string `error`, or camelCase errorMessage
        {"traceback": TRACEBACK.splitlines()},  # only the traceback's lines
        {"ename": "KeyError", "evalue": "'price'", "traceback": TRACEBACK.splitlines()},
    ],
)
def test_a_whole_traceback_is_reduced_to_ename_evalue(error) -> None:
    assert error_text(error) == "KeyError: 'price'"


def test_a_message_over_several_lines_is_kept_whole() -> None:
    assert error_text({"ename": None, "evalue": "ValueError: a\nb"}) == "ValueError: a\nb"


def test_strip_ansi_keeps_ordinary_brackets() -> None:
    assert strip_ansi("a[0] = \x1b[1;32mok\x1b[0m [x]") == "a[0] = ok [x]"


def test_activity_series_fills_quiet_minutes_with_zeros() -> None:
    rows = [{"minute": "2026-11-27T09:01Z", "executions": 4, "errors": 1, "help": 0}]
    series = activity_series(rows, T0, 3)
    assert [entry["minute"] for entry in series] == [
        "2026-11-27T09:00:00Z", "2026-11-27T09:01:00Z", "2026-11-27T09:02:00Z"
    ]  # fmt: skip
    assert [entry["executions"] for entry in series] == [0, 4, 0]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2", "'-2"),
        ("@cmd", "'@cmd"),
        ("plain, with comma", '"plain, with comma"'),
        (-2, "-2"),
        (None, ""),
        (True, "true"),
    ],
)
def test_csv_cells_defuse_spreadsheet_formulas(value, cell) -> None:
    assert csv_line([value, "x"]) == f"{cell},x\r\n".encode()


def test_event_csv_row_shows_the_error_as_text() -> None:
    row = event_csv_row({"id": 1, "error": {"ename": "E", "evalue": "\x1b[31mv\x1b[0m"}})
    assert row[0] == 1 and "E: v" in row


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        ({"eventType": "x"}, {"event_type": "eventType", "student_id": "emailAddress"}),
        ({"eventType": "x", "userId": "u"}, {"event_type": "eventType", "student_id": "userId"}),
        ({"event_type": "x"}, {}),
        ({"eventType": "x", "student_id": "s"}, {"event_type": "eventType"}),
        ({"hasError": "true"}, {"status": "hasError", "student_id": "emailAddress",
                                "event_type": "eventType"}),
    ],
)  # fmt: skip
def test_camel_case_origins_name_the_keys_the_client_sent(raw, origins) -> None:
    assert camel_case_origins(raw) == origins


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ({"minutes": "0"}, ["minutes"]),
        ({"minutes": "1441"}, ["minutes"]),
        ({"course": "x"}, ["course"]),
    ],
)
def test_activity_query_refuses_bad_and_unknown_parameters(query, fields) -> None:
    with pytest.raises(ApiError) as refused:
        parse_activity_query(query)
    assert [detail["field"] for detail in refused.value.details] == fields


def test_cells_query_defaults() -> None:
    assert parse_cells_query({"token": "t"}) == {
        "course_id": None, "team": None, "notebook_path": None, "limit": 200
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "content_type", "by"),
    [
        (b"", None, None),
        (b"{}", "application/json", None),
        (b'{"by": "Ms Lee"}', "application/json", "Ms Lee"),
        (b'{"by": null}', "application/json", None),
    ],
)
def test_instructor_name_is_optional(body, content_type, by) -> None:
    assert parse_instructor(body, content_type) == by


@pytest.mark.parametrize(
    ("method", "path", "requested", "ingest"),
    [
        ("POST", "/api/v1/events", None, True),
        ("OPTIONS", "/api/v1/events", b"POST", True),
        ("OPTIONS", "/api/v1/events/2026/11/27/09", b"POST", True),
        ("POST", "/api/v1/events/2026/11/27/09", None, True),
        ("OPTIONS", "/api/v1/events", b"GET", False),
        ("GET", "/api/v1/events", None, False),
        ("POST", "/api/v1/events.csv", None, False),
        ("OPTIONS", "/api/v1/students", b"POST", False),
        ("POST", "/api/v1/help/ada/dismiss", None, False),
    ],
)
def test_only_posting_events_is_ingest_for_cors(method, path, requested, ingest) -> None:
    headers = [(b"access-control-request-method", requested)] if requested else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    assert is_ingest_request(scope) is ingest


def test_database_url_passwords_never_reach_the_log() -> None:
    assert redact_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("sqlite:///telemetry.db") == "sqlite:///telemetry.db"


@pytest.mark.parametrize("version", ["3.31.1", "3.37.2", "2.8.17"])
def test_a_sqlite_too_old_for_our_sql_is_refused_in_one_line(version) -> None:
    with pytest.raises(ConfigError) as refused:
        check_sqlite_version(version)
    assert str(refused.value).startswith(f"SQLite {version} is older than 3.38, which telemetry")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("version", ["3.38.0", "3.40.1", "3.45.3", "4.0"])
def test_a_recent_sqlite_is_accepted(version) -> None:
    check_sqlite_version(version)
