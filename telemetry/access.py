"""Access: tokens and their courses, the session cookie, erasure, CORS, security headers, the
access log. No read may bypass authorize_read: a check in one handler is no guarantee."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from telemetry.bus import encode_erasure
from telemetry.classview import class_rules
from telemetry.config import Grant, Settings
from telemetry.errors import ApiError, error_body
from telemetry.events import pseudonym
from telemetry.forgetting import erase_course, erase_student
from telemetry.hubauth import HUB_COOKIE, HubSignIn, hub_owner, set_private_cookie
from telemetry.pioneer import is_pioneer_envelope
from telemetry.service import Service, service_of
from telemetry.storage import Storage, read_storage

logger = logging.getLogger(__name__)
ACCESS_LOG = logging.getLogger("telemetry.access")

TOKEN_COOKIE = "telemetry_token"
OPEN_GRANT = Grant("open", "")  # who reads while DASHBOARD_TOKENS is unset: everything

# Kept out of uvicorn's logs: query tokens, and the id an erasure names (perhaps a raw id).
TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*|(?<=/api/v1/students/)[^?\s\"]+")


def matching_secret(candidate: str | None, secrets: Iterable[str]) -> int | None:
    """Which of the secrets (several allow rotation) `candidate` is, in constant time."""
    if not candidate:
        return None
    given = candidate.encode()
    found = None
    for index, secret in enumerate(secrets):  # no early return: timing must not tell which
        if hmac.compare_digest(given, secret.encode()):
            found = index
    return found


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def presented_tokens(connection: HTTPConnection) -> list[str | None]:
    # Header first; EventSource can send only the cookie or the query.
    return [
        bearer_token(connection.headers),
        connection.cookies.get(TOKEN_COOKIE),
        connection.query_params.get("token"),
    ]


def unauthorized(realm: str) -> ApiError:
    headers = {"WWW-Authenticate": f'Bearer realm="{realm}"'}
    return ApiError(401, "unauthorized", f"a valid {realm} token is required", headers=headers)


def matching_grant(grants: tuple[Grant, ...], candidates: Iterable[str | None]) -> Grant | None:
    """The grant of the first presented token that matches one of `grants`."""
    secrets = [grant.secret for grant in grants]
    for candidate in candidates:
        index = matching_secret(candidate, secrets)
        if index is not None:
            return grants[index]
    return None


def require_grant(grants: tuple[Grant, ...], candidates: Iterable[str | None], realm: str) -> Grant:
    grant = matching_grant(grants, candidates)
    if grant is None:
        raise unauthorized(realm)
    return grant


def hub_sign_in(connection: HTTPConnection) -> HubSignIn | None:
    return connection.app.state.hub_sign_in


async def dashboard_grant(connection: HTTPConnection) -> Grant:
    """A dashboard token's grant, else a JupyterHub session's (hubauth.py), else 401; open
    while neither is configured."""
    grants = service_of(connection).settings.dashboard_tokens
    sign_in = hub_sign_in(connection)
    if not grants and sign_in is None:
        return OPEN_GRANT
    grant = matching_grant(grants, presented_tokens(connection))
    if grant is not None:
        return grant
    refusal = unauthorized("dashboard")
    hub_token = connection.cookies.get(HUB_COOKIE)
    if sign_in is not None:
        try:
            if hub_token and (grant := await sign_in.grant(hub_token)):
                return grant
        except ApiError as hub_refusal:
            refusal = hub_refusal
        # The page offers "Sign in with JupyterHub" where this points.
        login = connection.scope.get("root_path", "") + "/oauth_login"
        refusal.headers["Link"] = f'<{login}>; rel="login"'
    raise refusal


def out_of_scope(grant: Grant, field_name: str, what: str) -> ApiError:
    message = f"token {grant.name!r} may not read {what}"
    problem = f"is outside this token's courses ({', '.join(grant.course_list() or [])})"
    return ApiError(403, "out_of_scope", message, [{"field": field_name, "problem": problem}])


async def check_scope(storage: Storage, grant: Grant, params: Mapping[str, Any]) -> None:
    # Named outside the grant is a 403, never an empty answer that would hide it.
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
    """One JSON line per read, stream opened or erasure, as docs/privacy.md describes."""
    method = connection.scope.get("method", "WEBSOCKET")
    route = connection.scope["route"].path_format
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
    """Every read's one gate: the token (401), the query (422), the course and student it
    names (403), the access log. The parameters come back with the grant's `courses` as
    in_scope takes them, so the SQL reads nothing outside them."""
    grant = await dashboard_grant(connection)
    params = parse(connection.query_params)
    action = "read" if connection.scope.get("method", "GET") == "GET" else "act"  # a hand action
    try:
        await check_scope(service_of(connection).storage, grant, params)
    except ApiError:
        log_access(connection, grant, action, "refused")
        raise
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
    # Against cross-site WebSocket hijacking: browsers always send Origin, others need not.
    return origin is None or origin in allowed or urlsplit(origin).netloc == host


def client_key(connection: HTTPConnection) -> str:
    # Whom to count connections against: the presented token, else the client address.
    token = next((candidate for candidate in presented_tokens(connection) if candidate), None)
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    if hub_token := connection.cookies.get(HUB_COOKIE):
        return hub_owner(hub_token)
    return "address:" + (connection.client.host if connection.client else "unknown")


def session_body(request: Request, grant: Grant) -> dict:
    settings = service_of(request).settings
    courses, rules = grant.course_list(), class_rules(settings.stalled_minutes)
    # The empty page shows the serverUrl to give the extension, with ?token= when it needs one.
    token_required = bool(settings.ingest_tokens)
    return {
        "status": "ok", "token": grant.name, "courses": courses, "rules": rules,
        "ingest_token_required": token_required,
    }  # fmt: skip


async def show_session(request: Request) -> Response:
    return JSONResponse(session_body(request, await dashboard_grant(request)))


async def create_session(request: Request) -> Response:
    """Trade a dashboard token (Authorization: Bearer) for the HttpOnly cookie that
    EventSource, which cannot send headers, presents by itself. The cookie holds the token,
    so it reads exactly what the token reads."""
    token = bearer_token(request.headers)
    grants = service_of(request).settings.dashboard_tokens
    closed = grants or hub_sign_in(request) is not None
    grant = require_grant(grants, [token], "dashboard") if closed else OPEN_GRANT
    response = JSONResponse(session_body(request, grant))
    if token:
        set_private_cookie(response, request, TOKEN_COOKIE, token, samesite="strict")
    return response


def admin_grant(request: Request) -> Grant:
    # Bearer only; with no admin token configured, erasure is never open.
    grants = service_of(request).settings.admin_tokens
    if not grants:
        message = "erasure is refused: no admin tokens configured (ADMIN_TOKENS)"
        raise ApiError(403, "no_admin_tokens", message)
    return require_grant(grants, [bearer_token(request.headers)], "admin")


async def stored_student(service: Service, given: str) -> dict[str, Any]:
    # In pseudonymous mode the admin may give the raw id or the pseudonym; the pseudonym is
    # tried last, so it is the one reported when neither is stored, never a raw id.
    salt = service.settings.pseudonymize_salt
    for student_id in (given, pseudonym(salt, given)) if salt else (given,):
        seen, course_id = await read_storage(service.storage.student_course(student_id))
        if seen:
            break
    return {"student_id": student_id, "course_id": course_id}


async def erase(request: Request) -> Response:
    """Erase a student, or a whole course, from every table in one transaction; then every
    process's open dashboards are told to drop them (Hub.announce_erasure)."""
    service = service_of(request)
    grant = admin_grant(request)
    storage = service.storage
    if "student_id" in request.path_params:
        erased = await stored_student(service, request.path_params["student_id"])
        courses = await read_storage(storage.student_courses(erased["student_id"]))
        deleted = await read_storage(erase_student(storage, erased["student_id"]))
        notice = {**erased, "courses": courses}
    else:
        erased = notice = {"student_id": None, "course_id": request.path_params["course_id"]}
        deleted = await read_storage(erase_course(storage, erased["course_id"]))
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


