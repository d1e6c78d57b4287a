"""Our event shape and cell-monitor-extension's camelCase one: pure functions from a
request body to normalised events, and the pseudonyms that replace raw student ids.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import re
import uuid
from collections.abc import (
    Callable,
    Mapping,
)
from typing import Any

import orjson
from starlette.requests import Request

from telemetry.config import Settings
from telemetry.errors import ApiError, FieldErrors

logger = logging.getLogger(__name__)


IDENTIFIER_MAX_CHARS = 256


TEXT_MAX_CHARS = 4_096


SOURCE_MAX_CHARS = 262_144


INT32_MAX = 2**31 - 1


INT64_MAX = 2**63 - 1


# Client clocks drift, but an event from before 2000 or days ahead is a bug, not a clock.
EARLIEST_OCCURRED_AT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


LATEST_CLOCK_SKEW = dt.timedelta(days=2)


REQUIRED_FIELDS = ("student_id", "event_type")


IDENTIFIER_FIELDS = ("student_id", "event_type", "event_id")


TEXT_FIELDS = ("student_name", "course_id", "team", "session_id", "notebook_path", "cell_id")


COUNTER_FIELDS = {"cell_index": INT32_MAX, "execution_count": INT32_MAX, "seq": INT64_MAX}


KNOWN_FIELDS = frozenset(
    (*IDENTIFIER_FIELDS, *TEXT_FIELDS, *COUNTER_FIELDS)
    + ("occurred_at", "source", "status", "error", "duration_ms", "outputs")
)


# Jupyter outputs nest a handful of levels. Deeper JSON is refused: orjson encodes at most
# 255, and a stored event travels nested in a bus message and a batch's rows.
MAX_JSON_DEPTH = 64


JSON_CONTAINERS = (list, dict)


def nests_deeper_than(value: list | dict, limit: int) -> bool:
    """Whether `value` and the lists and objects in it nest more than `limit` deep."""
    if limit == 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(
        nests_deeper_than(item, limit - 1) for item in items if isinstance(item, JSON_CONTAINERS)
    )


def replace_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold U+0000: store U+FFFD in its place, everywhere."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [replace_nul(item) for item in value]
    if isinstance(value, dict):
        return {replace_nul(key): replace_nul(item) for key, item in value.items()}
    return value


def parse_occurred_at(value: Any, now: dt.datetime) -> dt.datetime:
    """ISO 8601 text or epoch milliseconds to an aware UTC datetime; ValueError if absurd."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be an ISO 8601 string or epoch milliseconds")
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("is not an ISO 8601 timestamp") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    else:
        if not math.isfinite(value) or abs(value) > 1e15:
            raise ValueError("is not a plausible epoch-milliseconds value")
        moment = dt.datetime.fromtimestamp(value / 1000, tz=dt.UTC)
    moment = moment.astimezone(dt.UTC)
    if not EARLIEST_OCCURRED_AT <= moment <= now + LATEST_CLOCK_SKEW:
        raise ValueError("is outside the plausible range (2000-01-01 to two days from now)")
    return moment


