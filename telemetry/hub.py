"""The hub: this process's dashboards, each with a bounded queue of shared, pre-encoded
frames; it never awaits a client. Fed by the subscriber, from the bus and from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import types
from collections import Counter
from collections.abc import Awaitable, Coroutine, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Message

from telemetry import metrics
from telemetry.bus import Bus, decode_message
from telemetry.storage import Storage

if TYPE_CHECKING:  # annotations only: that module imports this one
    from telemetry.streams import Transport

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Frame:
    """One event, or notice, encoded once for every client and transport: its ASGI messages
    too, so that a client's one frame is written without building anything."""

    id: int
    document: dict
    sse: bytes
    ws: str
    notice: bool = False
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
    def of_notice(cls, document: dict, after_id: int) -> Frame:
        # No SSE id, so a resume stays where the events were; numbered after the events before
        # it, so that the seam (Client.unsent) keeps it in its place.
        data = orjson.dumps(document)
        sse = b"event: %s\ndata: %s\n\n" % (document["type"].encode(), data)
        return cls(after_id, document, sse, data.decode(), notice=True)


@dataclass(frozen=True, slots=True)
class StreamFilter:
    student_id: str | None = None
    course_id: str | None = None
    event_type: str | None = None
    courses: frozenset[str] | None = None  # the token's (Grant.courses): None for all

    def matches(self, document: Mapping[str, Any]) -> bool:
        return (
            (self.courses is None or document.get("course_id") in self.courses)
            and (self.student_id is None or document.get("student_id") == self.student_id)
            and (self.course_id is None or document.get("course_id") == self.course_id)
            and (self.event_type is None or document.get("event_type") == self.event_type)
        )

    def hears_erasure(self, erased: Mapping[str, Any]) -> bool:
        """A student's erasure reaches every course their events were shown in."""
        courses = erased.get("courses") or [erased.get("course_id")]
        return self.courses is None or any(course in self.courses for course in courses)


# Why a client's stream ended.
OVERFLOWED = "overflowed"  # its queue filled up: cut off at once, even mid-write
TIMED_OUT = "timed out"  # a write blocked SEND_TIMEOUT_SECONDS: cut off too
CLOSED = "closed"  # it left, or the server is shutting down
FAILED = "failed"  # a write failed: the connection is gone
CUT_OFF_COUNTS = {OVERFLOWED: metrics.CUT_OFF_OVERFLOW, TIMED_OUT: metrics.CUT_OFF_DEADLINE}


def run_until_waiting(coroutine: Coroutine) -> Awaitable | None:
    """Run `coroutine` here and now up to its first wait: None if it finished without waiting,
    else an awaitable that finishes it."""
    try:
        waiting_for = coroutine.send(None)
    except StopIteration:
        return None
    return finish_coroutine(coroutine, waiting_for)


@types.coroutine
def finish_coroutine(coroutine: Coroutine, waiting_for: Any) -> Generator[Any, Any, Any]:
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


