"""Access: tokens and their course scopes, the session cookie, erasure, CORS, security
headers and the access log. A check in one handler is no guarantee: every read resolves
its Grant in authorize_read and every query filters by its courses.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from telemetry.bus import encode_erasure
from telemetry.classview import CLASS_RULES
from telemetry.config import Grant, Settings
from telemetry.errors import ApiError, error_body
from telemetry.events import pseudonym
from telemetry.forgetting import erase_course, erase_student
from telemetry.pioneer import is_pioneer_envelope
from telemetry.service import Service, service_of
from telemetry.storage import Storage, read_storage

logger = logging.getLogger(__name__)


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
        deleted = await read_storage(erase_student(storage, erased["student_id"]))
        notice = {**erased, "courses": courses}
    else:
        erased = {"student_id": None, "course_id": request.path_params["course_id"]}
        deleted = await read_storage(erase_course(storage, erased["course_id"]))
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
