"""Running as a JupyterHub service: the service's prefix (UnderPrefix), and instructors signing
in with the hub's OAuth2 (HubSignIn), against the endpoints the hub documents for services.
A hub session becomes a Grant like a token's, so access.py's scope checks, the streams'
filters and the access log apply unchanged. Nothing here reads or writes events.

Decisions not to undo:
- The session cookie holds the user's hub token, as the token cookie holds a dashboard
  token: any worker can check it with the hub, and the hub's revocation ends it.
- A grant is asked of the hub again once HUB_CHECK_SECONDS old, and the streams of a session
  whose grant changed are ended then (end_lapsed_streams): they reconnect under the new one.
- After sign-in the browser goes to the dashboard under the prefix, never to a URL it gave.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from telemetry.config import Grant, Settings
from telemetry.errors import ApiError
from telemetry.hub import CLOSED, Hub

logger = logging.getLogger(__name__)

HUB_COOKIE = "telemetry_hub"
STATE_COOKIE = "telemetry_oauth_state"
STATE_SECONDS = 600  # HubOAuth's own oauth_state_max_age
HUB_TIMEOUT_SECONDS = 10.0


class UnderPrefix:
    """Serves the app under JUPYTERHUB_SERVICE_PREFIX. The hub's proxy passes the whole path
    through: the prefix becomes the scope's root_path, which Starlette's routing strips, so
    the routes stay as they are. The bare prefix redirects to the page with its slash, which
    the page's relative URLs need. Paths outside the prefix are served as before."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] in ("http", "websocket"):
            if scope["path"] == self.prefix and scope["type"] == "http":
                return RedirectResponse(self.prefix + "/", 308)(scope, receive, send)
            if scope["path"].startswith(self.prefix + "/"):
                # In place: TelemetryApp finds a stream's body in this very scope.
                scope["root_path"] = self.prefix
        return self.app(scope, receive, send)


def cookie_path(connection: HTTPConnection) -> str:
    # Under a hub, `/` would send the cookie to every user's notebook server on its origin.
    return connection.scope.get("root_path", "") + "/"


def set_private_cookie(
    response: Response, connection: HTTPConnection, name: str, value: str, **options: Any
) -> None:
    secure = connection.url.scheme == "https"
    path = cookie_path(connection)
    response.set_cookie(name, value, path=path, httponly=True, secure=secure, **options)


def hub_owner(token: str) -> str:
    """Whom a hub session's streams are counted against, and the key of its checks."""
    return "hub:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def course_grant(user: Mapping[str, Any], group_prefix: str) -> Grant:
    """The rule: hub admins read every course; members of `<prefix><course>` read that
    course; anyone else nothing (403)."""
    name = f"hub:{user['name']}"
    if user.get("admin"):
        return Grant(name, "", None)
    groups = [group for group in user.get("groups") or [] if group.startswith(group_prefix)]
    courses = {group.removeprefix(group_prefix) for group in groups} - {""}
    if not courses:
        message = f"hub user {user['name']!r} is in no {group_prefix}<course> group"
        raise ApiError(403, "no_course", message)
    return Grant(name, "", frozenset(courses))


def hub_unavailable(error: Exception) -> ApiError:
    # 503: the hub may be restarting; reads are refused meanwhile, never let through.
    message = f"the hub could not be asked who is signed in: {error!r}"
    return ApiError(503, "hub_unavailable", message, headers={"Retry-After": "5"})


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(slots=True)
class Check:
    """The hub's latest answer about one session: its grant, why it is refused, or None
    once the hub no longer knows its token."""

    token: str
    outcome: Grant | ApiError | None
    at: float