def check_string(value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > max_chars:
        raise ValueError(f"must be at most {max_chars} characters")
    return value


def check_identifier(value: Any) -> str:
    value = check_string(value, IDENTIFIER_MAX_CHARS)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def check_counter(value: Any, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    if not 0 <= value <= maximum:
        raise ValueError(f"must be between 0 and {maximum}")
    return value


def check_duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    if not (math.isfinite(value) and 0 <= value <= 1e12):
        raise ValueError("must be a non-negative number of milliseconds")
    return float(value) + 0.0  # -0.0 as 0.0, which is what jsonb and the database keep


def check_status(value: Any) -> str:
    if value not in ("ok", "error"):
        raise ValueError("must be 'ok' or 'error'")
    return value


def check_error(value: Any) -> dict[str, Any]:
    """Jupyter's error triple; a bare message string is accepted as the evalue."""
    if isinstance(value, str):
        return {"ename": None, "evalue": check_string(value, TEXT_MAX_CHARS), "traceback": []}
    if not isinstance(value, dict):
        raise ValueError("must be an object with ename, evalue and traceback")
    traceback = value.get("traceback", [])
    if isinstance(traceback, str):
        traceback = [traceback]
    if not isinstance(traceback, list) or not all(isinstance(line, str) for line in traceback):
        raise ValueError("traceback must be a list of strings")
    for key in ("ename", "evalue"):
        if value.get(key) is not None:
            check_string(value[key], SOURCE_MAX_CHARS)
    return {**value, "traceback": traceback}


# Jupyter tracebacks and cell-monitor-extension's errorMessage carry terminal colours;
# some clients lose the ESC and leave "[0;31m" behind.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\[\d+(?:;\d+)*m")


ERROR_TEXT_MAX_CHARS = 300


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def error_text(error: Mapping[str, Any] | None) -> str | None:
    """`ename: evalue` without colour codes: an error as the dashboard's aggregates show it."""
    if not isinstance(error, Mapping):
        return None
    parts = [str(error[key]) for key in ("ename", "evalue") if error.get(key) not in (None, "")]
    text = strip_ansi(": ".join(parts)).strip()
    return text[:ERROR_TEXT_MAX_CHARS] or None


def cap_outputs(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """Outputs can be megabytes of plots: keep at most max_bytes of their JSON text."""
    encoded = orjson.dumps(value)
    if len(encoded) <= max_bytes:
        return value, False
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), True


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    **{name: check_identifier for name in IDENTIFIER_FIELDS},
    **{name: lambda value: check_string(value, TEXT_MAX_CHARS) for name in TEXT_FIELDS},
    **{
        name: lambda value, top=top: check_counter(value, top)
        for name, top in COUNTER_FIELDS.items()
    },
    "source": lambda value: check_string(value, SOURCE_MAX_CHARS),
    "status": check_status,
    "error": check_error,
    "duration_ms": check_duration,
}


def normalise_event(
    raw: Any, path: str, now: dt.datetime, settings: Settings, errors: FieldErrors
) -> dict[str, Any] | None:
    """One posted event to our normalised dict, or None with its problems added to errors."""
    if not isinstance(raw, dict):
        errors.add(path, "must be a JSON object")
        return None
    too_deep = [
        key
        for key, value in raw.items()
        if isinstance(value, JSON_CONTAINERS) and nests_deeper_than(value, MAX_JSON_DEPTH)
    ]
    for key in too_deep:
        errors.add(f"{path}.{key}", f"must not nest lists or objects over {MAX_JSON_DEPTH} deep")
    if too_deep:
        return None
    source = replace_nul(from_camel_case(raw))
    origins = camel_case_origins(raw)

    def problem_at(name: str, problem: str) -> None:
        key = origins.get(name, name)
        errors.add(f"{path}.{key}", CAMEL_CASE_PROBLEMS.get(key, problem))

    before = len(errors.details)
    event: dict[str, Any] = {name: None for name in KNOWN_FIELDS}
    for name in REQUIRED_FIELDS:
        if source.get(name) is None:
            problem_at(name, "is required")
    for name, check in FIELD_CHECKS.items():
        if source.get(name) is not None:
            try:
                event[name] = check(source[name])
            except ValueError as problem:
                problem_at(name, str(problem))
    try:
        occurred_at = source.get("occurred_at")
        event["occurred_at"] = now if occurred_at is None else parse_occurred_at(occurred_at, now)
    except ValueError as problem:
        problem_at("occurred_at", str(problem))
    if len(errors.details) > before:
        return None
    outputs = source.get("outputs")
    event["outputs"], event["outputs_truncated"] = cap_outputs(outputs, settings.max_outputs_bytes)
    event["event_id"] = event["event_id"] or str(uuid.uuid4())
    event["extra"] = {key: value for key, value in source.items() if key not in KNOWN_FIELDS}
    return event


# cell-monitor-extension posts camelCase; these keys map one to one onto ours.
CAMEL_CASE_ALIASES = {
    "eventId": "event_id",
    "eventType": "event_type",
    "eventTime": "occurred_at",
    "emailAddress": "student_id",
    "userId": "student_id",
    "userName": "student_name",
    "teamName": "team",
    "courseId": "course_id",
    "sessionId": "session_id",
    "notebookPath": "notebook_path",
    "cellId": "cell_id",
    "cellIndex": "cell_index",
    "code": "source",
    "executionCount": "execution_count",
    "result": "outputs",
    "executionDurationMs": "duration_ms",
}


# Named in errors as the client named them when a camelCase event leaves them out.
CAMEL_CASE_REQUIRED = {"student_id": "emailAddress", "event_type": "eventType"}


CAMEL_CASE_PROBLEMS = {"hasError": "must be true or false"}


def camel_case_origins(raw: dict[str, Any]) -> dict[str, str]:
    """Our field -> the key the client sent it as, so errors name what the client wrote."""
    origins = {CAMEL_CASE_ALIASES[key]: key for key in raw if key in CAMEL_CASE_ALIASES}
    if "hasError" in raw and "status" not in raw:
        origins["status"] = "hasError"
    if raw.get("errorMessage") and "error" not in raw:
        origins["error"] = "errorMessage"
    if origins:
        origins = {**CAMEL_CASE_REQUIRED, **origins}
    return {target: key for target, key in origins.items() if target not in raw}


def from_camel_case(raw: dict[str, Any]) -> dict[str, Any]:
    """Map cell-monitor-extension's camelCase shape onto ours; snake_case passes through."""
    event: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("hasError", "errorMessage"):
            continue
        target = CAMEL_CASE_ALIASES.get(key, key)
        if target in event and target != key:
            continue  # an explicit snake_case key wins over its alias
        event[target] = value
    if "hasError" in raw and "status" not in raw:
        # A string "true" is a client bug to report (see CAMEL_CASE_PROBLEMS), not an "ok".
        has_error = raw["hasError"]
        if isinstance(has_error, bool):
            event["status"] = "error" if has_error else "ok"
        elif has_error is not None:
            event["status"] = has_error
    if raw.get("errorMessage") and "error" not in raw:
        event["error"] = {"ename": None, "evalue": raw["errorMessage"], "traceback": []}
    return event


# 20 hex characters are 80 bits: among a million students, the odds that two share a
# pseudonym are about 4 in 10^13.
PSEUDONYM_HEX_CHARS = 20


# What jupyterlab-pioneer's envelope may carry of a student's identity besides the mapped
# fields: the exporter's params and the env entries (JUPYTERHUB_USER, ...).
PIONEER_IDENTITY_PARAMS = frozenset(("student_id", "student_name"))


def pseudonym(salt: str, raw_id: str) -> str:
    """A student's id as pseudonymous mode stores and shows it: the same for one id and salt."""
    digest = hmac.new(salt.encode(), raw_id.encode(errors="surrogatepass"), hashlib.sha256)
    return digest.hexdigest()[:PSEUDONYM_HEX_CHARS]


def pseudonymized(event: dict[str, Any], salt: str) -> dict[str, Any]:
    """A validated event as pseudonymous mode stores and publishes it: the student's id
    replaced by its pseudonym, no name, and no copy of either left in `extra`."""
    extra = dict(event["extra"])
    if isinstance(extra.get("pioneer"), dict):
        pioneer = {key: value for key, value in extra["pioneer"].items() if key != "env"}
        if isinstance(pioneer.get("params"), dict):
            params = pioneer["params"].items()
            pioneer["params"] = {k: v for k, v in params if k not in PIONEER_IDENTITY_PARAMS}
        extra["pioneer"] = pioneer
    student_id = pseudonym(salt, event["student_id"])
    return {**event, "student_id": student_id, "student_name": None, "extra": extra}


def is_json_content_type(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def parse_json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as problem:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {problem}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 before more than `limit` bytes are read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_instructor(body: bytes, content_type: str | None) -> str | None:
    """The optional `{"by": name}` body of a help action: the instructor's name, or None."""
    if not body.strip():
        return None
    if not is_json_content_type(content_type):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    document = parse_json_body(body)
    errors = FieldErrors()
    if not isinstance(document, dict):
        errors.add("body", "must be a JSON object")
        document = {}
    for key in document:
        if key != "by":
            errors.add(key, "is not a field of this request")
    by = document.get("by")
    if by is not None:
        try:
            by = check_string(by, IDENTIFIER_MAX_CHARS)
        except ValueError as problem:
            errors.add("by", str(problem))
    if errors.details:
        raise ApiError(422, "invalid_body", "the body is invalid", errors.details)
    return by
