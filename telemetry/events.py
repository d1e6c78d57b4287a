"""Events: our shape and cell-monitor-extension's camelCase one, validated into normalised
events; the JSON bodies they come in; the pseudonyms that replace raw student ids. Pure
functions of a request: nothing here stores, publishes or logs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request

from telemetry.config import Settings
from telemetry.errors import ApiError, FieldErrors

IDENTIFIER_MAX_CHARS = 256
TEXT_MAX_CHARS = 4_096
SOURCE_MAX_CHARS = 262_144
ERROR_TEXT_MAX_CHARS = 300
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Client clocks drift, but an event from before 2000 or days ahead is a bug, not a clock.
EARLIEST_OCCURRED_AT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATEST_CLOCK_SKEW = dt.timedelta(days=2)
# Jupyter outputs nest a handful of levels. Deeper JSON is refused: orjson encodes at most
# 255, and a stored event travels nested in a bus message and a batch's rows.
MAX_JSON_DEPTH = 64

REQUIRED_FIELDS = ("student_id", "event_type")
TEXT_FIELDS = ("student_name", "course_id", "team", "session_id", "notebook_path", "cell_id")


def nests_deeper_than(value: Any, limit: int) -> bool:
    if not isinstance(value, (list, dict)):
        return False
    if limit == 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(nests_deeper_than(item, limit - 1) for item in items)


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
    if not check_string(value, IDENTIFIER_MAX_CHARS).strip():
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


# Our fields but occurred_at and outputs, each with its check; a check raises ValueError.
FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("student_id", "event_type", "event_id"), check_identifier),
    **dict.fromkeys(TEXT_FIELDS, lambda value: check_string(value, TEXT_MAX_CHARS)),
    "cell_index": lambda value: check_counter(value, INT32_MAX),
    "execution_count": lambda value: check_counter(value, INT32_MAX),
    "seq": lambda value: check_counter(value, INT64_MAX),
    "source": lambda value: check_string(value, math.inf),  # cut by cap_source
    "status": check_status,
    "error": check_error,
    "duration_ms": check_duration,
}
KNOWN_FIELDS = frozenset((*FIELD_CHECKS, "occurred_at", "outputs", "source_truncated"))

# Jupyter tracebacks and cell-monitor-extension's errorMessage carry terminal colours;
# some clients lose the ESC and leave "[0;31m" behind.
TRACEBACK_HEADER = "Traceback (most recent call last)"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\[\d+(?:;\d+)*m")


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def error_text(error: Mapping[str, Any] | None) -> str | None:
    """`ename: evalue` without colour codes: an error as the dashboard's aggregates show it.
    A whole traceback in its place is reduced to its last line, IPython's `ename: evalue`,
    so that its frames (`Cell In[11]`) do not split one error into many."""
    if not isinstance(error, Mapping):
        return None
    parts = [str(error[key]) for key in ("ename", "evalue") if error.get(key) not in (None, "")]
    text = strip_ansi(": ".join(parts) or "\n".join(error.get("traceback") or ())).strip()
    if not error.get("ename") and ("\n" in text and TRACEBACK_HEADER in text or not parts):
        text = text.rsplit("\n", 1)[-1].strip()
    return text[:ERROR_TEXT_MAX_CHARS] or None


def cap_outputs(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """Outputs can be megabytes of plots: keep at most max_bytes of their JSON text."""
    encoded = orjson.dumps(value)
    if len(encoded) <= max_bytes:
        return value, False
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), True


def cap_source(value: str | None) -> tuple[str | None, bool]:
    """A cell longer than SOURCE_MAX_CHARS is cut, not refused: a refusal is final for the
    extension, and the run would never appear."""
    if value is None or len(value) <= SOURCE_MAX_CHARS:
        return value, False
    return value[:SOURCE_MAX_CHARS], True


# cell-monitor-extension posts camelCase; these keys map one to one onto ours.
CAMEL_CASE_ALIASES = {
    "eventId": "event_id", "eventType": "event_type", "eventTime": "occurred_at",
    "emailAddress": "student_id", "userId": "student_id", "userName": "student_name",
    "teamName": "team", "courseId": "course_id", "sessionId": "session_id",
    "notebookPath": "notebook_path", "cellId": "cell_id", "cellIndex": "cell_index",
    "code": "source", "executionCount": "execution_count", "result": "outputs",
    "executionDurationMs": "duration_ms",
}  # fmt: skip
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
    """cell-monitor-extension's camelCase shape onto ours; snake_case passes through."""
    event: dict[str, Any] = {}
    for key, value in raw.items():
        target = CAMEL_CASE_ALIASES.get(key, key)
        # An explicit snake_case key wins over its alias.
        if key not in ("hasError", "errorMessage") and (target == key or target not in event):
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


def normalise_event(
    raw: Any,
    path: str,
    now: dt.datetime,
    settings: Settings,
    errors: FieldErrors,
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """One posted event to our normalised dict, or None with its problems added to `errors`,
    each named by the key the client sent (`origins`: our field -> that key)."""
    if not isinstance(raw, dict):
        errors.add(path, "must be a JSON object")
        return None
    origins = camel_case_origins(raw) if origins is None else origins
    # Refused before anything walks them: replace_nul would recurse as deep.
    deep = [key for key, value in raw.items() if nests_deeper_than(value, MAX_JSON_DEPTH)]
    for key in deep:
        problem = f"must not nest lists or objects over {MAX_JSON_DEPTH} deep"
        errors.add(f"{path}.{origins.get(key, key)}", problem)
    if deep:
        return None
    source = replace_nul(from_camel_case(raw))
    problems = {name: "is required" for name in REQUIRED_FIELDS if source.get(name) is None}
    event: dict[str, Any] = dict.fromkeys(KNOWN_FIELDS)
    checks = {**FIELD_CHECKS, "occurred_at": lambda value: parse_occurred_at(value, now)}
    for name, check in checks.items():
        if source.get(name) is not None:
            try:
                event[name] = check(source[name])
            except ValueError as problem:
                problems[name] = str(problem)
    for name, problem in problems.items():
        key = origins.get(name, name)
        errors.add(f"{path}.{key}", CAMEL_CASE_PROBLEMS.get(key, problem))
    if problems:
        return None
    outputs = source.get("outputs")
    event["outputs"], event["outputs_truncated"] = cap_outputs(outputs, settings.max_outputs_bytes)
    event["source"], event["source_truncated"] = cap_source(event["source"])
    event["occurred_at"] = event["occurred_at"] or now
    event["event_id"] = event["event_id"] or str(uuid.uuid4())
    event["extra"] = {key: value for key, value in source.items() if key not in KNOWN_FIELDS}
    return event


# 80 bits: see docs/privacy.md for the odds that two students share a pseudonym.
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
