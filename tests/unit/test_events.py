import datetime as dt

import pytest

from telemetry.config import Settings
from telemetry.errors import ApiError
from telemetry.events import (
    cap_outputs,
    from_camel_case,
    is_json_content_type,
    parse_json_body,
    parse_occurred_at,
    replace_nul,
)
from telemetry.ingest import normalise_batch
from telemetry.streams import parse_last_event_id

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
SETTINGS = Settings(max_batch_events=3, max_outputs_bytes=40)


def normalise_one(raw: dict) -> dict:
    return normalise_batch(raw, NOW, SETTINGS)[0]


def problems(body) -> list[dict]:
    with pytest.raises(ApiError) as error:
        normalise_batch(body, NOW, SETTINGS)
    assert error.value.status == 422
    return error.value.details


def test_minimal_event_gets_server_defaults() -> None:
    event = normalise_one({"student_id": "s1", "event_type": "cell_executed"})
    assert event["occurred_at"] == NOW
    assert len(event["event_id"]) == 36
    assert event["extra"] == {}
    assert event["outputs_truncated"] is False


def test_full_snake_case_event_is_kept() -> None:
    raw = {
        "student_id": "s1",
        "event_type": "cell_executed",
        "event_id": "e-1",
        "occurred_at": "2026-11-26T11:59:00Z",
        "student_name": "Ada",
        "course_id": "cs101",
        "session_id": "sess",
        "notebook_path": "hw1.ipynb",
        "cell_id": "c1",
        "cell_index": 3,
        "execution_count": 7,
        "source": "print(1)",
        "status": "error",
        "error": {"ename": "NameError", "evalue": "x", "traceback": ["line"]},
        "duration_ms": 12.5,
        "seq": 9,
        "outputs": [{"text": "1"}],
        "kernel": "python3",
    }
    event = normalise_one(raw)
    for key in ("student_id", "event_id", "cell_index", "source", "status", "error", "seq"):
        assert event[key] == raw[key]
    assert event["occurred_at"] == dt.datetime(2026, 11, 26, 11, 59, tzinfo=dt.UTC)
    assert event["extra"] == {"kernel": "python3"}


def test_cell_monitor_extension_shape_is_mapped() -> None:
    raw = {
        "eventId": "0b6f",
        "eventType": "cell_executed",
        "eventTime": "2026-11-26T11:00:00.000Z",
        "emailAddress": "ada@uni.edu",
        "userName": "Ada",
        "teamName": "Team A",
        "sessionId": "s",
        "notebookPath": "lab.ipynb",
        "cellId": "c9",
        "cellIndex": 2,
        "cellType": "code",
        "code": "1/0",
        "executionCount": 4,
        "hasError": True,
        "errorMessage": "ZeroDivisionError: division by zero",
        "result": "",
        "executionDurationMs": 31,
    }
    event = normalise_one(raw)
    assert event["student_id"] == "ada@uni.edu"
    assert (event["student_name"], event["team"]) == ("Ada", "Team A")
    assert event["source"] == "1/0"
    assert event["status"] == "error"
    assert event["error"]["evalue"] == "ZeroDivisionError: division by zero"
    assert event["outputs"] == ""
    assert event["duration_ms"] == 31.0
    assert event["extra"] == {"cellType": "code"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"userId": "u1", "hasError": False}, {"student_id": "u1", "status": "ok"}),
        ({"emailAddress": "a", "userId": "b"}, {"student_id": "a"}),
        ({"student_id": "snake", "emailAddress": "camel"}, {"student_id": "snake"}),
        ({"eventType": "help"}, {"event_type": "help"}),
    ],
)
def test_camel_case_aliases(raw: dict, expected: dict) -> None:
    assert from_camel_case(raw) == expected


PLAUSIBLE_RANGE = "is outside the plausible range (2000-01-01 to two days from now)"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("student_id", None, "is required"),
        ("student_id", "", "must not be empty"),
        ("student_id", "   ", "must not be empty"),
        ("student_id", 42, "must be a string"),
        ("student_id", "x" * 257, "must be at most 256 characters"),
        ("event_type", ["a"], "must be a string"),
        ("event_id", "", "must not be empty"),
        ("cell_index", -1, "must be between 0 and 2147483647"),
        ("cell_index", 2**31, "must be between 0 and 2147483647"),
        ("cell_index", "3", "must be a whole number"),
        ("cell_index", True, "must be a whole number"),
        ("cell_index", 1.5, "must be a whole number"),
        ("seq", 2**63, "must be between 0 and 9223372036854775807"),
        ("duration_ms", -1, "must be a non-negative number of milliseconds"),
        ("duration_ms", "fast", "must be a number"),
        ("status", "failed", "must be 'ok' or 'error'"),
        ("error", 12, "must be an object with ename, evalue and traceback"),
        ("error", {"traceback": [1, 2]}, "traceback must be a list of strings"),
        ("occurred_at", "yesterday", "is not an ISO 8601 timestamp"),
        ("occurred_at", "1999-12-31T23:59:59Z", PLAUSIBLE_RANGE),
        ("occurred_at", "2126-01-01T00:00:00Z", PLAUSIBLE_RANGE),
        ("occurred_at", 1e300, "is not a plausible epoch-milliseconds value"),
        ("occurred_at", True, "must be an ISO 8601 string or epoch milliseconds"),
        ("notebook_path", "p" * 5000, "must be at most 4096 characters"),
    ],
)
def test_invalid_field_is_named(field: str, value, problem: str) -> None:
    raw = {"student_id": "s1", "event_type": "x", field: value}
    if value is None:
        del raw[field]
    assert problems(raw) == [{"field": f"event.{field}", "problem": problem}]


