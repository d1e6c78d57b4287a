"""The SSE and WebSocket endpoints: a stream replays what a dashboard missed from the database,
then goes live from the hub without a gap or a duplicate (Client.unsent). It never blocks the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import ClassVar

from sse_starlette.sse import AppStatus  # importing it makes uvicorn's SIGTERM set should_exit
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from telemetry import metrics
from telemetry.access import authorize_read, client_key, origin_allowed
from telemetry.errors import ApiError, StorageUnavailable
from telemetry.events import INT64_MAX
from telemetry.hub import CLOSED, FAILED, OVERFLOWED, TIMED_OUT, Client, Frame, StreamFilter
from telemetry.readapi import STREAM_FILTERS, parse_stream_query
from telemetry.service import Service, service_of
from telemetry.storage import Storage

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx and similar proxies would buffer the stream
]
FINAL_WRITE_SECONDS = 1.0
REPLAY_PAGE_EVENTS = 50


def parse_last_event_id(value: str | None) -> int | None:
    """Last-Event-ID / last_event_id: a non-negative integer, or None when absent or garbage."""
    if value is None or not value.strip().isdigit():
        return None
    number = int(value.strip())
    return number if number <= INT64_MAX else None


@dataclass(frozen=True, slots=True)
class Opening:
    """How a stream starts: a resync notice, or a replay after an id, or neither."""

    notice: Frame | None = None
    replay_after: int | None = None


async def open_stream(service: Service, client: Client, after_id: int | None) -> Opening:
    """A resync notice when more than REPLAY_LIMIT events were missed after `after_id` (the
    client reloads from the read API instead), else the replay after it."""
    client.last_sent = after_id or 0
    if after_id is None:
        return Opening()
    limit = service.settings.replay_limit
    try:
        missed = await service.storage.count_events_after(after_id, limit + 1)
    except Exception as error:
        raise StorageUnavailable(f"cannot replay right now: {error!r}") from error
    if missed <= limit:
        return Opening(replay_after=after_id)
    notice = {
        "type": "resync",
        "reason": "too_far_behind",
        "message": f"more than {limit} events were missed; reload state from the read API",
        "latest_id": service.hub.last_id,
    }
    return Opening(notice=Frame.of_notice(notice, after_id))


async def replay(storage: Storage, client: Client, transport: Transport, after_id: int) -> None:
    """Send what the client missed, a page at a time: a stream far behind holds one page, and
    a stream caught up holds none. Subscribed first, the live frames queued meanwhile repeat
    at most what a page sent (Client.unsent)."""
    while True:
        try:
            documents = await storage.events_after(after_id, REPLAY_PAGE_EVENTS)
        except Exception as error:
            raise StorageUnavailable(f"cannot replay right now: {error!r}") from error
        last_page = len(documents) < REPLAY_PAGE_EVENTS
        after_id = documents[-1]["id"] if documents else after_id
        frames = [Frame.of(document) for document in documents if client.filter.matches(document)]
        del documents  # while the write waits on a slow client, hold only what it sends
        if frames:
            client.last_sent = frames[-1].id
            messages = transport.messages(frames)
            del frames
            await client.write(messages)
        if last_page:
            return


async def write_stream(
    client: Client, transport: Transport, opening: Opening, storage: Storage, deadline: float
) -> str:
    """The client's one writer: its opening, then live frames, each id once and in id order,
    whatever is queued in one write, each write within `deadline` seconds (Hub.watch).
    Returns why it stopped; a cut-off (Client.end) cancels it wherever it waits, and a replay
    that cannot be read raises StorageUnavailable."""
    client.writer = asyncio.current_task()
    client.deadline, client.ping_seconds = deadline, transport.ping_seconds
    client.transport = transport  # the hub writes for the writer only while it waits, not yet
    try:
        if opening.notice is not None:
            await client.write(transport.messages([opening.notice]))
        elif opening.replay_after is not None:
            await replay(storage, client, transport, opening.replay_after)
        frames: list[Frame] = []
        while client.ended is None:
            if client.started_write is not None:  # by the hub, before these frames
                started, client.started_write = client.started_write, None
                await started
            if frames := client.unsent(frames):
                client.last_sent = max(client.last_sent, frames[-1].id)
                await client.write(transport.messages(frames))
            elif client.ping_due:
                client.ping_due = False
                await client.write([transport.ping])
            frames = await client.next_frames()
    except asyncio.CancelledError:
        if client.ended in (OVERFLOWED, TIMED_OUT) and asyncio.current_task().uncancel() == 0:
            if client.ended == OVERFLOWED:
                logger.warning("slow dashboard cut off after %d queued events", client.limit)
            else:
                logger.info("dashboard dropped: a write blocked for %s s", deadline)
            return client.ended
        raise
    except StorageUnavailable:
        raise
    except Exception as error:  # reset, closed or refused: the connection is gone
        logger.info("dashboard dropped: %r", error)
        client.end(FAILED)
    finally:
        client.writer = None
        client.writing = False
    return client.ended or CLOSED


def sse_body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


@dataclass(slots=True)
class SseTransport:
    send: Send
    ping_seconds: float | None
    ping: ClassVar[Message] = sse_body(b": ping\n\n")  # a comment: proxies cut silent streams

    @staticmethod
    def messages(frames: list[Frame]) -> list[Message]:
        if len(frames) == 1:
            return [frames[0].sse_message]
        return [sse_body(b"".join([frame.sse for frame in frames]))]


@dataclass(slots=True)
class WebSocketTransport:
    send: Send
    ping_seconds: float | None = None  # uvicorn pings WebSockets at the protocol level
    ping: ClassVar[Message | None] = None

    @staticmethod
    def messages(frames: list[Frame]) -> list[Message]:
        return [frame.ws_message for frame in frames]


Transport = SseTransport | WebSocketTransport

# The server's own `send`, left in the scope by TelemetryApp: streams write past the
# middleware's per-message wrappers, which act on the response start only.
SERVER_SEND = "telemetry.server_send"
# An SSE stream's body, left in the scope for TelemetryApp to run once Starlette's layers have
# returned: an idle stream then holds none of their coroutine frames.
STREAM_BODY = "telemetry.stream_body"
# A stream cut off on purpose ends unfinished and aborted (see abort): uvicorn logs that as an
# error, which QuietCutOffs drops.
CUT_OFF = contextvars.ContextVar("cut_off", default=False)
UNFINISHED_RESPONSE = "ASGI callable returned without completing response."


def server_send(scope: Scope, send: Send) -> Send:
    return scope.get(SERVER_SEND, send)


def abort(send: Send) -> None:
    """Drop a stream's connection now. ASGI has no abort, and uvicorn's close waits for the
    write buffer to drain, which a client that stopped reading never lets happen: its socket,
    descriptor and buffers would stay until the client closed. `send` is the server's own."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()


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
        """The stream, run by TelemetryApp: `start` (the middleware's `send`) sends the response
        start with their headers, the server's `send` everything after."""
        settings = self.service.settings
        # Subscribed before the first await, as admit() counted: the stream limit holds.
        with (
            self.service.hub.subscribe(self.stream_filter, self.owner) as client,
            metrics.SSE_DASHBOARDS.track_inprogress(),
        ):
            await start({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            del start  # let the middleware's wrappers go
            transport = SseTransport(send, settings.sse_ping_seconds)
            # No deadline needed: a new connection's first bytes fit in any socket buffer.
            await send(sse_body(b"retry: %d\n\n" % settings.sse_retry_ms))
            watcher = asyncio.create_task(end_when_gone(receive, client))
            try:
                opening = await open_stream(self.service, client, self.after_id)
                ended = await write_stream(
                    client, transport, opening, self.service.storage, settings.send_timeout_seconds
                )
            except StorageUnavailable as error:
                # Ending the stream makes EventSource reconnect after the retry hint.
                logger.warning("SSE replay failed: %s", error)
                ended = CLOSED
            finally:
                watcher.cancel()
        if ended in (OVERFLOWED, TIMED_OUT):
            CUT_OFF.set(True)
            abort(send)
            return
        try:
            async with asyncio.timeout(FINAL_WRITE_SECONDS):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            abort(send)


async def end_when_gone(receive: Receive, client: Client) -> None:
    # A push-only stream would never notice its client leaving, and shutdown would wait for it.
    while (await receive())["type"] not in ("http.disconnect", "websocket.disconnect"):
        pass
    client.end(CLOSED)


async def admit(connection: HTTPConnection) -> tuple[StreamFilter, str]:
    """A new stream's filter (what it asked for, within its token's courses: authorize_read)
    and owner key; 429 once that owner holds too many streams."""
    grant, params = await authorize_read(connection, parse_stream_query)
    filters = {name: params[name] for name in STREAM_FILTERS}
    service, owner = service_of(connection), client_key(connection)
    limit = service.settings.max_streams_per_client
    if service.hub.per_owner[owner] >= limit:
        raise ApiError(429, "too_many_streams", f"at most {limit} streams per token or address")
    return StreamFilter(**filters, courses=grant.courses), owner


async def stream_events(request: Request) -> ASGIApp:
    """Server-Sent Events: replay after Last-Event-ID, then every new event."""
    last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    stream_filter, owner = await admit(request)
    return EventStream(service_of(request), stream_filter, owner, parse_last_event_id(last_id))


async def websocket_events(websocket: WebSocket) -> None:
    """WebSocket: one JSON text frame per event; `last_event_id` resumes like SSE."""
    service = service_of(websocket)
    after_id = parse_last_event_id(websocket.query_params.get("last_event_id"))
    try:
        origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
        if not origin_allowed(origin, host, service.settings.cors_origins):
            raise ApiError(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
        stream_filter, owner = await admit(websocket)
    except ApiError as refusal:
        logger.info("WebSocket refused: %s", refusal.message)
        await websocket.close(code=1008, reason=refusal.code)  # before accept: HTTP 403
        return
    await websocket.accept()
    with (
        service.hub.subscribe(stream_filter, owner) as client,
        metrics.WEBSOCKET_DASHBOARDS.track_inprogress(),
    ):
        watcher = asyncio.create_task(end_when_gone(websocket.receive, client))
        try:
            opening = await open_stream(service, client, after_id)
            transport = WebSocketTransport(server_send(websocket.scope, websocket.send))
            ended = await write_stream(
                client, transport, opening, service.storage, service.settings.send_timeout_seconds
            )
        except StorageUnavailable:
            await websocket.close(code=1011, reason="storage_unavailable")
            return
        finally:
            watcher.cancel()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(FINAL_WRITE_SECONDS):
            await websocket.close(code=websocket_close_code(ended))
    if ended != CLOSED:  # its close frame is queued; the client may never read it
        abort(server_send(websocket.scope, websocket.send))


def websocket_close_code(ended: str) -> int:
    if ended != CLOSED:
        return 1013  # too slow, or gone: try again later, and resume by id
    return 1012 if AppStatus.should_exit else 1000  # 1012: the service restarts