@dataclass(eq=False, slots=True)
class Client:
    """One dashboard: a bounded queue of shared frames and one writer (streams.write_stream).
    While the writer waits, the hub writes for it (flush), waking it only to finish a write
    that would block. Hub.watch, not a timer per write, keeps the send deadline (check)."""

    filter: StreamFilter
    limit: int
    owner: str = ""
    frames: list[Frame] = field(default_factory=list)
    ended: str | None = None
    writer: asyncio.Task | None = None
    # Kept by whoever writes, for check().
    writes: int = 0
    writing: bool = False
    deadline: float = math.inf
    ping_seconds: float | None = None
    ping_due: bool = False
    # Set by the writer for flush(); a write flush() started that would block, for the writer.
    transport: Transport | None = None
    last_sent: int = 0
    started_write: Awaitable | None = None
    _waiter: asyncio.Future | None = None
    _seen_writes: int = -1
    _seen_at: float = 0.0

    def queue(self, frame: Frame) -> bool:
        """Queue `frame`; True when the hub is to write it (flush)."""
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
        """The replay/live seam: what follows the last frame sent, and every notice (an erasure
        may concern events the replay holds)."""
        return [frame for frame in frames if frame.id > self.last_sent or frame.notice]

    def flush(self) -> None:
        if self._waiter is None or self.ended is not None or self.transport is None:
            return
        frames, self.frames = self.unsent(self.frames), []
        if not frames:
            return
        self.last_sent = max(self.last_sent, frames[-1].id)
        messages = self.transport.messages(frames)
        for at, message in enumerate(messages):
            self.writes += 1
            try:
                started = run_until_waiting(self.transport.send(message))
            except Exception as error:  # reset, closed or refused: the connection is gone
                logger.info("dashboard dropped: %r", error)
                self.end(FAILED)
                return
            if started is not None:
                self.writing = True
                self.started_write = self.write(messages[at + 1 :], started)
                self._wake()
                return

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, reason: str) -> None:
        """Let the client go; a cut-off (OVERFLOWED, TIMED_OUT) cancels its writer mid-write."""
        if self.ended is not None:
            return
        self.ended = reason
        self.frames.clear()
        self._wake()
        if reason in CUT_OFF_COUNTS:
            CUT_OFF_COUNTS[reason].inc()
            if self.writer is not None:
                self.writer.cancel()

    async def write(self, messages: list[Message], started: Awaitable | None = None) -> None:
        self.writes += 1
        self.writing = True
        if started is not None:
            await started
        for message in messages:
            await self.transport.send(message)
        self.writing = False

    def check(self, now: float) -> None:
        """The watchdog's look: cut off a write under way for `deadline`, or ask for a ping."""
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
        """Everything queued since the last call: empty when a ping is due, or once ended."""
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
        self.filling = asyncio.Lock()  # held while reading the database, to keep id order

    @property
    def bus_connected(self) -> bool:
        return self.subscribed.is_set()

    @contextlib.contextmanager
    def subscribe(self, stream_filter: StreamFilter, owner: str = "") -> Iterator[Client]:
        """A client receiving every delivered event that matches, while it is held."""
        client = Client(stream_filter, self.queue_limit, owner)
        self.clients.add(client)
        self.per_owner[owner] += 1
        try:
            yield client
        finally:
            self.clients.discard(client)
            self.per_owner[owner] -= 1
            if not self.per_owner[owner]:
                del self.per_owner[owner]

    def deliver(self, documents: Iterable[dict]) -> None:
        for document in documents:
            if document["id"] <= self.last_id:
                continue  # delivered already: a repeat, or caught up from the database
            self.last_id = document["id"]
            frame = Frame.of(document)
            for client in self.clients:
                if client.ended is None and client.filter.matches(document) and client.queue(frame):
                    self.write_soon(client)

    def announce_erasure(self, erased: dict) -> None:
        """Tell the clients of the erased student's (or course's) course to drop them."""
        notice = {"type": "erased", **{key: erased.get(key) for key in ("student_id", "course_id")}}
        frame = Frame.of_notice(notice, self.last_id)
        for client in self.clients:
            if client.ended is None and client.filter.hears_erasure(erased) and client.queue(frame):
                self.write_soon(client)

    def write_soon(self, client: Client) -> None:
        if not self.to_flush:
            asyncio.get_running_loop().call_soon(self.flush)
        self.to_flush.append(client)

    def flush(self) -> None:
        # Once this turn of the event loop has delivered all it will: one write per client.
        clients, self.to_flush = self.to_flush, []
        for client in clients:
            client.flush()

    def close_all(self) -> None:
        for client in list(self.clients):
            client.end(CLOSED)

    async def watch(self, interval: float) -> None:
        """The streams' watchdog: send deadlines and pings (Client.check)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for client in list(self.clients):
                client.check(now)


async def catch_up(hub: Hub, storage: Storage, page_size: int = 1_000) -> None:
    """Deliver whatever was committed and not delivered yet. Safe at any moment: ids commit in
    order, and deliver() skips what it has seen."""
    while True:
        # A task of its own: `databases` binds a connection to its task, and a long-lived task
        # whose connection broke while being released could never read again.
        documents = await asyncio.create_task(storage.events_after(hub.last_id, page_size))
        hub.deliver(documents)
        if len(documents) < page_size:
            return


async def deliver_message(hub: Hub, storage: Storage, payload: bytes) -> None:
    """A bus message; a batch after the events it follows that never came (their process died
    between its commit and its publish, or the publish failed)."""
    message = decode_message(payload)
    if message is None:
        return
    if "erased" in message:
        hub.announce_erasure(message["erased"])
        return
    async with hub.filling:
        if message["follows"] > hub.last_id:
            metrics.GAP_FOUND_BY_MESSAGE.inc()
            await catch_up(hub, storage)
        hub.deliver(message["events"])


RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS = 0.25, 8.0
GAP_CHECK_SECONDS = 1.0


async def relay_bus_to_hub(bus: Bus, hub: Hub, storage: Storage) -> None:
    """The background subscriber: bus to hub, for ever, resubscribing with backoff."""
    delay = RECONNECT_MIN_SECONDS
    while True:
        try:
            async with bus.subscribe() as messages:
                async with hub.filling:
                    await catch_up(hub, storage)
                hub.subscribed.set()
                if delay > RECONNECT_MIN_SECONDS:
                    logger.info("bus subscription restored")
                    metrics.BUS_RECONNECTS.inc()
                delay = RECONNECT_MIN_SECONDS
                async for payload in messages:
                    await deliver_message(hub, storage, payload)
        except Exception as error:  # any failure means: resubscribe
            logger.warning("bus subscription lost (%s); retrying in %.1f s", error, delay)
        hub.subscribed.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_SECONDS)


async def close_gaps(hub: Hub, storage: Storage) -> None:
    """Closes a gap no message reveals (its process died, the others went quiet) within two
    checks: events committed a check ago and still undelivered are read from the database."""
    committed_before = 0
    while True:
        await asyncio.sleep(GAP_CHECK_SECONDS)
        try:
            latest = await finish_if_cancelled(storage.max_event_id())
            if hub.last_id < committed_before:
                metrics.GAP_FOUND_BY_CHECK.inc()
                async with hub.filling:
                    await finish_if_cancelled(catch_up(hub, storage))
            committed_before = latest
        except Exception as error:
            logger.warning("could not check for undelivered events: %r", error)


async def finish_if_cancelled(work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work` to its end even if the caller is cancelled meanwhile, then let the
    cancellation through: aiosqlite's thread would otherwise answer into a closed loop."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
