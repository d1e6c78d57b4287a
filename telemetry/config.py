"""Configuration: Settings, one table of the environment variables with their readers and
defaults. A bad value fails start-up with one line naming the variable; nothing here touches
the network.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class ConfigError(Exception):
    """A configuration variable has a value the service cannot use."""


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


def whole_number(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} must be at least 1")
    return value


def seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def comma_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def variable_names(name: str, raw: str) -> frozenset[str]:
    names = frozenset(comma_list(name, raw))
    for item in sorted(names):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            raise ConfigError(f"{name} holds {item!r}, which is not an environment variable name")
    return names


def variable_name(name: str, raw: str) -> str | None:
    names = variable_names(name, raw)
    if len(names) > 1:
        raise ConfigError(f"{name} must name one variable, not {len(names)}")
    return next(iter(names), None)


# Token entries are `[name=]secret[:course+course...]`. Names and courses are plain words, so
# an entry reads one way only; a secret may hold `=` (base64 padding) once the entry is named.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKEN_COURSE = re.compile(r"[A-Za-z0-9_.@-]{1,256}")
TOKEN_SECRET = re.compile(r"[^\s,:]+")


def token_fingerprint(secret: str) -> str:
    """The name of an unnamed token: recognisable in the access log, useless to an attacker."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def parse_token(name: str, entry: str, scoped: bool) -> Grant:
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
    scope_set = None if courses is None else frozenset(courses)
    return Grant(label or token_fingerprint(secret), secret, scope_set)


def parse_tokens(name: str, raw: str, scoped: bool = True) -> tuple[Grant, ...]:
    """Comma-separated token entries, each secret and each name once; errors never show a secret."""
    grants = tuple(parse_token(name, entry, scoped) for entry in comma_list(name, raw))
    if len({grant.secret for grant in grants}) < len(grants):
        raise ConfigError(f"{name} lists a secret twice: each token must be unique")
    for repeated, count in Counter(grant.name for grant in grants).items():
        if count > 1:
            raise ConfigError(f"{name} names two tokens {repeated!r}: names must be unique")
    return grants


def ingest_grants(name: str, raw: str) -> tuple[Grant, ...]:
    """Ingest tokens: a course on one is the course of the events posted with it."""
    grants = parse_tokens(name, raw)
    for grant in grants:
        if grant.courses is not None and len(grant.courses) > 1:
            raise ConfigError(f"{name} gives {grant.name!r} several courses: at most one")
    return grants


def retention_days(name: str, raw: str) -> int:
    days = whole_number(name, raw)
    # Much further back and `now - RETENTION_DAYS` leaves the calendar, stopping retention.
    if days > 36_500:
        raise ConfigError(f"{name}={raw!r} must be at most 36500 (a century)")
    return days


def secret_salt(name: str, raw: str) -> str:
    # A salt anyone could guess lets them hash a class list and match it.
    if len(raw) < 16:
        raise ConfigError(f"{name} must be at least 16 characters, e.g. `openssl rand -hex 32`")
    return raw


def path_prefix(name: str, raw: str) -> str | None:
    """JUPYTERHUB_SERVICE_PREFIX as `/services/telemetry`: no trailing slash; `/` is none."""
    if not raw.startswith("/") or "//" in raw or any(c in raw for c in "?#\\ "):
        raise ConfigError(f"{name}={raw!r} must be a URL path such as /services/telemetry/")
    return raw.rstrip("/") or None


def http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={raw!r} must be an http:// or https:// URL")
    return raw.rstrip("/")


def group_prefix(name: str, raw: str) -> str:
    if not TOKEN_COURSE.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r} must be letters, digits, '_', '.', '@' or '-'")
    return raw


def normalise_database_url(raw: str) -> str:
    """DATABASE_URL as `databases` understands it."""
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        # `databases` reads `ssl` and silently drops libpq's `sslmode`: Heroku requires TLS.
        pairs = parse_qsl(parts.query)
        query = [("ssl" if key == "sslmode" else key, value) for key, value in pairs]
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError("DATABASE_URL must name a host and a database")
        return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return "sqlite:" + raw.split(":", 1)[1]  # urlunsplit would drop the empty host
    raise ConfigError(
        f"DATABASE_URL has scheme {parts.scheme!r}; expected postgres://, postgresql:// or sqlite://"
    )


