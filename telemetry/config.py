"""Configuration: the environment, read once into Settings; a bad value fails start-up
with one line naming the variable. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import (
    Callable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

logger = logging.getLogger(__name__)


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