def is_ingest_request(scope: Scope) -> bool:
    """A POST of events, or the browser's preflight asking to send one."""
    if scope["type"] != "http":
        return False
    if not INGEST_PATH.fullmatch(scope["path"].removeprefix(scope.get("root_path", ""))):
        return False
    if scope["method"] == "OPTIONS":
        headers = dict(scope["headers"])
        return headers.get(b"access-control-request-method", b"").upper() == b"POST"
    return scope["method"] == "POST"


class JsonCorsRefusals(CORSMiddleware):
    """Starlette's CORS, its refused preflights in the error shape of every refusal."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        own = ("content-type", "content-length")  # Starlette's keys are lower case
        headers = {name: value for name, value in response.headers.items() if name not in own}
        message = f"{bytes(response.body).decode()}: this origin is not listed in CORS_ORIGINS"
        return JSONResponse(error_body(400, "cors_refused", message, []), 400, headers)


# These middleware return the next layer's coroutine, not await it: an idle stream then holds
# no frame of theirs (docs/performance.md).
class IngestCors:
    """Ingest answers any origin while it is open (no INGEST_TOKENS): anyone may post then
    anyway, and cell-monitor-extension posts from the JupyterLab page's origin. Everything
    else, and ingest behind tokens, answers only CORS_ORIGINS."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        cors = functools.partial(JsonCorsRefusals, app, allow_headers=CORS_HEADERS)
        origins = list(settings.cors_origins)
        self.listed = cors(allow_origins=origins, allow_methods=["GET", "POST"], max_age=600)
        self.open = None
        if not settings.ingest_tokens:
            self.open = cors(allow_origins=["*"], allow_methods=["POST"])

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if self.open is not None and is_ingest_request(scope):
            return self.open(scope, receive, send)
        return self.listed(scope, receive, send)


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
]


class SecurityHeaders:
    """Adds the headers that keep student-provided text inert to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        return self.app(scope, receive, send_with_headers)