def normalise_redis_url(raw: str) -> str:
    """REDIS_URL, checked; rediss:// skips certificate checks unless the URL says otherwise."""
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"REDIS_URL has scheme {parts.scheme!r}; expected redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError("REDIS_URL must name a host")
    query = dict(parse_qsl(parts.query))
    if parts.scheme == "rediss":  # Heroku Redis presents a self-signed certificate
        query.setdefault("ssl_cert_reqs", "none")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def variable(default: Any, read: Callable[[str, str], Any]) -> Any:
    """A Settings field: `read(name, value)` gets the variable's value stripped and never
    empty, and returns None when it finds nothing in it, which keeps the default."""
    return field(default=default, metadata={"read": read})


@dataclass(frozen=True)
class Settings:
    """The environment variables: each field is read from the variable of its name in upper
    case (database_url from DATABASE_URL) by its reader; unset or empty keeps the default."""

    database_url: str = variable(
        "sqlite:///telemetry.db", lambda _, raw: normalise_database_url(raw)
    )
    database_pool_size: int = variable(5, whole_number)
    redis_url: str | None = variable(None, lambda _, raw: normalise_redis_url(raw))
    notification_channel: str = variable("telemetry:events", lambda _, raw: raw)
    max_body_bytes: int = variable(1_048_576, whole_number)
    max_batch_events: int = variable(500, whole_number)
    max_outputs_bytes: int = variable(65_536, whole_number)
    stalled_minutes: int = variable(10, whole_number)  # see classview.stalled_since
    replay_limit: int = variable(5_000, whole_number)
    client_queue_limit: int = variable(2_000, whole_number)
    sse_retry_ms: int = variable(2_000, whole_number)
    sse_ping_seconds: float = variable(15.0, seconds)
    send_timeout_seconds: float = variable(10.0, seconds)
    ingest_tokens: tuple[Grant, ...] = variable((), ingest_grants)
    dashboard_tokens: tuple[Grant, ...] = variable((), parse_tokens)
    admin_tokens: tuple[Grant, ...] = variable((), lambda n, v: parse_tokens(n, v, scoped=False))
    cors_origins: tuple[str, ...] = variable((), comma_list)
    max_streams_per_client: int = variable(20, whole_number)
    pioneer_student_env: str = variable("JUPYTERHUB_USER", variable_name)
    pioneer_environ_allow: frozenset[str] = variable(frozenset(), variable_names)
    retention_days: int | None = variable(None, retention_days)
    pseudonymize_salt: str | None = variable(None, secret_salt)
    web_concurrency: int = variable(1, whole_number)  # uvicorn's workers
    # Running as a JupyterHub service: the hub sets these (docs/deploy.md#jupyterhub).
    jupyterhub_service_prefix: str | None = variable(None, path_prefix)
    jupyterhub_api_url: str | None = variable(None, http_url)
    jupyterhub_api_token: str | None = variable(None, lambda _, raw: raw)
    jupyterhub_client_id: str | None = variable(None, lambda _, raw: raw)
    jupyterhub_oauth_callback_url: str | None = variable(None, lambda _, raw: raw)
    jupyterhub_base_url: str = variable("/", lambda n, raw: (path_prefix(n, raw) or "") + "/")
    jupyterhub_host: str = variable("", http_url)
    hub_course_group_prefix: str = variable("telemetry-", group_prefix)
    hub_check_seconds: float = variable(60.0, seconds)

    @property
    def hub_sign_in(self) -> bool:
        """Instructors may sign in with the hub: dashboards are then never open."""
        return self.jupyterhub_api_url is not None


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Settings from the environment; ConfigError naming the first bad variable."""
    values = {}
    for setting in fields(Settings):
        name = setting.name.upper()
        raw = environ.get(name, "").strip()
        value = setting.metadata["read"](name, raw) if raw else None
        values[setting.name] = setting.default if value is None else value
    settings = Settings(**values)
    stores_raw_id = settings.pioneer_student_env in settings.pioneer_environ_allow
    if settings.pseudonymize_salt and stores_raw_id:
        raise ConfigError(
            "PIONEER_ENVIRON_ALLOW would store PIONEER_STUDENT_ENV, the student's raw id, "
            "which PSEUDONYMIZE_SALT is set to keep out"
        )
    if settings.redis_url is None and settings.web_concurrency > 1:
        raise ConfigError(
            "WEB_CONCURRENCY > 1 needs REDIS_URL: the in-process bus cannot reach other workers"
        )
    if settings.hub_sign_in and not settings.jupyterhub_api_token:
        raise ConfigError("JUPYTERHUB_API_URL is set without JUPYTERHUB_API_TOKEN, its secret")
    if settings.hub_sign_in and not settings.jupyterhub_service_prefix:
        raise ConfigError(
            "JUPYTERHUB_API_URL is set without JUPYTERHUB_SERVICE_PREFIX: the hub sign-in "
            "runs under the service's prefix, such as /services/telemetry/"
        )
    return settings