def nested(depth: int) -> object:
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


@pytest.mark.parametrize("field", ["outputs", "error", "extra_field", "result"])
def test_json_nested_over_64_deep_is_refused(field: str) -> None:
    raw = {"student_id": "s1", "event_type": "x", field: nested(65)}
    problem = "must not nest lists or objects over 64 deep"
    assert problems(raw) == [{"field": f"event.{field}", "problem": problem}]


def test_json_nested_64_deep_is_kept() -> None:
    event = normalise_one({"student_id": "s1", "event_type": "x", "extra_field": nested(64)})
    assert event["extra"] == {"extra_field": nested(64)}


def test_negative_zero_duration_is_stored_as_zero() -> None:
    duration = normalise_one({"student_id": "s1", "event_type": "x", "duration_ms": -0.0})
    assert str(duration["duration_ms"]) == "0.0"


def test_every_invalid_event_of_a_batch_is_reported() -> None:
    details = problems([{"student_id": "s", "event_type": "x"}, "nope", {"event_type": "x"}])
    assert [d["field"] for d in details] == ["events[1]", "events[2].student_id"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-26T10:00:00Z", dt.datetime(2026, 11, 26, 10, tzinfo=dt.UTC)),
        ("2026-11-26T11:00:00+01:00", dt.datetime(2026, 11, 26, 10, tzinfo=dt.UTC)),
        ("2026-11-26T10:00:00.250", dt.datetime(2026, 11, 26, 10, 0, 0, 250000, tzinfo=dt.UTC)),
        (1795687200000, dt.datetime(2026, 11, 26, 10, tzinfo=dt.UTC)),
        (1795687200000.5, dt.datetime(2026, 11, 26, 10, 0, 0, 500, tzinfo=dt.UTC)),
    ],
)
def test_occurred_at_accepts_iso_and_epoch_milliseconds(value, expected) -> None:
    assert parse_occurred_at(value, NOW) == expected


def test_batch_over_the_limit_is_413() -> None:
    with pytest.raises(ApiError) as error:
        normalise_batch([{"student_id": "s", "event_type": "x"}] * 4, NOW, SETTINGS)
    assert error.value.status == 413


def test_empty_batch_is_rejected() -> None:
    with pytest.raises(ApiError) as error:
        normalise_batch([], NOW, SETTINGS)
    assert error.value.status == 422


def test_outputs_over_the_cap_are_truncated_and_flagged() -> None:
    event = normalise_one({"student_id": "s", "event_type": "x", "outputs": "y" * 100})
    assert event["outputs_truncated"] is True
    assert event["outputs"] == '"' + "y" * 39


def test_cap_keeps_small_outputs_as_they_are() -> None:
    assert cap_outputs([{"a": 1}], 100) == ([{"a": 1}], False)


def test_cap_never_splits_a_character() -> None:
    value, truncated = cap_outputs("é" * 30, 10)
    assert truncated and value == '"' + "é" * 4


def test_nul_characters_are_replaced_everywhere() -> None:
    assert replace_nul({"a\x00": ["b\x00", 1, {"c": "\x00"}]}) == {
        "a\ufffd": ["b\ufffd", 1, {"c": "\ufffd"}]
    }
    event = normalise_one({"student_id": "s\x00", "event_type": "x", "source": "\x00"})
    assert (event["student_id"], event["source"]) == ("s\ufffd", "\ufffd")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 2000 + b"]" * 2000, "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'"\\ud800"', "not valid JSON"),
    ],
)
def test_malformed_json_is_400(body: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as error:
        parse_json_body(body)
    assert error.value.status == 400 and fragment in error.value.message


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        (None, False),
    ],
)
def test_json_content_types(content_type, ok: bool) -> None:
    assert is_json_content_type(content_type) is ok


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("12", 12),
        (" 7 ", 7),
        ("-1", None),
        ("abc", None),
        ("9" * 30, None),
    ],
)
def test_last_event_id_parsing(value, expected) -> None:
    assert parse_last_event_id(value) == expected
