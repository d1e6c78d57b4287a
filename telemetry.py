"""Classroom telemetry: what students do in JupyterLab, live on instructors' dashboards.

Data path:
    POST /api/v1/events -> validate -> group commit (students, events tables)
    -> publish on the bus (Redis channel, or in-process) -> subscriber -> hub
    -> every connected dashboard, over SSE (/api/v1/stream) or WebSocket (/api/v1/ws).

Decisions a reader must not undo:
- Ids are safe to resume from. Within one process a single committer task writes and
  publishes batches one after another; across processes (PostgreSQL) it holds an advisory
  lock from before its INSERT until after its PUBLISH (`Storage.commit_order`). So an id is
  committed and published only after every smaller id, and a dashboard that resumes after
  id N can never miss a smaller id committed later.
- A bus message names the highest id committed before its batch, and the hub reads any
  undelivered events below it from the database first (a process can die between its
  commit and its publish); a check every second closes a gap no message reveals.
- The subscriber resubscribes itself. redis-py's own retry would reconnect silently and
  lose what was published meanwhile, so it is switched off: every drop surfaces here, and
  after each (re)subscription the hub catches up from the database before going live.
- The hub never awaits a client. Each client has a bounded queue of shared, pre-encoded
  frames and one writer; a client whose queue overflows is cut off at once, even
  mid-write, and resumes by id.
- The dashboard's summaries (schema.sql: cell_runs, cell_totals, student_counts, activity,
  hand_raises) are written by the statement or transaction that stores the events they
  count, so an aggregate reads a few thousand rows, never every event.
- A dashboard token reads only its courses, and a check in one handler is no guarantee:
  authorize_read resolves each request's Grant once, every read query filters by its
  courses in SQL (in_scope), and every stream client by StreamFilter.courses, live and on
  replay. The hub keeps no event cache, so after an erasure no resume can replay it.
- Erasure and retention hold the commit order for their transaction, so no batch commits
  half-way through and the summaries they subtract from are not being added to meanwhile.
  Retention's batches are short and it rests after each, so ingest waits at most one.
- In pseudonymous mode the raw student id and name are replaced at one place, in
  post_events, before anything stores, publishes or logs them.
- jupyterlab-pioneer's NotebookOpenEvent carries the Jupyter server's whole environment,
  tokens included: only the variables named in PIONEER_ENVIRON_ALLOW are ever stored or
  sent on, and its params.token never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import datetime as dt
import functools
import gc
import hashlib
import hmac
import io
import logging
import math
import os
import re
import sqlite3
import sys
import time
import types
import uuid
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
import redis.asyncio as aioredis
from databases import Database, DatabaseURL
from redis.backoff import NoBackoff
from redis.retry import Retry
from sse_starlette.sse import AppStatus  # importing it makes uvicorn's SIGTERM set should_exit
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

logger = logging.getLogger("telemetry")


# Configuration


class ConfigError(Exception):
    """A configuration variable has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    """One field per environment variable: DATABASE_URL is database_url, and so on."""

    database_url: str = "sqlite:///telemetry.db"
    database_pool_size: int = 5
    redis_url: str | None = None
    notification_channel: str = "telemetry:events"
    max_body_bytes: int = 1_048_576
    max_batch_events: int = 500
    max_outputs_bytes: int = 65_536
    replay_limit: int = 5_000
    client_queue_limit: int = 2_000
    sse_retry_ms: int = 2_000
    sse_ping_seconds: float = 15.0
    send_timeout_seconds: float = 10.0
    ingest_tokens: tuple[str, ...] = ()
    dashboard_tokens: tuple[Grant, ...] = ()
    admin_tokens: tuple[Grant, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_streams_per_client: int = 20
    pioneer_student_env: str = "JUPYTERHUB_USER"
    pioneer_environ_allow: frozenset[str] = frozenset()
    retention_days: int | None = None
    pseudonymize_salt: str | None = None


def whole_number(name: str, raw: str, default: Any) -> int:
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be at least 1")
    return value


def seconds(name: str, raw: str, default: float) -> float:
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def comma_list(name: str, raw: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma-separated list; empty when unset."""
    return tuple(item.strip() for item in raw.split(",") if item.strip()) or default


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def variable_names(name: str, raw: str, default: frozenset[str] = frozenset()) -> frozenset[str]:
    """A comma-separated list of environment variable names; empty when unset."""
    names = frozenset(comma_list(name, raw))
    for item in sorted(names):
        if not ENV_NAME.fullmatch(item):
            raise ConfigError(f"{name} holds {item!r}, which is not an environment variable name")
    return names or default


def variable_name(name: str, raw: str, default: str) -> str:
    """One environment variable name; the default when unset or empty."""
    names = variable_names(name, raw)
    if len(names) > 1:
        raise ConfigError(f"{name} must name one variable, not {len(names)}")
    return next(iter(names), default)


@dataclass(frozen=True)
class Grant:
    """What a token may read: its name (for the access log, never the secret) and its
    courses; `courses` None means every course, and the events that name none."""

    name: str
    secret: str = field(repr=False)
    courses: frozenset[str] | None = None

    def covers(self, course_id: str | None) -> bool:
        return self.courses is None or course_id in self.courses

    def course_list(self) -> list[str] | None:
        return None if self.courses is None else sorted(self.courses)


# DASHBOARD_TOKENS / ADMIN_TOKENS entries: `[name=]secret[:course+course...]`. Names and
# courses are plain words, so an entry reads one way only; a secret may hold `=` (base64
# padding) once the entry is named.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKEN_COURSE = re.compile(r"[A-Za-z0-9_.@-]{1,256}")
TOKEN_SECRET = re.compile(r"[^\s,:]+")


def token_fingerprint(secret: str) -> str:
    """The name of an unnamed token: recognisable in the access log, useless to an attacker."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def parse_token(name: str, entry: str, scoped: bool) -> Grant:
    """One `[name=]secret[:course+course...]` entry; ConfigError naming what is wrong."""
    label, has_name, rest = entry.partition("=")
    if not has_name or not TOKEN_NAME.fullmatch(label):
        label, rest = "", entry
    secret, has_courses, scope = rest.partition(":")
    if not TOKEN_SECRET.fullmatch(secret) or secret.startswith("="):
        raise ConfigError(
            f"{name} has an entry with an empty or malformed secret; the form is "
            "[name=]secret[:course+course], and a secret holding '=' needs a name first"
        )
    if has_courses and not scoped:
        raise ConfigError(f"{name} entries cannot name courses: they act on every course")
    courses = scope.split("+") if has_courses else None
    for course in courses or ():
        if not TOKEN_COURSE.fullmatch(course):
            raise ConfigError(
                f"{name} scopes a token to {course!r}: a course is 1 to 256 letters, digits, "
                "'_', '.', '@' or '-', and courses are joined by '+'"
            )
    grant_courses = None if courses is None else frozenset(courses)
    return Grant(label or token_fingerprint(secret), secret, grant_courses)


def parse_tokens(name: str, raw: str, scoped: bool = True) -> tuple[Grant, ...]:
    """A comma-separated list of token entries (see parse_token), each secret and name once."""
    grants = tuple(parse_token(name, entry, scoped) for entry in comma_list(name, raw))
    if len({grant.secret for grant in grants}) < len(grants):
        raise ConfigError(f"{name} lists a secret twice: each token must be unique")
    for repeated, count in Counter(grant.name for grant in grants).items():
        if count > 1:
            raise ConfigError(f"{name} names two tokens {repeated!r}: names must be unique")
    return grants


# A century; far more and `now - RETENTION_DAYS` leaves the calendar, which would stop
# retention at its first pass.
RETENTION_DAYS_MAX = 36_500


def retention_days(name: str, raw: str, default: int | None) -> int | None:
    days = whole_number(name, raw, default)
    if days is not None and days > RETENTION_DAYS_MAX:
        raise ConfigError(f"{name}={raw!r} must be at most {RETENTION_DAYS_MAX} (a century)")
    return days


# A salt anyone could guess lets them hash a class list and match it (see pseudonym).
SALT_MIN_CHARS = 16


def secret_salt(name: str, raw: str, default: str | None) -> str | None:
    if raw and len(raw) < SALT_MIN_CHARS:
        raise ConfigError(
            f"{name} must be at least {SALT_MIN_CHARS} characters, e.g. `openssl rand -hex 32`"
        )
    return raw or default


def normalise_database_url(raw: str | None) -> str:
    """Map DATABASE_URL onto what `databases` understands; unset means the SQLite file."""
    if not raw or not raw.strip():
        return Settings.database_url
    parts = urlsplit(raw.strip())
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        # `databases` reads `ssl`, not libpq's `sslmode`, and would silently drop the latter:
        # Heroku Postgres requires TLS, so carry the requirement over.
        query = [
            ("ssl" if key == "sslmode" else key, value) for key, value in parse_qsl(parts.query)
        ]
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError("DATABASE_URL must name a host and a database")
        return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return "sqlite:" + raw.strip().split(":", 1)[1]  # urlunsplit would drop the empty host
    raise ConfigError(
        f"DATABASE_URL has scheme {parts.scheme!r}; expected postgres://, postgresql:// or sqlite://"
    )


def normalise_redis_url(raw: str | None) -> str | None:
    """Validate REDIS_URL; rediss:// skips certificate checks unless the URL says otherwise."""
    if not raw or not raw.strip():
        return None
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"REDIS_URL has scheme {parts.scheme!r}; expected redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError("REDIS_URL must name a host")
    query = dict(parse_qsl(parts.query))
    # Heroku Redis presents a self-signed certificate.
    if parts.scheme == "rediss" and "ssl_cert_reqs" not in query:
        query["ssl_cert_reqs"] = "none"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


# Each variable, read by (name, stripped value, the Settings default) into the field of the
# same name in lower case.
ENVIRONMENT: dict[str, Callable[[str, str, Any], Any]] = {
    "DATABASE_URL": lambda name, raw, default: normalise_database_url(raw),
    "DATABASE_POOL_SIZE": whole_number,
    "REDIS_URL": lambda name, raw, default: normalise_redis_url(raw),
    "NOTIFICATION_CHANNEL": lambda name, raw, default: raw or default,
    "MAX_BODY_BYTES": whole_number,
    "MAX_BATCH_EVENTS": whole_number,
    "MAX_OUTPUTS_BYTES": whole_number,
    "REPLAY_LIMIT": whole_number,
    "CLIENT_QUEUE_LIMIT": whole_number,
    "SSE_RETRY_MS": whole_number,
    "SSE_PING_SECONDS": seconds,
    "SEND_TIMEOUT_SECONDS": seconds,
    "INGEST_TOKENS": comma_list,
    "DASHBOARD_TOKENS": lambda name, raw, default: parse_tokens(name, raw, scoped=True),
    "ADMIN_TOKENS": lambda name, raw, default: parse_tokens(name, raw, scoped=False),
    "CORS_ORIGINS": comma_list,
    "MAX_STREAMS_PER_CLIENT": whole_number,
    "PIONEER_STUDENT_ENV": variable_name,
    "PIONEER_ENVIRON_ALLOW": variable_names,
    "RETENTION_DAYS": retention_days,
    "PSEUDONYMIZE_SALT": secret_salt,
}


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Read the configuration from environment variables; raise ConfigError naming a bad one."""
    values = {
        name.lower(): read(name, environ.get(name, "").strip(), getattr(Settings, name.lower()))
        for name, read in ENVIRONMENT.items()
    }
    workers = whole_number("WEB_CONCURRENCY", environ.get("WEB_CONCURRENCY", "").strip(), 1)
    stores_raw_id = values["pioneer_student_env"] in values["pioneer_environ_allow"]
    if values["pseudonymize_salt"] and stores_raw_id:
        raise ConfigError(
            "PIONEER_ENVIRON_ALLOW would store PIONEER_STUDENT_ENV, the student's raw id, "
            "which PSEUDONYMIZE_SALT is set to keep out"
        )
    if values["redis_url"] is None and workers > 1:
        raise ConfigError(
            "WEB_CONCURRENCY > 1 needs REDIS_URL: the in-process bus cannot reach other workers"
        )
    return Settings(**values)


# Validation


class ApiError(Exception):
    """An error answered to the client as one JSON shape: see error_body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def error_body(status: int, code: str, message: str, details: list[dict[str, str]]) -> dict:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


class FieldErrors:
    """Collects every problem of a request so the client hears about all of them at once."""

    def __init__(self) -> None:
        self.details: list[dict[str, str]] = []

    def add(self, field_path: str, problem: str) -> None:
        self.details.append({"field": field_path, "problem": problem})


# Validation: our events

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


# Validation: the camelCase shape

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


# Validation: jupyterlab-pioneer

# jupyterlab-pioneer's remote_exporter (1.7.3) posts one event per request, as
#   {"data": {"eventDetail": {eventName, eventTime, eventInfo},
#             "notebookState": {sessionID, notebookPath, notebookContent}},
#    "params": <its exporter's args.params> | null, "env": [{NAME: os.getenv(NAME)}, ...]}
# and cannot set headers. Our field -> where the envelope carries it, taken as it is:
PIONEER_FIELDS = {
    "event_type": "data.eventDetail.eventName",
    "occurred_at": "data.eventDetail.eventTime",
    "session_id": "data.notebookState.sessionID",
    "notebook_path": "data.notebookState.notebookPath",
    "course_id": "params.course_id",
    "student_name": "params.student_name",
    "team": "params.team",
}
# The objects and lists the mapping walks through besides eventDetail; null stands for absent.
PIONEER_CONTAINERS = {"data.notebookState": dict, "params": dict, "env": list}
# Events about one cell, listed in eventInfo.cells. NotebookScrollEvent and
# NotebookVisibleEvent list the cells on screen, which is no subject cell.
PIONEER_CELL_EVENTS = frozenset(
    (
        "ActiveCellChangeEvent",
        "CellAddEvent",
        "CellExecuteEvent",
        "CellRemoveEvent",
        "ClipboardCopyEvent",
        "ClipboardCutEvent",
        "ClipboardPasteEvent",
    )
)
# CellEditEvent has no cell list, only eventInfo.index; CellRemoveEvent before 1.7 sent oldIndex.
PIONEER_INDEX_KEYS = ("index", "oldIndex")
# JupyterLab's KernelError serialises as {errorName, errorValue, traceback}.
PIONEER_ERROR_KEYS = {"errorName": "ename", "errorValue": "evalue"}
# Mapped onto our fields, or never to be stored: the rest of eventDetail is kept.
PIONEER_CONSUMED_DETAIL = frozenset(("eventName", "eventTime"))
PIONEER_SECRET_PARAMS = frozenset(("token",))


class PioneerError(ValueError):
    """An envelope the mapping cannot walk; `field_path` is where, in the posted body."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path
        self.problem = problem


def is_pioneer_envelope(body: Any) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, dict) and "eventDetail" in data


def dig(document: Any, path: str) -> Any:
    """The value at a dotted path of nested objects; None where any step is missing."""
    for key in path.split("."):
        document = document.get(key) if isinstance(document, dict) else None
    return document


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_pioneer_shape(envelope: dict) -> None:
    if not isinstance(envelope["data"]["eventDetail"], dict):
        raise PioneerError("data.eventDetail", "must be an object")
    for path, kind in PIONEER_CONTAINERS.items():
        value = dig(envelope, path)
        if value is not None and not isinstance(value, kind):
            raise PioneerError(path, f"must be {'an object' if kind is dict else 'a list'} or null")
    for position, entry in enumerate(envelope.get("env") or []):
        if not isinstance(entry, dict):
            raise PioneerError(f"env[{position}]", "must be an object {NAME: value}")
    occurred_at = dig(envelope, PIONEER_FIELDS["occurred_at"])
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, (int, float)):
        raise PioneerError(PIONEER_FIELDS["occurred_at"], "must be epoch milliseconds (a number)")


def pioneer_student(envelope: dict, env_name: str) -> tuple[Any, str]:
    """params.student_id, else the value of the env entry named env_name."""
    given = dig(envelope, "params.student_id")
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)  # numeric ids written into the exporter's params
    if not is_blank(given):
        return given, "params.student_id"
    for position, entry in enumerate(envelope.get("env") or []):
        if not is_blank(entry.get(env_name)):
            return entry[env_name], f"env[{position}].{env_name}"
    raise PioneerError(
        "params.student_id", f"is required, or a non-empty {env_name!r} entry in env"
    )


NO_CELL = {"cell_id": (None, ""), "cell_index": (None, "")}


def pioneer_cell(event_name: Any, info: Any) -> dict[str, tuple[Any, str]]:
    """cell_id and cell_index of a cell event, each with where it came from."""
    if not isinstance(event_name, str):  # normalise_event refuses it; a list would not hash
        return NO_CELL
    where = "data.eventDetail.eventInfo"
    if event_name == "CellEditEvent" and isinstance(info, dict):
        cell = info
    elif event_name in PIONEER_CELL_EVENTS and isinstance(info, dict) and info.get("cells"):
        cells, where = info["cells"], f"{where}.cells"
        if not isinstance(cells, list) or not all(isinstance(item, dict) for item in cells):
            raise PioneerError(where, "must be a list of objects")
        if len(cells) != 1:
            return NO_CELL  # not a shape the producers send: kept in eventInfo only
        cell, where = cells[0], f"{where}[0]"
    else:
        return NO_CELL
    key = next((key for key in PIONEER_INDEX_KEYS if key in cell), "index")
    # findIndex() gives -1 when the producer could not find the cell.
    index = None if cell.get(key) == -1 else cell.get(key)
    return {"cell_id": (cell.get("id"), f"{where}.id"), "cell_index": (index, f"{where}.{key}")}


def pioneer_execution(info: Any) -> dict[str, tuple[Any, str]]:
    """status and error of a CellExecuteEvent."""
    info = info if isinstance(info, dict) else {}
    where = "data.eventDetail.eventInfo"
    success = info.get("success")
    if success is not None and not isinstance(success, bool):
        raise PioneerError(f"{where}.success", "must be true or false")
    status = None if success is None else ("ok" if success else "error")
    picked = {"status": (status, f"{where}.success")}
    kernel_error = info.get("kernelError")
    # Errors other than KernelError serialise as {}: nothing to keep.
    if success is not True and kernel_error:
        if isinstance(kernel_error, dict):
            kernel_error = {PIONEER_ERROR_KEYS.get(k, k): v for k, v in kernel_error.items()}
        picked["error"] = (kernel_error, f"{where}.kernelError")
    return picked


def pioneer_source(notebook: Any, cell_id: Any, cell_index: Any) -> tuple[Any, str]:
    """The executed cell's source in notebookContent (sent only with logWholeNotebook)."""
    where = "data.notebookState.notebookContent.cells"
    cells = dig(notebook, "cells")
    if not isinstance(cells, list):
        return None, where
    cells = [cell if isinstance(cell, dict) else {} for cell in cells]
    if any("id" in cell for cell in cells):
        ids = [cell.get("id") for cell in cells]
        position = ids.index(cell_id) if cell_id is not None and cell_id in ids else None
    elif isinstance(cell_index, int) and 0 <= cell_index < len(cells):
        position = cell_index  # nbformat before 4.5 has no cell ids: the position is the key
    else:
        position = None
    if position is None:
        return None, where
    source = cells[position].get("source")
    if isinstance(source, list) and all(isinstance(line, str) for line in source):
        source = "".join(source)  # nbformat allows a list of lines
    return source, f"{where}[{position}].source"


def pioneer_rest(envelope: dict, environ_allow: frozenset[str]) -> dict[str, Any]:
    """What the mapping does not use, kept verbatim but for the server's environ and secrets."""
    detail = envelope["data"]["eventDetail"]
    rest = {key: value for key, value in detail.items() if key not in PIONEER_CONSUMED_DETAIL}
    info = rest.get("eventInfo")
    if isinstance(info, dict) and "environ" in info:
        # NotebookOpenEvent sends the Jupyter server's whole os.environ, tokens included.
        environ = info["environ"] if isinstance(info["environ"], dict) else {}
        allowed = {name: value for name, value in environ.items() if name in environ_allow}
        rest["eventInfo"] = {**info, "environ": allowed}
    params = envelope.get("params") or {}
    kept_params = {key: value for key, value in params.items() if key not in PIONEER_SECRET_PARAMS}
    if kept_params:
        rest["params"] = kept_params
    if envelope.get("env"):
        rest["env"] = envelope["env"]
    return rest


def pioneer_to_event(envelope: dict, settings: Settings) -> tuple[dict[str, Any], dict[str, str]]:
    """One remote_exporter body to our input event, and where each of its fields came from."""
    check_pioneer_shape(envelope)
    picked = {name: (dig(envelope, where), where) for name, where in PIONEER_FIELDS.items()}
    picked["student_id"] = pioneer_student(envelope, settings.pioneer_student_env)
    event_name, info = picked["event_type"][0], dig(envelope, "data.eventDetail.eventInfo")
    picked |= pioneer_cell(event_name, info)
    if event_name == "CellExecuteEvent":
        picked |= pioneer_execution(info)
        notebook = dig(envelope, "data.notebookState.notebookContent")
        picked["source"] = pioneer_source(notebook, picked["cell_id"][0], picked["cell_index"][0])
    event = {name: value for name, (value, _) in picked.items()}
    event["pioneer"] = pioneer_rest(envelope, settings.pioneer_environ_allow)
    return event, {name: where for name, (_, where) in picked.items()}


def normalise_pioneer(
    raw: dict, path: str, now: dt.datetime, settings: Settings, errors: FieldErrors
) -> dict[str, Any] | None:
    """A pioneer envelope through normalise_event; problems name the envelope's fields."""
    try:
        mapped, origins = pioneer_to_event(raw, settings)
    except PioneerError as problem:
        errors.add(f"{path}.{problem.field_path}", problem.problem)
        return None
    own_errors = FieldErrors()
    event = normalise_event(mapped, path, now, settings, own_errors)
    for detail in own_errors.details:
        name = detail["field"].removeprefix(f"{path}.")
        errors.add(f"{path}.{origins.get(name, name)}", detail["problem"])
    return event


# Validation: pseudonymous mode

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


# Validation: request bodies


def normalise_batch(body: Any, now: dt.datetime, settings: Settings) -> list[dict[str, Any]]:
    """A request body (one event or an array of them) to normalised events, or an ApiError."""
    items, prefix = (body, "events") if isinstance(body, list) else ([body], "event")
    if not items:
        raise ApiError(422, "empty_batch", "the request holds no events")
    if len(items) > settings.max_batch_events:
        raise ApiError(
            413,
            "batch_too_large",
            f"a batch holds at most {settings.max_batch_events} events; this one has {len(items)}",
        )
    errors = FieldErrors()
    events = []
    for index, item in enumerate(items):
        path = f"{prefix}[{index}]" if body is items else prefix
        normalise = normalise_pioneer if is_pioneer_envelope(item) else normalise_event
        events.append(normalise(item, path, now, settings, errors))
    if errors.details:
        raise ApiError(
            422, "invalid_event", "some events are invalid; none was stored", errors.details
        )
    return [event for event in events if event is not None]


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


# Storage

SCHEMA_PATH = Path(__file__).with_name("schema.sql")

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


# Bus


class MemoryBus:
    """Fan-out within this one process: the embedded default, needing no server."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[bytes]] = set()

    async def publish(self, payload: bytes) -> None:
        # The subscriber only parses and hands frames to client queues, never awaiting a
        # client, so this queue drains every tick and needs no bound.
        for queue in self._queues:
            queue.put_nowait(payload)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[bytes]]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield self._drain(queue)
        finally:
            self._queues.discard(queue)

    @staticmethod
    async def _drain(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
        while True:
            yield await queue.get()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisBus:
    """Fan-out across processes through a Redis pub/sub channel."""

    PUBLISH_TIMEOUT_SECONDS = 2.0
    HEALTH_CHECK_SECONDS = 10

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self._publisher = aioredis.from_url(
            url,
            socket_timeout=self.PUBLISH_TIMEOUT_SECONDS,
            socket_connect_timeout=self.PUBLISH_TIMEOUT_SECONDS,
        )

    async def publish(self, payload: bytes) -> None:
        await self._publisher.publish(self.channel, payload)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[bytes]]:
        # No retry: a silent reconnect would hide the messages lost meanwhile (module docstring).
        client = aioredis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=self.PUBLISH_TIMEOUT_SECONDS,
            health_check_interval=self.HEALTH_CHECK_SECONDS,
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            yield self._messages(pubsub)
        finally:
            await pubsub.aclose()
            await client.aclose()

    @staticmethod
    async def _messages(pubsub: Any) -> AsyncIterator[bytes]:
        async for message in pubsub.listen():
            if message["type"] == "message":
                yield message["data"]

    async def ping(self) -> None:
        await self._publisher.ping()

    async def aclose(self) -> None:
        await self._publisher.aclose()


Bus = MemoryBus | RedisBus


def build_bus(settings: Settings) -> Bus:
    if settings.redis_url is None:
        return MemoryBus()
    return RedisBus(settings.redis_url, settings.notification_channel)


def encode_batch(batch: StoredBatch) -> bytes | None:
    """One bus message per committed batch: its new events' documents and the id they follow."""
    documents = [item.document for item in batch.results if not item.duplicate]
    if not documents:
        return None
    return orjson.dumps({"follows": batch.follows, "events": documents})


# An erasure on the bus: {"erased": {"student_id": ..., "course_id": ..., "courses": [...]}}
# or a course's (no "courses"): the dashboards of `courses` (else of `course_id`) hear it.
ERASURE_PREFIX = b'{"erased":'


def encode_erasure(erased: dict) -> bytes:
    return orjson.dumps({"erased": erased})


def decode_erasure(payload: bytes) -> dict | None:
    """The erasure a bus message announces; None for a batch of events."""
    if not payload.startswith(ERASURE_PREFIX):
        return None
    try:
        erased = orjson.loads(payload)["erased"]
        found = {key: erased.get(key) for key in ("student_id", "course_id")}
        if "courses" in erased:
            found["courses"] = list(erased["courses"])
        return found
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None  # decode_message warns about it


def decode_message(payload: bytes) -> tuple[int, list[dict]] | None:
    """A bus message's (follows, documents); None, and a warning, if it is not one."""
    try:
        message = orjson.loads(payload)
        return int(message["follows"]), list(message["events"])
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        logger.warning("ignored a malformed bus message of %d bytes", len(payload))
        return None


# Hub


@dataclass(frozen=True)
class Frame:
    """One event, encoded once for every client and transport."""

    id: int
    document: dict
    sse: bytes
    ws: str
    notice: bool = False
    # The server messages too: a client with nothing queued is sent exactly these.
    sse_message: dict = field(init=False, repr=False, compare=False)
    ws_message: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sse_message = {"type": "http.response.body", "body": self.sse, "more_body": True}
        object.__setattr__(self, "sse_message", sse_message)
        object.__setattr__(self, "ws_message", {"type": "websocket.send", "text": self.ws})

    @classmethod
    def of(cls, document: dict) -> Frame:
        data = orjson.dumps(document)
        sse = b"id: %d\ndata: %s\n\n" % (document["id"], data)
        return cls(document["id"], document, sse, data.decode())

    @classmethod
    def erasure(cls, erased: dict, after_id: int) -> Frame:
        """`event: erased`, with no SSE id (resuming stays where the events were). Numbered
        after the events delivered before it, so it keeps its place among them."""
        document = {"type": "erased", "student_id": erased["student_id"]}
        document["course_id"] = erased["course_id"]
        data = orjson.dumps(document)
        return cls(after_id, document, b"event: erased\ndata: %s\n\n" % data, data.decode(), True)


@dataclass(frozen=True)
class StreamFilter:
    student_id: str | None = None
    course_id: str | None = None
    event_type: str | None = None
    courses: frozenset[str] | None = None  # the token's (Grant.courses): None for all
    wanted: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The hub asks every client about every event (7% of fan-out time went to a generic
        # all() over the three); most dashboards watch everything, so keep only what is set.
        constraints = (
            ("student_id", self.student_id),
            ("course_id", self.course_id),
            ("event_type", self.event_type),
        )
        wanted = tuple((name, value) for name, value in constraints if value is not None)
        object.__setattr__(self, "wanted", wanted)

    def matches(self, document: Mapping[str, Any]) -> bool:
        if self.courses is not None and document.get("course_id") not in self.courses:
            return False
        for name, value in self.wanted:
            if document.get(name) != value:
                return False
        return True

    def hears_erasure(self, erased: Mapping[str, Any]) -> bool:
        """A student's erasure reaches every course their events were shown in."""
        courses = erased.get("courses") or [erased.get("course_id")]
        return self.courses is None or any(course in self.courses for course in courses)


# Why a client's stream ended.
OVERFLOWED = "overflowed"  # its queue filled up: cut off at once, even mid-write
CLOSED = "closed"  # it left, or the server is shutting down
TIMED_OUT = "timed out"  # a write blocked SEND_TIMEOUT_SECONDS
FAILED = "failed"  # a write failed: the connection is gone


def run_until_waiting(coroutine: Coroutine) -> Awaitable | None:
    """Run `coroutine` up to its first wait, here and now: None if it finished without
    waiting, else an awaitable that finishes it (what an eager task does on Python 3.12).
    It raises what the coroutine raised before waiting."""
    try:
        waiting_for = coroutine.send(None)
    except StopIteration:
        return None
    return finish_coroutine(coroutine, waiting_for)


@types.coroutine
def finish_coroutine(coroutine: Coroutine, waiting_for: Any) -> Generator[Any, Any, Any]:
    """The rest of a coroutine stepped by hand, for the task that awaits this."""
    while True:
        try:
            try:
                resumed_with = yield waiting_for
            except BaseException as error:  # a cancellation too: the coroutine sees it
                waiting_for = coroutine.throw(error)
            else:
                waiting_for = coroutine.send(resumed_with)
        except StopIteration as stop:
            return stop.value


async def reraise(error: Exception) -> None:
    raise error


async def finish_writes(started: Awaitable, send: Send, messages: list[dict]) -> None:
    await started
    for message in messages:
        await send(message)


# Slots, and a list rather than a deque (760 bytes empty): 5,000 idle streams hold these.
@dataclass(eq=False, slots=True)
class Client:
    """One connected dashboard: a bounded queue of shared frames, and the task writing them.

    No timer per write or per wait: Hub.watch looks at every client a few times a second,
    cuts off a write that blocks past its deadline and asks an idle stream for a ping. Two
    timers per event per client were a tenth of fan-out time.

    No task switch per event either: while the writer waits with nothing queued, the hub
    writes for it (Hub.flush), and wakes it only for a write that would block.
    """

    filter: StreamFilter
    limit: int
    owner: str = ""
    frames: list[Frame] = field(default_factory=list)
    ended: str | None = None
    writer: asyncio.Task | None = None
    # Kept up to date by the writer (see write_stream), read by check().
    writes: int = 0
    writing: bool = False
    deadline: float = math.inf
    ping_seconds: float | None = None
    ping_due: bool = False
    # Set by the writer: how the hub writes for it, and the last id written.
    transport: Transport | None = None
    last_sent: int = 0
    # A write the hub started that would block, or failed: the writer finishes it.
    started_write: Awaitable | None = None
    _waiter: asyncio.Future | None = field(default=None, repr=False)
    _seen_writes: int = field(default=-1, repr=False)
    _seen_at: float = field(default=0.0, repr=False)

    def queue(self, frame: Frame) -> bool:
        """Queue `frame`; True when the hub is to write it (see flush)."""
        if len(self.frames) >= self.limit:
            self.end(OVERFLOWED)
            return False
        self.frames.append(frame)
        if self._waiter is None or len(self.frames) > 1:
            return False  # the writer is busy and takes it next, or the hub already will
        if self.transport is None:
            self._wake()
            return False
        return True

    def unsent(self, frames: list[Frame]) -> list[Frame]:
        """The replay/live seam: what follows the last frame sent. An erasure notice is never
        dropped, as the replay may hold the erased student's events."""
        return [frame for frame in frames if frame.id > self.last_sent or frame.notice]

    def flush(self) -> None:
        """Write what is queued, for the waiting writer, without waking it; a write that
        would block is handed to the writer, to finish under its send deadline."""
        if self._waiter is None or self.ended is not None or self.transport is None:
            return
        frames = self.unsent(self.frames)
        self.frames = []
        if not frames:
            return
        self.last_sent = max(self.last_sent, frames[-1].id)
        messages = self.transport.messages(frames)
        for at, message in enumerate(messages):
            self.writes += 1
            try:
                started = run_until_waiting(self.transport.send(message))
            except Exception as error:
                started = reraise(error)
            if started is not None:
                self.writing = True
                self.started_write = finish_writes(started, self.transport.send, messages[at + 1 :])
                self._wake()
                return

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, reason: str) -> None:
        """Let the client go; when cut off (overflow, a blocked write) its writer is
        cancelled, even mid-write."""
        if self.ended is not None:
            return
        self.ended = reason
        self.frames.clear()
        self._wake()
        if reason in (OVERFLOWED, TIMED_OUT) and self.writer is not None:
            self.writer.cancel()

    def check(self, now: float) -> None:
        """The watchdog's look: the same write in progress since `deadline` ago is cut off;
        no write for ping_seconds makes a ping due."""
        if self.writes != self._seen_writes:
            self._seen_writes, self._seen_at = self.writes, now
            return
        quiet = now - self._seen_at
        if self.writing:
            if quiet >= self.deadline:
                self.end(TIMED_OUT)
        elif self.ping_seconds is not None and quiet >= self.ping_seconds and not self.ping_due:
            self.ping_due = True
            self._wake()

    async def next_frames(self) -> list[Frame]:
        """Everything queued since the last call; empty when a ping is due or once the
        client has ended."""
        if not self.frames and self.ended is None and not self.ping_due:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        frames, self.frames = self.frames, []
        return frames


class Hub:
    """Local fan-out: delivers each event at most once, in id order, to every client."""

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self.clients: set[Client] = set()
        self.per_owner: Counter[str] = Counter()
        self.to_flush: list[Client] = []
        self.last_id = 0
        self.subscribed = asyncio.Event()
        # Held while filling from the database, so deliveries stay in id order.
        self.filling = asyncio.Lock()

    @property
    def bus_connected(self) -> bool:
        return self.subscribed.is_set()

    def subscribe(self, stream_filter: StreamFilter, owner: str = "") -> Subscription:
        """A client receiving every delivered event that matches, for as long as it is held."""
        return Subscription(self, Client(stream_filter, self.queue_limit, owner))

    def deliver(self, documents: Iterable[dict]) -> None:
        # Events at or below last_id were already delivered (a replay after a reconnect).
        for document in documents:
            if document["id"] <= self.last_id:
                continue
            self.last_id = document["id"]
            frame = Frame.of(document)
            for client in self.clients:
                if client.ended is None and client.filter.matches(document) and client.queue(frame):
                    self.write_soon(client)

    def write_soon(self, client: Client) -> None:
        if not self.to_flush:
            asyncio.get_running_loop().call_soon(self.flush)
        self.to_flush.append(client)

    def flush(self) -> None:
        """Write for the clients whose writers wait, once whatever was delivered in this
        turn of the event loop is queued: one write per client for all of it."""
        clients, self.to_flush = self.to_flush, []
        for client in clients:
            client.flush()

    def announce_erasure(self, erased: dict) -> None:
        """Tell the clients of the erased student's (or course's) course to drop them."""
        frame = Frame.erasure(erased, self.last_id)
        for client in self.clients:
            if client.ended is None and client.filter.hears_erasure(erased) and client.queue(frame):
                self.write_soon(client)

    def close_all(self) -> None:
        for client in list(self.clients):
            client.end(CLOSED)

    async def watch(self, interval: float) -> None:
        """The streams' watchdog: send deadlines and pings (see Client.check), for ever."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for client in list(self.clients):
                client.check(now)


@dataclass(slots=True)
class Subscription:
    """Hub.subscribe's `with`: a class, as a generator's frame would be held by every open
    stream (400 bytes each)."""

    hub: Hub
    client: Client

    def __enter__(self) -> Client:
        self.hub.clients.add(self.client)
        self.hub.per_owner[self.client.owner] += 1
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        owner = self.client.owner
        self.hub.clients.discard(self.client)
        self.hub.per_owner[owner] -= 1
        if not self.hub.per_owner[owner]:
            del self.hub.per_owner[owner]


async def catch_up(hub: Hub, storage: Storage, page_size: int = 1_000) -> None:
    """Deliver from the database whatever was committed and not delivered yet.

    Safe at any moment: ids commit in order under the commit order, so what is committed
    is every id up to the highest, and what the bus brings later is skipped by id.
    """
    while True:
        # A task of its own: `databases` binds a connection to its task, and a long-lived
        # task whose connection broke while being released could never read again.
        documents = await asyncio.create_task(storage.events_after(hub.last_id, page_size))
        hub.deliver(documents)
        if len(documents) < page_size:
            return


async def deliver_message(hub: Hub, storage: Storage, payload: bytes) -> None:
    """A batch from the bus, after any earlier events it follows that never came: those of
    a process that died between its commit and its publish, or whose publish failed."""
    erased = decode_erasure(payload)
    if erased is not None:
        hub.announce_erasure(erased)
    elif (message := decode_message(payload)) is not None:
        follows, documents = message
        async with hub.filling:
            if follows > hub.last_id:
                await catch_up(hub, storage)
            hub.deliver(documents)


RECONNECT_MIN_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 8.0


async def relay_bus_to_hub(bus: Bus, hub: Hub, storage: Storage) -> None:
    """The background subscriber: bus -> hub, for ever, reconnecting with backoff."""
    delay = RECONNECT_MIN_SECONDS
    while True:
        try:
            async with bus.subscribe() as messages:
                async with hub.filling:
                    await catch_up(hub, storage)
                hub.subscribed.set()
                if delay > RECONNECT_MIN_SECONDS:
                    logger.info("bus subscription restored")
                delay = RECONNECT_MIN_SECONDS
                async for payload in messages:
                    await deliver_message(hub, storage, payload)
        except Exception as error:  # any failure means: reconnect
            logger.warning("bus subscription lost (%s); retrying in %.1f s", error, delay)
        hub.subscribed.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_SECONDS)


GAP_CHECK_SECONDS = 1.0


async def close_gaps(hub: Hub, storage: Storage) -> None:
    """A gap no later message reveals (its process died and the others went quiet) closes
    within two checks: events committed a whole check ago and still undelivered are read
    from the database. Younger ones are left to their publish, normally a millisecond away."""
    committed_before = 0
    while True:
        await asyncio.sleep(GAP_CHECK_SECONDS)
        try:
            committed_before = await finish_if_cancelled(
                check_for_gap(hub, storage, committed_before)
            )
        except Exception as error:
            logger.warning("could not check for undelivered events: %r", error)


async def check_for_gap(hub: Hub, storage: Storage, committed_before: int) -> int:
    """Fill the hub from the database if it is behind what was committed a check ago; the
    highest id committed now, for the next check."""
    latest = await storage.max_event_id()
    if hub.last_id < committed_before:
        async with hub.filling:
            await catch_up(hub, storage)
    return latest


async def finish_if_cancelled(work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work` to its end even if the caller is cancelled meanwhile, then let the
    cancellation through. A database call cut off mid-way is no use, and on SQLite it leaves
    aiosqlite's worker thread to answer later, into an event loop shutdown may have closed."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


# Ingest


@dataclass
class Service:
    """What the handlers reach through their request: built by the lifespan at start-up."""

    settings: Settings
    storage: Storage
    bus: Bus
    hub: Hub
    committer: Committer


def service_of(connection: HTTPConnection) -> Service:
    return connection.app.state.service


@dataclass
class PendingWrite:
    events: list[dict]
    rows: str | None  # statement_rows(events) on PostgreSQL, encoded by the POST's own task
    done: asyncio.Future[list[StoredEvent]]


# Every POST is answered within this: 201, or 503 with Retry-After (clients retry 5xx).
POST_DEADLINE_SECONDS = 8.0
# One batch: the commit order, the statement and the publish. A POST may wait for the batch
# before its own, so twice this stays within POST_DEADLINE_SECONDS.
COMMIT_DEADLINE_SECONDS = 4.0
# Batches stored back to back under one hold of the commit order (other processes wait).
PIPELINED_BATCHES = 8
# While storing fails, how often the committer tries the ingest path by itself, so that
# /healthz recovers without waiting for a POST.
PROBE_SECONDS = 1.0


def is_bad_row(error: Exception) -> bool:
    """A failure of the data (SQLSTATE class 22 or 23), not of the database."""
    if isinstance(error, asyncpg.PostgresError):
        return str(error.sqlstate)[:2] in ("22", "23")
    return isinstance(error, sqlite3.IntegrityError | sqlite3.DataError)


class Committer:
    """Coalesces concurrent POSTs into one transaction and one bus message.

    Batches form naturally: whatever queued while the previous commit ran goes into the
    next one, so an idle service adds no wait at all. Under load the next batch is stored
    while the last one is published (see _commit).
    """

    def __init__(self, storage: Storage, bus: Bus, max_events: int) -> None:
        self.storage = storage
        self.bus = bus
        self.max_events = max_events
        self.failure: str | None = None  # why the last attempt to store failed, until one works
        self._queue: asyncio.Queue[PendingWrite] = asyncio.Queue()
        self._carried: list[PendingWrite] = []

    async def submit(self, events: list[dict]) -> list[StoredEvent]:
        rows = statement_rows(events) if self.storage.is_postgres else None
        pending = PendingWrite(events, rows, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        try:
            async with asyncio.timeout(POST_DEADLINE_SECONDS):
                return await asyncio.shield(pending.done)
        except TimeoutError:
            pending.done.cancel()  # still queued: never stored; in flight: a retry dedupes
            raise StorageUnavailable("storing took too long") from None

    async def run(self) -> None:
        while True:
            if self._carried:  # taken by the last commit, never stored: first in line
                batch, self._carried = self._carried, []
            else:
                try:
                    async with asyncio.timeout(PROBE_SECONDS if self.failure else None):
                        first = await self._queue.get()
                except TimeoutError:
                    await finish_if_cancelled(self._try(self._probe))
                    continue
                batch = self._take([first])
            if batch:  # shutdown waits for a commit under way, never cuts one off
                await finish_if_cancelled(self._commit_batch(batch))

    def _take(self, batch: list[PendingWrite]) -> list[PendingWrite]:
        """`batch` and what queued behind it, up to max_events; none whose POST gave up."""
        size = sum(len(pending.events) for pending in batch)
        while not self._queue.empty() and size < self.max_events:
            batch.append(self._queue.get_nowait())
            size += len(batch[-1].events)
        return [pending for pending in batch if not pending.done.done()]

    async def _commit_batch(self, batch: list[PendingWrite]) -> None:
        error = await self._try(self._commit, batch)
        if error is None:
            return
        if len(batch) > 1 and is_bad_row(error):
            # One request's bad row must not fail its neighbours: retry them one by one.
            for pending in batch:
                await self._commit_batch([pending])
            return
        logger.warning("could not store %d events: %r", sum(len(p.events) for p in batch), error)
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(StorageUnavailable(str(error)))

    async def _try(self, attempt: Callable[..., Awaitable[None]], *args: Any) -> Exception | None:
        """Run one attempt to store within the commit deadline; keep `failure` up to date."""
        try:
            async with asyncio.timeout(COMMIT_DEADLINE_SECONDS):
                await attempt(*args)
        except Exception as error:
            if not is_bad_row(error):
                self.failure = "timed out" if isinstance(error, TimeoutError) else repr(error)
            return error
        if self.failure is not None:
            logger.info("storing again after: %s", self.failure)
            self.failure = None
        return None

    async def _probe(self) -> None:
        # An empty batch takes the commit order and the events table's write lock, as a
        # real one does, and stores nothing.
        async with self.storage.commit_order():
            await self.storage.store([])

    async def _commit(self, batch: list[PendingWrite]) -> None:
        """Store `batch`, then, while its publish runs, whatever queued meanwhile, and so on:
        PostgreSQL stores the next batch while Redis takes the last one, under one hold of
        the commit order. Publishes go out one after another, in id order."""
        async with self.storage.commit_order():
            stored = await self._store(batch)
            publishing = asyncio.create_task(self._publish_and_answer(batch, stored))
            try:
                for _ in range(PIPELINED_BATCHES - 1):
                    batch = self._take([])
                    if not batch:
                        break
                    # Until stored, the next run of the committer owns it: on any failure
                    # here it is tried again there, alone, with the usual handling.
                    self._carried = batch
                    try:
                        stored = await self._store(batch)
                    except Exception:
                        break
                    self._carried = []
                    await publishing
                    publishing = asyncio.create_task(self._publish_and_answer(batch, stored))
            finally:
                await publishing

    async def _store(self, batch: list[PendingWrite]) -> StoredBatch:
        received_at = dt.datetime.now(dt.UTC)
        events = [
            {**event, "received_at": received_at} for pending in batch for event in pending.events
        ]
        rows = joined_rows(pending.rows for pending in batch) if self.storage.is_postgres else None
        return await self.storage.store(events, rows)

    async def _publish_and_answer(self, batch: list[PendingWrite], stored: StoredBatch) -> None:
        try:
            results = stored.results
        except Exception as error:  # stored, but with no receipts to give: a retry dedupes
            logger.exception("could not read back a stored batch")
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(StorageUnavailable(repr(error)))
            return
        try:
            payload = encode_batch(stored)
            if payload is not None:
                await self.bus.publish(payload)
        except Exception as error:
            # Stored is what we promised; other processes read what they missed from the
            # database (deliver_message, close_gaps).
            logger.warning("could not publish a batch to the bus: %r", error)
        start = 0
        for pending in batch:
            end = start + len(pending.events)
            if not pending.done.done():
                pending.done.set_result(results[start:end])
            start = end


async def post_events(request: Request) -> Response:
    """Store one event or a batch; 201 with each event's id once all are committed."""
    service = service_of(request)
    settings = service.settings
    if not is_json_content_type(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "send the events as application/json")
    try:
        body = parse_json_body(await read_body(request, settings.max_body_bytes))
    except ClientDisconnect:
        return Response(status_code=400)
    tokens = [
        bearer_token(request.headers),
        request.query_params.get("token"),
        envelope_token(body),
    ]
    require_token(settings.ingest_tokens, tokens, "ingest")
    events = normalise_batch(body, dt.datetime.now(dt.UTC), settings)
    if settings.pseudonymize_salt:  # the one place: nothing after this sees a raw id or name
        events = [pseudonymized(event, settings.pseudonymize_salt) for event in events]
    try:
        stored = await service.committer.submit(events)
    except StorageUnavailable:
        raise storage_unavailable("the events could not be stored") from None
    return JSONResponse({"events": [item.receipt() for item in stored]}, status_code=201)


# Streams


def parse_last_event_id(value: str | None) -> int | None:
    """Last-Event-ID / last_event_id: a non-negative integer, or None when absent or garbage."""
    if value is None or not value.strip().isdigit():
        return None
    number = int(value.strip())
    return number if number <= INT64_MAX else None


@dataclass(frozen=True, slots=True)
class Opening:
    """What a (re)connecting client gets before the live stream: a replay or a resync notice."""

    after_id: int
    replay: list[Frame] = field(default_factory=list)
    notice: dict | None = None


async def open_stream(service: Service, client: Client, after_id: int | None) -> Opening:
    """The replay after `after_id` (subscribed first, so nothing falls between the two),
    or a resync notice when more than REPLAY_LIMIT events were missed."""
    if after_id is None:
        return Opening(0)
    limit = service.settings.replay_limit
    try:
        documents = await service.storage.events_after(after_id, limit + 1)
    except Exception as error:
        raise StorageUnavailable(f"cannot replay right now: {error!r}") from error
    if len(documents) > limit:
        notice = {
            "type": "resync",
            "reason": "too_far_behind",
            "message": f"more than {limit} events were missed; reload state from the read API",
            "latest_id": service.hub.last_id,
        }
        return Opening(after_id, notice=notice)
    replay = [Frame.of(document) for document in documents if client.filter.matches(document)]
    return Opening(after_id, replay)


async def write_stream(
    client: Client, transport: Transport, opening: Opening, deadline: float
) -> str:
    """The client's one writer: its opening, then live frames, each id once and in id order,
    whatever is queued in one write, every write within `deadline` seconds (Hub.watch).

    Returns why it stopped (see Client.end); a cut-off cancels it wherever it waits.
    """
    client.writer = asyncio.current_task()
    client.deadline, client.ping_seconds = deadline, transport.ping_seconds
    try:
        if opening.notice is not None:
            client.writes += 1
            client.writing = True
            await transport.write_notice(opening.notice)
            client.writing = False
        frames, client.last_sent = opening.replay, opening.after_id
        client.transport = transport
        while client.ended is None:
            if client.started_write is not None:  # by the hub, before these frames
                started, client.started_write = client.started_write, None
                client.writing = True
                await started
                client.writing = False
            if frames:
                # The replay/live seam: frames queued while the replay was read may repeat it.
                if frames[0].id <= client.last_sent:
                    frames = client.unsent(frames)
                if frames:
                    client.writes += 1
                    client.writing = True
                    for message in transport.messages(frames):
                        await transport.send(message)
                    client.writing = False
                    client.last_sent = max(client.last_sent, frames[-1].id)
            elif client.ping_due:
                client.ping_due = False
                client.writes += 1
                client.writing = True
                await transport.write_ping()
                client.writing = False
            frames = await client.next_frames()
    except asyncio.CancelledError:
        if client.ended in (OVERFLOWED, TIMED_OUT) and asyncio.current_task().uncancel() == 0:
            if client.ended == OVERFLOWED:
                logger.warning("slow dashboard cut off after %d queued events", client.limit)
            else:
                logger.info("dashboard dropped: a write blocked for %s s", deadline)
            return client.ended
        raise
    except Exception as error:  # reset, closed or refused: the connection is gone
        logger.info("dashboard dropped: %r", error)
        client.end(FAILED)
    finally:
        client.writer = None
        client.writing = False
    return client.ended or CLOSED


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx and similar proxies would buffer the stream
]
# A comment line: keeps idle proxies (Heroku's router: 55 s) from cutting the stream.
SSE_PING = b": ping\n\n"
FINAL_WRITE_SECONDS = 1.0


@dataclass(slots=True)
class SseTransport:
    send: Send
    ping_seconds: float | None

    async def write(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    @staticmethod
    def messages(frames: list[Frame]) -> list[dict]:
        if len(frames) == 1:
            return [frames[0].sse_message]
        body = b"".join(frame.sse for frame in frames)
        return [{"type": "http.response.body", "body": body, "more_body": True}]

    async def write_notice(self, notice: dict) -> None:
        await self.write(b"event: resync\ndata: %s\n\n" % orjson.dumps(notice))

    async def write_ping(self) -> None:
        await self.write(SSE_PING)


@dataclass(slots=True)
class WebSocketTransport:
    send: Send
    ping_seconds: float | None = None  # uvicorn pings WebSockets at the protocol level

    @staticmethod
    def messages(frames: list[Frame]) -> list[dict]:
        return [frame.ws_message for frame in frames]

    async def write_notice(self, notice: dict) -> None:
        await self.send({"type": "websocket.send", "text": orjson.dumps(notice).decode()})

    async def write_ping(self) -> None:
        return None


Transport = SseTransport | WebSocketTransport

# The server's own `send`, kept in the scope by TelemetryApp: a stream's writes go straight to
# it, past the middleware's per-message wrappers (a fifth of fan-out time), which act on
# response starts only.
SERVER_SEND = "telemetry.server_send"


def server_send(scope: Scope, send: Send) -> Send:
    return scope.get(SERVER_SEND, send)


# An SSE stream's body, left in the scope by EventStream for TelemetryApp to run after
# Starlette's layers have returned: an idle stream then holds none of their dozen coroutine
# frames, nor what those frames hold (Python heap per idle stream, tracemalloc over 2,000 in
# process: 18.8 KiB before, 12.1 KiB after). The layers act on the response start only,
# which the body sends through their `send`, and its writes went past them already
# (SERVER_SEND).
STREAM_BODY = "telemetry.stream_body"


# uvicorn cannot abort a response: a stream cut off on purpose ends unfinished, and uvicorn
# closes its connection, as wanted, but logs that as an ERROR. write_stream has logged why.
CUT_OFF = contextvars.ContextVar("cut_off", default=False)
UNFINISHED_RESPONSE = "ASGI callable returned without completing response."


class QuietCutOffs(logging.Filter):
    """Drops uvicorn's error line about a stream this task cut off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == UNFINISHED_RESPONSE and CUT_OFF.get())


@dataclass(slots=True)
class EventStream:
    """The SSE response: retry hint, then write_stream until the client leaves or must go."""

    service: Service
    stream_filter: StreamFilter
    owner: str
    after_id: int | None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":  # the headers, then done: no stream to hold the connection
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return
        scope[STREAM_BODY] = self.body(receive, send, server_send(scope, send))

    async def body(self, receive: Receive, start: Send, send: Send) -> None:
        """The stream, run by TelemetryApp. `start` is the middleware's `send`, which adds
        their headers to the response start; `send` is the server's, for everything after."""
        settings = self.service.settings
        # Subscribed before the first await, as admit_stream counted: the stream limit holds.
        with self.service.hub.subscribe(self.stream_filter, self.owner) as client:
            await start({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            del start  # the middleware's wrappers, no longer needed
            # The first bytes of a new connection fit in any socket buffer.
            transport = SseTransport(send, settings.sse_ping_seconds)
            await transport.write(b"retry: %d\n\n" % settings.sse_retry_ms)
            watcher = asyncio.create_task(watch_for_disconnect(receive, client))
            try:
                opening = await open_stream(self.service, client, self.after_id)
                ended = await write_stream(
                    client, transport, opening, settings.send_timeout_seconds
                )
            except StorageUnavailable as error:
                # Ending the stream makes EventSource reconnect after the retry hint.
                logger.warning("SSE replay failed: %s", error)
                ended = CLOSED
            finally:
                watcher.cancel()
        if ended in (OVERFLOWED, TIMED_OUT):
            CUT_OFF.set(True)  # its socket would hold the final write too: leave it unfinished
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FINAL_WRITE_SECONDS):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def watch_for_disconnect(receive: Receive, client: Client) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    client.end(CLOSED)


STREAM_FILTERS = ("student_id", "course_id", "event_type")


async def open_filter(connection: HTTPConnection) -> StreamFilter:
    """A stream's filter: what it asked for, within its token's courses (see authorize_read)."""
    grant, params = await authorize_read(connection, parse_stream_query)
    return StreamFilter(**{name: params[name] for name in STREAM_FILTERS}, courses=grant.courses)


async def stream_events(request: Request) -> ASGIApp:
    """Server-Sent Events: replay after Last-Event-ID, then every new event."""
    after_id = parse_last_event_id(
        request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    )
    stream_filter = await open_filter(request)
    return EventStream(service_of(request), stream_filter, admit_stream(request), after_id)


async def websocket_events(websocket: WebSocket) -> None:
    """WebSocket: one JSON text frame per event; `last_event_id` resumes like SSE."""
    service = service_of(websocket)
    after_id = parse_last_event_id(websocket.query_params.get("last_event_id"))
    try:
        stream_filter, owner = await admit_websocket(websocket)
    except ApiError as refusal:
        # Closing before accept answers the handshake with HTTP 403.
        logger.info("WebSocket refused: %s", refusal.message)
        await websocket.close(code=1008, reason=refusal.code)
        return
    await websocket.accept()
    with service.hub.subscribe(stream_filter, owner) as client:
        try:
            opening = await open_stream(service, client, after_id)
        except StorageUnavailable:
            await websocket.close(code=1011, reason="storage_unavailable")
            return
        watcher = asyncio.create_task(watch_for_close(websocket, client))
        try:
            transport = WebSocketTransport(server_send(websocket.scope, websocket.send))
            ended = await write_stream(
                client, transport, opening, service.settings.send_timeout_seconds
            )
        finally:
            watcher.cancel()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(FINAL_WRITE_SECONDS):
            await websocket.close(code=websocket_close_code(ended))


def websocket_close_code(ended: str) -> int:
    if ended != CLOSED:
        return 1013  # too slow, or gone: try again later, and resume by id
    return 1012 if AppStatus.should_exit else 1000  # 1012: the service restarts


async def watch_for_close(websocket: WebSocket, client: Client) -> None:
    # A push-only socket would never notice the client leaving, and uvicorn's shutdown
    # would then wait for it.
    with contextlib.suppress(Exception):
        while True:
            await websocket.receive_text()
    client.end(CLOSED)


# Read API

# Keyset pages on the event id (or student id), never OFFSET: a page stays correct while
# events keep arriving.
PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1_000


# Reads one query parameter, adding to `errors` what is wrong with it.
QueryReader = Callable[[Mapping[str, str], str, FieldErrors], Any]


def text_param(max_chars: int, absent: str | None = None) -> QueryReader:
    """An optional text filter; empty means absent, as an HTML form sends it."""

    def read(query: Mapping[str, str], name: str, errors: FieldErrors) -> str | None:
        value = query.get(name) or absent
        if value is not None and len(value) > max_chars:
            errors.add(name, f"must be at most {max_chars} characters")
            return absent
        return value

    return read


def int_param(default: int, low: int, high: int) -> QueryReader:
    def read(query: Mapping[str, str], name: str, errors: FieldErrors) -> int:
        raw = query.get(name, "").strip()
        if not raw:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            errors.add(name, f"must be a whole number from {low} to {high}")
            return default
        return int(raw)

    return read


def bool_param(query: Mapping[str, str], name: str, errors: FieldErrors) -> bool:
    raw = query.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        errors.add(name, "must be true or false")
    return raw == "true"


def free_text(query: Mapping[str, str], name: str, errors: FieldErrors) -> str | None:
    return query.get(name) or None


def query_parser(**readers: QueryReader) -> Callable[[Mapping[str, str]], dict[str, Any]]:
    """An endpoint's query parameters, or a 422 naming every bad value and every unknown
    name: a misspelt filter (`?course=cs101`) must not quietly answer with everyone."""

    def parse(query: Mapping[str, str]) -> dict[str, Any]:
        errors = FieldErrors()
        params = {name: read(query, name, errors) for name, read in readers.items()}
        for name in query:
            if name not in readers and name != "token":
                errors.add(name, "is not a parameter of this endpoint")
        if errors.details:
            raise ApiError(
                422, "invalid_query", "some query parameters are invalid", errors.details
            )
        return params

    return parse


TEXT_PARAM = text_param(TEXT_MAX_CHARS)
IDENTIFIER_PARAM = text_param(IDENTIFIER_MAX_CHARS)
EVENT_FILTERS = {
    "student_id": IDENTIFIER_PARAM,
    "course_id": TEXT_PARAM,
    "event_type": IDENTIFIER_PARAM,
    "notebook_path": TEXT_PARAM,
}
PAGE_LIMIT = int_param(PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX)
CELLS_LIMIT_DEFAULT = 200
ACTIVITY_MINUTES_DEFAULT = 60
ACTIVITY_MINUTES_MAX = 1_440

# The parameters of SELECT_EVENT_PAGE and of SELECT_STUDENT_PAGE.
parse_events_query = query_parser(
    **EVENT_FILTERS,
    since_id=int_param(0, 0, INT64_MAX),
    before_id=int_param(INT64_MAX, 1, INT64_MAX),
    limit=PAGE_LIMIT,
    collapse_beats=bool_param,
)
parse_students_query = query_parser(
    course_id=TEXT_PARAM, after=text_param(IDENTIFIER_MAX_CHARS, absent=""), limit=PAGE_LIMIT
)
# GET /api/v1/help and GET /api/v1/students.csv.
parse_course_query = query_parser(course_id=TEXT_PARAM)
parse_cells_query = query_parser(
    course_id=TEXT_PARAM,
    notebook_path=TEXT_PARAM,
    limit=int_param(CELLS_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX),
)
parse_activity_query = query_parser(
    course_id=TEXT_PARAM,
    minutes=int_param(ACTIVITY_MINUTES_DEFAULT, 1, ACTIVITY_MINUTES_MAX),
)
# GET /api/v1/events.csv: the filters of GET /api/v1/events, without paging.
parse_export_query = query_parser(**EVENT_FILTERS)
# The streams' filters are free text: only a misspelt name can be refused. stream_events
# reads last_event_id itself.
parse_stream_query = query_parser(
    **dict.fromkeys(STREAM_FILTERS, free_text), last_event_id=free_text
)


async def read_storage(read: Awaitable[Any]) -> Any:
    """A read for the read API; a database failure becomes 503, as for writes."""
    try:
        return await read
    except Exception as error:  # the driver's errors differ by backend
        logger.warning("read failed: %r", error)
        raise storage_unavailable("the database could not be read") from None


async def read_page(
    read: Callable[[dict[str, Any]], Awaitable[list[dict]]], params: dict[str, Any], key: str
) -> tuple[list[dict], Any]:
    """A keyset page, and the `key` of its last row if another follows (read one row more)."""
    limit = params["limit"]
    rows = await read_storage(read({**params, "limit": limit + 1}))
    page = rows[:limit]
    return page, page[-1][key] if len(rows) > limit else None


async def list_events(request: Request) -> Response:
    """Stored events, newest first, filtered; `next_before_id` fetches the older page."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_events_query)
    # Read before the page: resuming the stream from latest_id then misses nothing.
    latest_id = await read_storage(storage.max_event_id())
    page, next_before_id = await read_page(storage.events_page, params, "id")
    latest_id = max([latest_id, *(document["id"] for document in page)])
    return JSONResponse({"events": page, "next_before_id": next_before_id, "latest_id": latest_id})


async def list_students(request: Request) -> Response:
    """Students by student_id with their counts; `next_after` fetches the next page."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_students_query)
    now = dt.datetime.now(dt.UTC)
    read = functools.partial(storage.students_page, now=now)
    page, next_after = await read_page(read, params, "student_id")
    return JSONResponse({"now": format_timestamp(now), "students": page, "next_after": next_after})


async def list_help(request: Request) -> Response:
    """The help queue, first come first served, and every raise still beating."""
    _, params = await authorize_read(request, parse_course_query)
    now = dt.datetime.now(dt.UTC)
    hands = await read_storage(service_of(request).storage.hands(params, now))
    return JSONResponse(
        {
            "now": format_timestamp(now),
            "queue": [hand for hand in hands if hand["state"] == "up"],
            "hands": hands,
        }
    )


# What an instructor can do about a raised hand, as the event type that records it.
HAND_ACTIONS = {"on-my-way": "help_on_my_way", "dismiss": "help_dismissed"}


async def answer_hand(request: Request) -> Response:
    """Record "on my way" or a dismissal as an event: stored and published like any, so
    every dashboard, and any reload, agrees."""
    service = service_of(request)
    event_type = HAND_ACTIONS.get(request.path_params["action"])
    if event_type is None:
        raise ApiError(404, "not_found", "the actions are on-my-way and dismiss")
    student_id = request.path_params["student_id"]
    await authorize_read(request, lambda query: {"student_id": student_id})
    by = parse_instructor(await read_body(request, 4_096), request.headers.get("content-type"))
    seen, course_id = await read_storage(service.storage.student_course(student_id))
    if not seen:
        raise ApiError(404, "no_such_student", f"no student {student_id!r} has been seen")
    now = dt.datetime.now(dt.UTC)
    hand = hand_document(await read_storage(service.storage.latest_hand(student_id)), now)
    if hand is None or hand["state"] != "up":
        raise ApiError(409, "no_raised_hand", f"{student_id!r} has no raised hand now")
    raw = {"student_id": student_id, "event_type": event_type, "course_id": course_id, "by": by}
    [event] = normalise_batch(raw, now, service.settings)
    try:
        [stored] = await service.committer.submit([event])
    except StorageUnavailable:
        raise storage_unavailable("the action could not be stored") from None
    hand = hand_document(await read_storage(service.storage.latest_hand(student_id)), now)
    body = {"id": stored.document["id"], "event_type": event_type, "hand": hand}
    return JSONResponse(body, status_code=201)


async def list_cells(request: Request) -> Response:
    """Where the class is stuck: per notebook and cell, who ran it and who fails there now."""
    _, params = await authorize_read(request, parse_cells_query)
    cells = await read_storage(service_of(request).storage.cells(params))
    return JSONResponse({"now": format_timestamp(dt.datetime.now(dt.UTC)), "cells": cells})


async def list_activity(request: Request) -> Response:
    """Executions, errors and raised hands per minute over the last `minutes`."""
    _, params = await authorize_read(request, parse_activity_query)
    now = dt.datetime.now(dt.UTC)
    series = await read_storage(service_of(request).storage.activity(params, now))
    return JSONResponse(
        {"now": format_timestamp(now), "minutes": params["minutes"], "series": series}
    )


# A spreadsheet runs a cell that starts with one of these as a formula; students write
# the text we export.
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
STUDENT_CSV_COLUMNS = (
    "student_id name course_id team first_seen last_seen event_count execution_count "
    "error_count last_notebook_path hand_raised stuck struggling"
).split()
EVENT_CSV_COLUMNS = (
    "id received_at occurred_at student_id student_name team course_id event_type "
    "notebook_path cell_id cell_index execution_count status duration_ms error source"
).split()
EXPORT_PAGE_SIZE = 1_000


def csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_line(values: Iterable[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([csv_value(value) for value in values])
    return buffer.getvalue().encode()


def event_csv_row(document: Mapping[str, Any]) -> list[Any]:
    """An event as one CSV row of EVENT_CSV_COLUMNS; its error as `ename: evalue`."""
    row = {**document, "error": error_text(document.get("error"))}
    return [row.get(column) for column in EVENT_CSV_COLUMNS]


def student_csv_row(document: Mapping[str, Any]) -> list[Any]:
    return [document.get(column) for column in STUDENT_CSV_COLUMNS]


def csv_download(
    name: str,
    header: list[str],
    first: list[Any],
    more: Callable[[Any], Awaitable[list[Any]]],
    row: Callable,
) -> Response:
    """The header, then page after page until one comes back empty; one page in memory."""

    async def lines() -> AsyncIterator[bytes]:
        yield csv_line(header)
        page = first
        while page:
            yield b"".join(csv_line(row(item)) for item in page)
            try:
                page = await more(page[-1])
            except Exception as error:  # the status is sent: end the download short
                logger.warning("CSV export cut short: %r", error)
                return

    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8", headers=headers)


async def export_events(request: Request) -> Response:
    """Events as CSV, oldest first, streamed in keyset pages: a term fits, memory does not grow."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_export_query)
    params["limit"] = EXPORT_PAGE_SIZE

    def page_after(last: dict) -> Awaitable[list[dict]]:
        return storage.events_export({**params, "since_id": last["id"]})

    first = await read_storage(storage.events_export({**params, "since_id": 0}))
    return csv_download("events.csv", EVENT_CSV_COLUMNS, first, page_after, event_csv_row)


async def export_students(request: Request) -> Response:
    """The students table as CSV, streamed in keyset pages."""
    storage = service_of(request).storage
    _, params = await authorize_read(request, parse_course_query)
    params["limit"] = EXPORT_PAGE_SIZE
    now = dt.datetime.now(dt.UTC)

    def page_after(last: dict) -> Awaitable[list[dict]]:
        return storage.students_page({**params, "after": last["student_id"]}, now)

    first = await read_storage(storage.students_page({**params, "after": ""}, now))
    return csv_download("students.csv", STUDENT_CSV_COLUMNS, first, page_after, student_csv_row)


# Access control

TOKEN_COOKIE = "telemetry_token"
# Query-string tokens would otherwise be written to the access log with the path; so would
# the id an erasure names, which in pseudonymous mode may be the student's raw id.
TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*|(?<=/api/v1/students/)[^?\s\"]+")


# Every read by a dashboard token and every erasure: one line each, as JSON (see log_access).
ACCESS_LOG = logging.getLogger("telemetry.access")
# The reader of a service without DASHBOARD_TOKENS (the embedded default): everything.
OPEN_GRANT = Grant("open", "")


def matching_secret(candidate: str | None, secrets: Iterable[str]) -> int | None:
    """The index of the secret `candidate` is, compared in constant time against every
    configured one (several allow rotation)."""
    if not candidate:
        return None
    given = candidate.encode()
    found = None
    for index, secret in enumerate(secrets):
        if hmac.compare_digest(given, secret.encode()):
            found = index
    return found


def find_grant(candidate: str | None, grants: tuple[Grant, ...]) -> Grant | None:
    index = matching_secret(candidate, (grant.secret for grant in grants))
    return None if index is None else grants[index]


def token_is_valid(candidate: str | None, tokens: tuple[str, ...]) -> bool:
    return matching_secret(candidate, tokens) is not None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def presented_tokens(connection: HTTPConnection) -> list[str | None]:
    """Where a token may come from, header first: EventSource can send only cookie or query."""
    return [
        bearer_token(connection.headers),
        connection.cookies.get(TOKEN_COOKIE),
        connection.query_params.get("token"),
    ]


def unauthorized(realm: str) -> ApiError:
    headers = {"WWW-Authenticate": f'Bearer realm="{realm}"'}
    return ApiError(401, "unauthorized", f"a valid {realm} token is required", headers=headers)


def require_token(tokens: tuple[str, ...], candidates: Iterable[str | None], realm: str) -> None:
    """No tokens configured means open (the embedded default); otherwise one must match."""
    if tokens and not any(token_is_valid(candidate, tokens) for candidate in candidates):
        raise unauthorized(realm)


def require_grant(grants: tuple[Grant, ...], candidates: Iterable[str | None], realm: str) -> Grant:
    """The grant of the first presented token that matches one of `grants`, else 401."""
    for candidate in candidates:
        grant = find_grant(candidate, grants)
        if grant is not None:
            return grant
    raise unauthorized(realm)


def dashboard_grant(connection: HTTPConnection) -> Grant:
    """Who reads: the presented dashboard token's grant, or OPEN_GRANT with no tokens set."""
    grants = service_of(connection).settings.dashboard_tokens
    if not grants:
        return OPEN_GRANT
    return require_grant(grants, presented_tokens(connection), "dashboard")


def out_of_scope(grant: Grant, field_name: str, what: str) -> ApiError:
    message = f"token {grant.name!r} may not read {what}"
    problem = f"is outside this token's courses ({', '.join(grant.course_list() or [])})"
    return ApiError(403, "out_of_scope", message, [{"field": field_name, "problem": problem}])


async def check_scope(storage: Storage, grant: Grant, params: Mapping[str, Any]) -> None:
    """A course, or a student, named explicitly outside the grant is a 403, never an empty
    answer that would hide it."""
    if grant.courses is None:
        return
    course_id = params.get("course_id")
    if course_id is not None and not grant.covers(course_id):
        raise out_of_scope(grant, "course_id", f"course {course_id!r}")
    student_id = params.get("student_id")
    if student_id is not None:
        _, course_id = await read_storage(storage.student_course(student_id))
        if not grant.covers(course_id):
            raise out_of_scope(grant, "student_id", f"student {student_id!r}")


def log_access(
    connection: HTTPConnection, grant: Grant, action: str, outcome: str, **what: Any
) -> None:
    """One line per read, stream opening or erasure: the token's name (never its secret), the
    courses it covers, the endpoint and what it named."""
    method = connection.scope.get("method", "WEBSOCKET")
    route = getattr(connection.scope.get("route"), "path_format", connection.url.path)
    params = {k: v for k, v in connection.query_params.items() if k != "token"}
    params.update(connection.path_params)
    if "last-event-id" in connection.headers:
        params["last_event_id"] = connection.headers["last-event-id"]
    line = {
        "action": action,
        "outcome": outcome,
        "token": grant.name,
        "courses": grant.course_list() or "all",
        "endpoint": f"{method} {route}",
        "params": params,
        **what,
    }
    ACCESS_LOG.info("%s", orjson.dumps(line).decode())


async def authorize_read(
    connection: HTTPConnection, parse: Callable[[Mapping[str, str]], dict[str, Any]]
) -> tuple[Grant, dict[str, Any]]:
    """Every read's one gate: the token (401), the query (422), the courses and the student
    it names (403), then the access log. The parameters come back with `courses`, the
    grant's as in_scope takes them, so the SQL reads nothing outside it."""
    grant = dashboard_grant(connection)
    params = parse(connection.query_params)
    action = "read" if connection.scope.get("method", "GET") == "GET" else "act"  # a hand action
    try:
        await check_scope(service_of(connection).storage, grant, params)
    except ApiError as refusal:
        log_access(connection, grant, action, "refused")
        raise refusal
    log_access(connection, grant, action, "allowed")
    courses = grant.course_list()
    return grant, {**params, "courses": None if courses is None else orjson.dumps(courses).decode()}


def envelope_token(body: Any) -> str | None:
    """jupyterlab-pioneer's exporter cannot set headers: it sends the token in params."""
    if not is_pioneer_envelope(body):
        return None
    params = body.get("params")
    token = params.get("token") if isinstance(params, dict) else None
    return token if isinstance(token, str) else None


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Cross-site WebSocket hijacking guard: browsers always send Origin, others need not."""
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc == host


def client_key(connection: HTTPConnection) -> str:
    """Whom to count connections against: the dashboard token, else the client address."""
    token = next((candidate for candidate in presented_tokens(connection) if candidate), None)
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "address:" + (connection.client.host if connection.client else "unknown")


def admit_stream(connection: HTTPConnection) -> str:
    """The owner key of a new stream, or 429 once that owner holds too many."""
    service = service_of(connection)
    owner = client_key(connection)
    limit = service.settings.max_streams_per_client
    if service.hub.per_owner[owner] >= limit:
        raise ApiError(429, "too_many_streams", f"at most {limit} streams per token or address")
    return owner


async def admit_websocket(websocket: WebSocket) -> tuple[StreamFilter, str]:
    settings = service_of(websocket).settings
    origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
    if not origin_allowed(origin, host, settings.cors_origins):
        raise ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
    stream_filter = await open_filter(websocket)
    return stream_filter, admit_stream(websocket)


def session_body(grant: Grant) -> dict:
    """What the dashboard may ask for: its token's name and courses (null: all)."""
    return {
        "status": "ok",
        "token": grant.name,
        "courses": grant.course_list(),
        "rules": CLASS_RULES,
    }


async def show_session(request: Request) -> Response:
    return JSONResponse(session_body(dashboard_grant(request)))


async def create_session(request: Request) -> Response:
    """Trade a dashboard token (Authorization: Bearer) for the HttpOnly cookie that
    EventSource, which cannot send headers, presents by itself. The cookie holds the token
    itself, so it reads exactly what the token reads."""
    token = bearer_token(request.headers)
    grants = service_of(request).settings.dashboard_tokens
    grant = require_grant(grants, [token], "dashboard") if grants else OPEN_GRANT
    response = JSONResponse(session_body(grant))
    if token:
        secure = request.url.scheme == "https"
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=secure)
    return response


def admin_grant(request: Request) -> Grant:
    """An admin token (Bearer only); with none configured, erasure is never open."""
    grants = service_of(request).settings.admin_tokens
    if not grants:
        raise ApiError(
            403, "no_admin_tokens", "erasure is refused: no admin tokens configured (ADMIN_TOKENS)"
        )
    return require_grant(grants, [bearer_token(request.headers)], "admin")


async def stored_student(service: Service, given: str) -> dict[str, Any]:
    """The student an erasure names, as stored, and their course. In pseudonymous mode the
    admin may give the raw id or the pseudonym the dashboards show."""
    salt = service.settings.pseudonymize_salt
    # The pseudonym last: the one reported when neither is stored, never a raw id.
    for student_id in (given, pseudonym(salt, given)) if salt else (given,):
        seen, course_id = await read_storage(service.storage.student_course(student_id))
        if seen:
            break
    return {"student_id": student_id, "course_id": course_id}


async def erase(request: Request) -> Response:
    """Erase a student, or a whole course: every row in every table, in one transaction;
    then every process's open dashboards are told to drop them (Hub.announce_erasure)."""
    service = service_of(request)
    grant = admin_grant(request)
    storage: Storage = service.storage
    if "student_id" in request.path_params:
        erased = await stored_student(service, request.path_params["student_id"])
        courses = await read_storage(storage.student_courses(erased["student_id"]))
        deleted = await read_storage(storage.erase_student(erased["student_id"]))
        notice = {**erased, "courses": courses}
    else:
        erased = {"student_id": None, "course_id": request.path_params["course_id"]}
        deleted = await read_storage(storage.erase_course(erased["course_id"]))
        notice = erased
    found = any(deleted.values())
    outcome = "erased" if found else "nothing"
    log_access(request, grant, "erase", outcome, params=erased, deleted=deleted)
    if not found:
        what = "student" if erased["student_id"] is not None else "course"
        raise ApiError(404, f"no_such_{what}", f"no row of that {what} is stored")
    try:
        await service.bus.publish(encode_erasure(notice))
    except Exception as error:  # erased all the same: at least this process's dashboards hear
        logger.warning("could not publish an erasure: %r", error)
        service.hub.announce_erasure(notice)
    return JSONResponse({"erased": erased, "deleted": deleted})


class RedactTokens(logging.Filter):
    """Keeps `?token=` values, and the id in an erasure's path, out of uvicorn's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                TOKEN_IN_QUERY.sub("REDACTED", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


# POST /api/v1/events and jupyterlab-pioneer's dated form of it; not /api/v1/events.csv.
INGEST_PATH = re.compile(r"/api/v1/events(?:/\d+){0,4}/?")
CORS_HEADERS = ["Authorization", "Content-Type", "Last-Event-ID"]


def is_ingest_request(scope: Any) -> bool:
    """A POST of events, or the browser's preflight asking to send one."""
    if scope["type"] != "http" or not INGEST_PATH.fullmatch(scope["path"]):
        return False
    if scope["method"] == "OPTIONS":
        headers = dict(scope["headers"])
        return headers.get(b"access-control-request-method", b"").upper() == b"POST"
    return scope["method"] == "POST"


class JsonCorsRefusals(CORSMiddleware):
    """Starlette's CORS, with its refused preflights in the error shape of every refusal."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode()
        own = ("content-type", "content-length")  # Starlette's keys are lower case
        headers = {name: value for name, value in response.headers.items() if name not in own}
        message = f"{refused}: this origin is not listed in CORS_ORIGINS"
        return JSONResponse(error_body(400, "cors_refused", message, []), 400, headers)


# PASS_THROUGH: the middleware below hand back the next layer's coroutine instead of awaiting
# it in one of their own. An open stream holds a frame of every layer that awaits, for as long
# as it lasts: about 250 bytes each, and thousands of streams sit idle.
class IngestCors:
    """CORS: ingest answers any origin while ingest is open (no INGEST_TOKENS), as anyone
    may post then anyway and cell-monitor-extension posts from the JupyterLab page's
    origin. Everything else, and ingest behind tokens, answers only CORS_ORIGINS."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.listed = JsonCorsRefusals(
            app,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=CORS_HEADERS,
            max_age=600,
        )
        self.open = None
        if not settings.ingest_tokens:
            self.open = JsonCorsRefusals(
                app, allow_origins=["*"], allow_methods=["POST"], allow_headers=CORS_HEADERS
            )

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if self.open is not None and is_ingest_request(scope):
            return self.open(scope, receive, send)
        return self.listed(scope, receive, send)  # see PASS_THROUGH


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
]


class SecurityHeaders:
    """Adds the headers browsers need to keep student-provided text inert, to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        return self.app(scope, receive, send_with_headers)  # see PASS_THROUGH


# Application

STATIC_DIR = Path(__file__).with_name("static")
# SecurityHeaders adds the CSP (the page has no inline script or style) and friends.
PAGE_HEADERS = {"Cache-Control": "no-cache"}
HEALTH_CHECK_SECONDS = 2.0
STREAM_WATCH_SECONDS = 0.5
STARTUP_BUS_WAIT_SECONDS = 3.0


async def dashboard_page(request: Request) -> Response:
    """The instructors' live dashboard: static HTML, its script and style under /static."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


async def healthz(request: Request) -> Response:
    """200 when events can be stored and the bus answers; 503 naming what is down."""
    service = service_of(request)
    checks = {"database": service.storage.ping, "bus": service.bus.ping}
    report: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check(), timeout=HEALTH_CHECK_SECONDS)
            report[name] = "up"
        except Exception as error:
            report[name] = f"down: {error!r}"
    if report["database"] == "up" and service.committer.failure:
        report["database"] = f"down: cannot store: {service.committer.failure}"
    if report["bus"] == "up" and not service.hub.bus_connected:
        report["bus"] = "down: subscriber not connected"
    healthy = all(value == "up" for value in report.values())
    status = "ok" if healthy else "unavailable"
    body = {"status": status, **report, "clients": len(service.hub.clients)}
    return JSONResponse(body, status_code=200 if healthy else 503)


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class StartupErrors:
    """Turns a known start-up failure into its one line, instead of the traceback that
    Starlette hands uvicorn to print (30 lines of asyncpg for a missing database)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)  # see PASS_THROUGH

        async def send_one_line(message: dict) -> None:
            reason = getattr(scope["app"].state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": reason}
            await send(message)

        return self.app(scope, receive, send_one_line)


async def connect_storage(app: Starlette, settings: Settings) -> Storage:
    storage = Storage(settings.database_url, settings.database_pool_size)
    try:
        await storage.connect()
    except Exception as error:  # each driver fails in its own words
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        app.state.startup_error = (
            f"telemetry: cannot use the database at DATABASE_URL="
            f"{redact_url(settings.database_url)}: {reason}"
        )
        raise
    return storage


async def handle_api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    body = error_body(error.status, error.code, error.message, error.details)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def handle_http_error(request: Request, error: Exception) -> Response:
    status = getattr(error, "status_code", 500)
    detail = str(getattr(error, "detail", "error"))
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    headers = getattr(error, "headers", None) or {}
    return JSONResponse(error_body(status, code, detail, []), status, headers=headers)


def watch_interval(settings: Settings) -> float:
    """How often Hub.watch looks: how late a blocked write is cut off, or a ping comes."""
    return min(
        STREAM_WATCH_SECONDS, settings.send_timeout_seconds / 4, settings.sse_ping_seconds / 4
    )


async def close_streams_on_shutdown(hub: Hub) -> None:
    """WebSockets do not end by themselves on SIGTERM: close them so clients reconnect elsewhere."""
    while not AppStatus.should_exit:
        await asyncio.sleep(0.25)
    hub.close_all()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    storage = await connect_storage(app, settings)
    bus = build_bus(settings)
    hub = Hub(settings.client_queue_limit)
    hub.last_id = await storage.max_event_id()
    committer = Committer(storage, bus, settings.max_batch_events)
    app.state.service = Service(settings, storage, bus, hub, committer)
    tasks = [
        asyncio.create_task(committer.run(), name="committer"),
        asyncio.create_task(relay_bus_to_hub(bus, hub, storage), name="subscriber"),
        asyncio.create_task(close_gaps(hub, storage), name="gap-check"),
        asyncio.create_task(close_streams_on_shutdown(hub), name="shutdown-watch"),
        asyncio.create_task(hub.watch(watch_interval(settings)), name="stream-watch"),
    ]
    if settings.retention_days:
        retention = keep_retention(storage, settings.retention_days)
        tasks.append(asyncio.create_task(retention, name="retention"))
    if not (settings.ingest_tokens and settings.dashboard_tokens):
        logger.warning(
            "running open: set INGEST_TOKENS and DASHBOARD_TOKENS before exposing this service"
        )
    # Serve once live (or after a bounded wait if Redis is down: POSTs are stored meanwhile).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hub.subscribed.wait(), STARTUP_BUS_WAIT_SECONDS)
    backend = "PostgreSQL" if storage.is_postgres else "SQLite"
    logger.info("telemetry started: %s, %s bus", backend, type(bus).__name__)
    # What start-up built lives as long as the process: out of the collector's sight, a full
    # collection no longer walks it. Those walks were the slowest POSTs: single-event p99
    # 32 ms against 7 to 10 ms frozen, 10% more POSTs per second (wrk, 32 connections).
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        # Connections have drained by now (uvicorn closes them first): stop the tasks, close.
        hub.close_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.aclose()
        await storage.disconnect()


class TelemetryApp(Starlette):
    """Starlette, keeping the server's `send` in the scope for the streams (see SERVER_SEND),
    and running an SSE stream's body once the middleware and routing have returned."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            stream_body = scope.pop(STREAM_BODY, None)
        if stream_body is not None:
            await stream_body


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app; tests pass Settings for another database or bus."""
    settings = settings or Settings()
    app = TelemetryApp(
        routes=[
            Route("/", dashboard_page, methods=["GET"]),
            Route("/api/v1/events", post_events, methods=["POST"]),
            # jupyterlab-pioneer's remote_exporter appends /YYYY/MM/DD/HH to its url when the
            # exporter's id contains "s3": the same endpoint, whatever the id.
            Route(
                "/api/v1/events/{year:int}/{month:int}/{day:int}/{hour:int}",
                post_events,
                methods=["POST"],
            ),
            Route("/api/v1/events", list_events, methods=["GET"]),
            Route("/api/v1/students", list_students, methods=["GET"]),
            Route("/api/v1/events.csv", export_events, methods=["GET"]),
            Route("/api/v1/students.csv", export_students, methods=["GET"]),
            Route("/api/v1/help", list_help, methods=["GET"]),
            Route("/api/v1/help/{student_id:path}/{action}", answer_hand, methods=["POST"]),
            Route("/api/v1/cells", list_cells, methods=["GET"]),
            Route("/api/v1/activity", list_activity, methods=["GET"]),
            Route("/api/v1/stream", stream_events, methods=["GET"]),
            WebSocketRoute("/api/v1/ws", websocket_events),
            Route("/api/v1/session", create_session, methods=["POST"]),
            Route("/api/v1/session", show_session, methods=["GET"]),
            Route("/api/v1/students/{student_id:path}", erase, methods=["DELETE"]),
            Route("/api/v1/courses/{course_id:path}", erase, methods=["DELETE"]),
            Route("/healthz", healthz, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={
            ApiError: handle_api_error,
            404: handle_http_error,
            405: handle_http_error,
        },
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(IngestCors, settings=settings),
            Middleware(StartupErrors),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app


@functools.cache
def app_from_environment() -> Starlette:
    """The app as deployed: logging configured, Settings read from the environment."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # uvicorn logs a WebSocket's handshake, query string included, on its error logger.
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(QuietCutOffs())
    try:
        return create_app(load_settings(os.environ))
    except ConfigError as error:
        # One clear line, not a traceback: exits the process before uvicorn binds.
        sys.exit(f"telemetry: configuration error: {error}")


def __getattr__(name: str) -> Any:
    """`telemetry:app`, as uvicorn and the Procfile name it, built on first access: importing
    the module reads no environment, configures no logging and cannot exit."""
    if name == "app":
        return app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