class HubSignIn:
    """The OAuth2 client the hub registered for this service, and the sessions it opened."""

    def __init__(self, settings: Settings) -> None:
        prefix = settings.jupyterhub_service_prefix or ""
        self.api_url = settings.jupyterhub_api_url
        self.secret = settings.jupyterhub_api_token or ""
        self.client_id = settings.jupyterhub_client_id or "service-" + prefix.rsplit("/", 1)[-1]
        self.callback_url = settings.jupyterhub_oauth_callback_url or f"{prefix}/oauth_callback"
        hub_root = settings.jupyterhub_host + settings.jupyterhub_base_url
        self.authorize_url = hub_root + "hub/api/oauth2/authorize"
        self.group_prefix = settings.hub_course_group_prefix
        self.check_seconds = settings.hub_check_seconds
        self.checks: dict[str, Check] = {}

    async def call_hub(self, method: str, path: str, **request: Any) -> httpx.Response:
        try:
            async with httpx.AsyncClient(timeout=HUB_TIMEOUT_SECONDS) as client:
                response = await client.request(method, f"{self.api_url}/{path}", **request)
        except httpx.HTTPError as error:
            raise hub_unavailable(error) from error
        if response.status_code >= 500:
            raise hub_unavailable(RuntimeError(f"{path} answered {response.status_code}"))
        return response

    async def redeem(self, code: str, verifier: str) -> str:
        """The user's token for the code the hub sent back (RFC 6749 4.1.3, RFC 7636)."""
        form = {
            "client_id": self.client_id,
            "client_secret": self.secret,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.callback_url,
            "code_verifier": verifier,
        }
        response = await self.call_hub("POST", "oauth2/token", data=form)
        if response.status_code != 200:
            message = f"the hub refused the sign-in code ({response.status_code})"
            raise ApiError(400, "oauth_failed", message)
        return response.json()["access_token"]

    async def check(self, token: str) -> Check:
        """Ask the hub who the token's user is now (name, admin, groups): any token it issued
        for this service may read that much (the hub's identify scopes)."""
        response = await self.call_hub("GET", "user", headers={"Authorization": f"token {token}"})
        outcome: Grant | ApiError | None = None  # revoked, expired, or never issued
        if response.status_code == 200:
            try:
                outcome = course_grant(response.json(), self.group_prefix)
            except ApiError as refusal:
                outcome = refusal
        self.checks[hub_owner(token)] = check = Check(token, outcome, time.monotonic())
        return check

    async def grant(self, token: str) -> Grant | None:
        """The session's grant, asked of the hub again once HUB_CHECK_SECONDS old; None once
        the session has ended."""
        check = self.checks.get(hub_owner(token))
        if check is None or time.monotonic() - check.at >= self.check_seconds:
            check = await self.check(token)
        if isinstance(refusal := check.outcome, ApiError):  # a fresh one: a traceback each
            raise ApiError(refusal.status, refusal.code, refusal.message, refusal.details)
        return check.outcome

    async def end_lapsed_streams(self, hub: Hub) -> None:
        """Every HUB_CHECK_SECONDS, the sessions with a stream open are asked of the hub
        again, and the others' old answers forgotten. While the hub does not answer, the
        streams go on (and new requests get 503)."""
        while True:
            await asyncio.sleep(self.check_seconds)
            streaming = {client.owner for client in hub.clients}
            now = time.monotonic()
            for owner, check in list(self.checks.items()):
                if owner in streaming:
                    with contextlib.suppress(ApiError):
                        end_lapsed(hub, owner, await self.check(check.token))
                elif now - check.at >= self.check_seconds:
                    del self.checks[owner]


def end_lapsed(hub: Hub, owner: str, check: Check) -> None:
    """Ends the session's streams that its grant no longer admits as they are: revoked,
    out of every course group, or now of other courses. They reconnect under the new one."""
    grant = check.outcome
    lapsed = [
        client
        for client in hub.clients
        if client.owner == owner
        and not (isinstance(grant, Grant) and grant.courses == client.filter.courses)
    ]
    if lapsed:
        logger.info("a hub session changed (%s): %d stream(s) end", owner, len(lapsed))
    for client in lapsed:
        client.end(CLOSED)


def sign_in_of(request: Request) -> HubSignIn:
    return request.app.state.hub_sign_in


async def start_sign_in(request: Request) -> Response:
    """To the hub's authorize endpoint, with a fresh state and PKCE verifier kept in a
    short-lived cookie for the callback."""
    sign_in = sign_in_of(request)
    state, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    query = {
        "client_id": sign_in.client_id,
        "redirect_uri": sign_in.callback_url,
        "response_type": "code",
        "state": state,
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
    }
    response = RedirectResponse(f"{sign_in.authorize_url}?{urlencode(query)}", 303)
    # Lax, not Strict: a hub on another host (JUPYTERHUB_HOST) redirects back cross-site.
    value = f"{state}.{verifier}"
    set_private_cookie(
        response, request, STATE_COOKIE, value, max_age=STATE_SECONDS, samesite="lax"
    )
    return response


async def finish_sign_in(request: Request) -> Response:
    """The hub's redirect back: the state checked, the code redeemed, the user's courses
    read; then the session cookie, and the dashboard."""
    sign_in = sign_in_of(request)
    state, _, verifier = request.cookies.get(STATE_COOKIE, "").partition(".")
    given = request.query_params.get("state", "")
    if not state or not hmac.compare_digest(state.encode(), given.encode()):
        raise ApiError(400, "oauth_state_mismatch", "this sign-in was not started here")
    code = request.query_params.get("code")
    if not code:
        reason = request.query_params.get("error", "no code")
        raise ApiError(403, "oauth_refused", f"the hub did not sign you in: {reason}")
    token = await sign_in.redeem(code, verifier)
    if await sign_in.grant(token) is None:  # a user of no course: 403, and no cookie
        raise ApiError(400, "oauth_failed", "the hub does not know the token it just issued")
    response = RedirectResponse(cookie_path(request), 303)
    response.delete_cookie(STATE_COOKIE, path=cookie_path(request))
    set_private_cookie(response, request, HUB_COOKIE, token, samesite="strict")
    return response


ROUTES = [
    Route("/oauth_login", start_sign_in, methods=["GET"]),
    Route("/oauth_callback", finish_sign_in, methods=["GET"]),
]
