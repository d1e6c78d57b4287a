"""The application: routes, middleware, and the lifespan that starts and stops the background
tasks. create_app() builds it for tests, app_from_environment() for uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sse_starlette.sse import AppStatus  # importing it makes uvicorn's SIGTERM set should_exit
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from telemetry import access, hubauth, readapi, streams
from telemetry.bus import build_bus
from telemetry.config import ConfigError, Settings, load_settings
from telemetry.errors import ApiError, error_body
from telemetry.forgetting import keep_retention
from telemetry.hub import Hub, close_gaps, relay_bus_to_hub
from telemetry.ingest import Committer, post_events
from telemetry.service import Service, service_of
from telemetry.storage import Storage

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent.parent / "static"
HEALTH_CHECK_SECONDS = 2.0
STREAM_WATCH_SECONDS = 0.5
STARTUP_BUS_WAIT_SECONDS = 3.0
# jupyterlab-pioneer's remote_exporter appends /YYYY/MM/DD/HH to its url when the exporter's
# id contains "s3": the same endpoint, whatever the id.
PIONEER_DATED_PATH = "/api/v1/events/{year:int}/{month:int}/{day:int}/{hour:int}"


async def dashboard_page(request: Request) -> Response:
    """The instructors' live dashboard: static HTML, its script and style under /static."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: Request) -> Response:
    """200 when events can be stored and the bus answers; 503 naming what is down."""
    service = service_of(request)
    report: dict[str, str] = {}
    for name, check in {"database": service.storage.ping, "bus": service.bus.ping}.items():
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
    body = {"status": "ok" if healthy else "unavailable", **report}
    body["clients"] = len(service.hub.clients)
    return JSONResponse(body, status_code=200 if healthy else 503)


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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
    assert isinstance(error, HTTPException)  # registered for 404 and 405 only
    code = "not_found" if error.status_code == 404 else "method_not_allowed"
    body = error_body(error.status_code, code, error.detail, [])
    return JSONResponse(body, error.status_code, headers=error.headers)


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
    # How late a blocked write is cut off, or a ping comes, at the most.
    watch = min(
        STREAM_WATCH_SECONDS, settings.send_timeout_seconds / 4, settings.sse_ping_seconds / 4
    )
    tasks = [
        asyncio.create_task(committer.run(), name="committer"),
        asyncio.create_task(relay_bus_to_hub(bus, hub, storage), name="subscriber"),
        asyncio.create_task(close_gaps(hub, storage), name="gap-check"),
        asyncio.create_task(close_streams_on_shutdown(hub), name="shutdown-watch"),
        asyncio.create_task(hub.watch(watch), name="stream-watch"),
    ]
    if settings.retention_days:
        retention = keep_retention(storage, settings.retention_days)
        tasks.append(asyncio.create_task(retention, name="retention"))
    if app.state.hub_sign_in is not None:
        lapsed = app.state.hub_sign_in.end_lapsed_streams(hub)
        tasks.append(asyncio.create_task(lapsed, name="hub-sessions"))
    if not (settings.ingest_tokens and (settings.dashboard_tokens or settings.hub_sign_in)):
        logger.warning(
            "running open: set INGEST_TOKENS and DASHBOARD_TOKENS before exposing this service"
        )
    # Serve once live (or after a bounded wait if Redis is down: POSTs are stored meanwhile).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hub.subscribed.wait(), STARTUP_BUS_WAIT_SECONDS)
    backend = "PostgreSQL" if storage.is_postgres else "SQLite"
    logger.info("telemetry started: %s, %s bus", backend, type(bus).__name__)
    # What start-up built lives as long as the process: frozen, full collections no longer walk
    # it (the slowest POSTs waited for them: docs/performance.md).
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
    """Starlette, and what only the outermost layer can do: keep the server's `send` for the
    streams (streams.SERVER_SEND), run an SSE stream's body once the middleware and routing
    have returned, and print a known start-up failure as one line, not a traceback."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            send = functools.partial(self.one_line, send)
        scope[streams.SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            stream_body = scope.pop(streams.STREAM_BODY, None)
        if stream_body is not None:
            await stream_body

    async def one_line(self, send: Send, message: Message) -> None:
        reason = getattr(self.state, "startup_error", None)
        if message["type"] == "lifespan.startup.failed" and reason:
            message = {**message, "message": reason}
        await send(message)


def create_app(settings: Settings) -> Starlette:
    """The ASGI app; tests pass Settings for another database or bus."""
    handlers = {ApiError: handle_api_error, 404: handle_http_error, 405: handle_http_error}
    app = TelemetryApp(
        routes=[
            Route("/", dashboard_page, methods=["GET"]),
            Route("/api/v1/events", post_events, methods=["POST"]),
            Route(PIONEER_DATED_PATH, post_events, methods=["POST"]),
            Route("/api/v1/events", readapi.list_events, methods=["GET"]),
            Route("/api/v1/students", readapi.list_students, methods=["GET"]),
            Route("/api/v1/events.csv", readapi.export_events, methods=["GET"]),
            Route("/api/v1/students.csv", readapi.export_students, methods=["GET"]),
            Route("/api/v1/help", readapi.list_help, methods=["GET"]),
            Route("/api/v1/help/stats", readapi.show_help_stats, methods=["GET"]),
            Route("/api/v1/help/stats.csv", readapi.export_help_stats, methods=["GET"]),
            Route("/api/v1/help/{student_id:path}/{action}", readapi.answer_hand, methods=["POST"]),
            Route("/api/v1/cells", readapi.list_cells, methods=["GET"]),
            Route("/api/v1/activity", readapi.list_activity, methods=["GET"]),
            Route("/api/v1/progress", readapi.show_progress, methods=["GET"]),
            Route("/api/v1/cells/detail", readapi.show_cell_detail, methods=["GET"]),
            Route("/api/v1/stream", streams.stream_events, methods=["GET"]),
            WebSocketRoute("/api/v1/ws", streams.websocket_events),
            Route("/api/v1/session", access.create_session, methods=["POST"]),
            Route("/api/v1/session", access.show_session, methods=["GET"]),
            Route("/api/v1/students/{student_id:path}", access.erase, methods=["DELETE"]),
            Route("/api/v1/courses/{course_id:path}", access.erase, methods=["DELETE"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", readapi.show_metrics, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            *(hubauth.ROUTES if settings.hub_sign_in else []),
        ],
        exception_handlers=handlers,
        middleware=[
            Middleware(access.SecurityHeaders),
            *under_prefix(settings.jupyterhub_service_prefix),
            Middleware(access.IngestCors, settings),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.hub_sign_in = hubauth.HubSignIn(settings) if settings.hub_sign_in else None
    return app


def under_prefix(prefix: str | None) -> list[Middleware]:
    return [Middleware(hubauth.UnderPrefix, prefix)] if prefix else []


@functools.cache
def app_from_environment() -> Starlette:
    """The app as deployed: logging configured, Settings read from the environment."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # At DEBUG these log every query with its arguments: students' ids and code.
    for name in ("databases", "aiosqlite", "asyncpg"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    # uvicorn logs a WebSocket's handshake, query string included, on its error logger.
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(access.RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(streams.QuietCutOffs())
    try:
        return create_app(load_settings(os.environ))
    except ConfigError as error:
        # One clear line, not a traceback: exits the process before uvicorn binds.
        sys.exit(f"telemetry: configuration error: {error}")
