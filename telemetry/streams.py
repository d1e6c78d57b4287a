"""Streams: SSE and WebSocket. A stream replays what a dashboard missed from the database,
then goes live from the hub without a gap or a duplicate (Client.unsent).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from dataclasses import dataclass, field

import orjson
from sse_starlette.sse import AppStatus  # importing it makes uvicorn's SIGTERM set should_exit
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from telemetry.access import authorize_read, client_key, origin_allowed
from telemetry.errors import ApiError
from telemetry.events import INT64_MAX
from telemetry.hub import CLOSED, FAILED, OVERFLOWED, TIMED_OUT, Client, Frame, StreamFilter
from telemetry.readapi import STREAM_FILTERS, parse_stream_query
from telemetry.service import Service, service_of
from telemetry.storage import StorageUnavailable

logger = logging.getLogger(__name__)


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
