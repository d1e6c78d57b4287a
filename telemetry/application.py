"""The application: routes, middleware, the lifespan that starts the committer, the
subscriber and retention, and create_app() for tests and uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
from collections.abc import (
    AsyncIterator,
    Awaitable,
)
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sse_starlette.sse import AppStatus  # importing it makes uvicorn's SIGTERM set should_exit
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from telemetry.access import (
    IngestCors,
    RedactTokens,
    SecurityHeaders,
    create_session,
    erase,
    show_session,
)
from telemetry.bus import build_bus
from telemetry.config import ConfigError, Settings, load_settings
from telemetry.errors import ApiError, error_body
from telemetry.forgetting import keep_retention
from telemetry.hub import Hub, close_gaps, relay_bus_to_hub
from telemetry.ingest import Committer, post_events
from telemetry.readapi import (
    answer_hand,
    export_events,
    export_students,
    list_activity,
    list_cells,
    list_events,
    list_help,
    list_students,
)
from telemetry.service import Service, service_of
from telemetry.storage import Storage
from telemetry.streams import (
    SERVER_SEND,
    STREAM_BODY,
    QuietCutOffs,
    stream_events,
    websocket_events,
)

logger = logging.getLogger(__name__)


STATIC_DIR = Path(__file__).parent.parent / "static"


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
