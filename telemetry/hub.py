"""The hub: every connected dashboard in this process, each with its bounded queue of
pre-encoded frames. It never awaits a client. Also the subscriber that feeds it from the
bus and catches up from the database after every (re)subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import types
from collections import Counter
from collections.abc import (
    Awaitable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Send

from telemetry.bus import Bus, decode_message
from telemetry.storage import Storage

if TYPE_CHECKING:  # annotations only: that module imports this one
    from telemetry.streams import Transport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One event, encoded once for every client and transport."""

    id: int
    document: dict
    sse: bytes
    ws: str
    notice: bool = False
    # The server messages too: a client with nothing queued is sent exactly these.
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
    def erasure(cls, erased: dict, after_id: int) -> Frame:
        """`event: erased`, with no SSE id (resuming stays where the events were). Numbered
        after the events delivered before it, so it keeps its place among them."""
        document = {"type": "erased", "student_id": erased.get("student_id")}
        document["course_id"] = erased.get("course_id")
        data = orjson.dumps(document)
        return cls(after_id, document, b"event: erased\ndata: %s\n\n" % data, data.decode(), True)


@dataclass(frozen=True)
class StreamFilter:
    student_id: str | None = None
    course_id: str | None = None
    event_type: str | None = None
    courses: frozenset[str] | None = None  # the token's (Grant.courses): None for all
    wanted: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The hub asks every client about every event (7% of fan-out time went to a generic
        # all() over the three); most dashboards watch everything, so keep only what is set.
        constraints = (
            ("student_id", self.student_id),
            ("course_id", self.course_id),
            ("event_type", self.event_type),
        )
        wanted = tuple((name, value) for name, value in constraints if value is not None)
        object.__setattr__(self, "wanted", wanted)

    def matches(self, document: Mapping[str, Any]) -> bool:
        if self.courses is not None and document.get("course_id") not in self.courses:
            return False
        for name, value in self.wanted:
            if document.get(name) != value:
                return False
        return True

    def hears_erasure(self, erased: Mapping[str, Any]) -> bool:
        """A student's erasure reaches every course their events were shown in."""
        courses = erased.get("courses") or [erased.get("course_id")]
        return self.courses is None or any(course in self.courses for course in courses)


# Why a client's stream ended.
OVERFLOWED = "overflowed"  # its queue filled up: cut off at once, even mid-write


CLOSED = "closed"  # it left, or the server is shutting down


TIMED_OUT = "timed out"  # a write blocked SEND_TIMEOUT_SECONDS


FAILED = "failed"  # a write failed: the connection is gone


def run_until_waiting(coroutine: Coroutine) -> Awaitable | None:
    """Run `coroutine` up to its first wait, here and now: None if it finished without
    waiting, else an awaitable that finishes it (what an eager task does on Python 3.12).
    It raises what the coroutine raised before waiting."""
    try:
        waiting_for = coroutine.send(None)
    except StopIteration:
        return None
    return finish_coroutine(coroutine, waiting_for)


@types.coroutine
def finish_coroutine(coroutine: Coroutine, waiting_for: Any) -> Generator[Any, Any, Any]:
    """The rest of a coroutine stepped by hand, for the task that awaits this."""
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


async def reraise(error: Exception) -> None:
    raise error


async def finish_writes(started: Awaitable, send: Send, messages: list[dict]) -> None:
    await started
    for message in messages:
        await send(message)


# Slots, and a list rather than a deque (760 bytes empty): 5,000 idle streams hold these.
@dataclass(eq=False, slots=True)
class Client:
    """One connected dashboard: a bounded queue of shared frames, and the task writing them.

    No timer per write or per wait: Hub.watch looks at every client a few times a second,
    cuts off a write that blocks past its deadline and asks an idle stream for a ping. Two
    timers per event per client were a tenth of fan-out time.

    No task switch per event either: while the writer waits with nothing queued, the hub
    writes for it (Hub.flush), and wakes it only for a write that would block.
    """

    filter: StreamFilter
    limit: int
    owner: str = ""
    frames: list[Frame] = field(default_factory=list)
    ended: str | None = None
    writer: asyncio.Task | None = None
    # Kept up to date by the writer (see write_stream), read by check().
    writes: int = 0
    writing: bool = False
    deadline: float = math.inf
    ping_seconds: float | None = None
    ping_due: bool = False
    # Set by the writer: how the hub writes for it, and the last id written.
    transport: Transport | None = None
    last_sent: int = 0
    # A write the hub started that would block, or failed: the writer finishes it.
    started_write: Awaitable | None = None
    _waiter: asyncio.Future | None = field(default=None, repr=False)
    _seen_writes: int = field(default=-1, repr=False)
    _seen_at: float = field(default=0.0, repr=False)

    def queue(self, frame: Frame) -> bool:
        """Queue `frame`; True when the hub is to write it (see flush)."""
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
        """The replay/live seam: what follows the last frame sent. An erasure notice is never
        dropped, as the replay may hold the erased student's events."""
        return [frame for frame in frames if frame.id > self.last_sent or frame.notice]

    def flush(self) -> None:
        """Write what is queued, for the waiting writer, without waking it; a write that
        would block is handed to the writer, to finish under its send deadline."""
        if self._waiter is None or self.ended is not None or self.transport is None:
            return
        frames = self.unsent(self.frames)
        self.frames = []
        if not frames:
            return
        self.last_sent = max(self.last_sent, frames[-1].id)
        messages = self.transport.messages(frames)
        for at, message in enumerate(messages):
            self.writes += 1
            try:
                started = run_until_waiting(self.transport.send(message))
            except Exception as error:
                started = reraise(error)
            if started is not None:
                self.writing = True
                self.started_write = finish_writes(started, self.transport.send, messages[at + 1 :])
                self._wake()
                return

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, reason: str) -> None:
        """Let the client go; when cut off (overflow, a blocked write) its writer is
        cancelled, even mid-write."""
        if self.ended is not None:
            return
        self.ended = reason
        self.frames.clear()
        self._wake()
        if reason in (OVERFLOWED, TIMED_OUT) and self.writer is not None:
            self.writer.cancel()

    def check(self, now: float) -> None:
        """The watchdog's look: the same write in progress since `deadline` ago is cut off;
        no write for ping_seconds makes a ping due."""
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
        """Everything queued since the last call; empty when a ping is due or once the
        client has ended."""
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
        # Held while filling from the database, so deliveries stay in id order.
        self.filling = asyncio.Lock()

    @property
    def bus_connected(self) -> bool:
        return self.subscribed.is_set()

    def subscribe(self, stream_filter: StreamFilter, owner: str = "") -> Subscription:
        """A client receiving every delivered event that matches, for as long as it is held."""
        return Subscription(self, Client(stream_filter, self.queue_limit, owner))

    def deliver(self, documents: Iterable[dict]) -> None:
        # Events at or below last_id were already delivered (a replay after a reconnect).
        for document in documents:
            if document["id"] <= self.last_id:
                continue
            self.last_id = document["id"]
            frame = Frame.of(document)
            for client in self.clients:
                if client.ended is None and client.filter.matches(document) and client.queue(frame):
                    self.write_soon(client)

    def write_soon(self, client: Client) -> None:
        if not self.to_flush:
            asyncio.get_running_loop().call_soon(self.flush)
        self.to_flush.append(client)

    def flush(self) -> None:
        """Write for the clients whose writers wait, once whatever was delivered in this
        turn of the event loop is queued: one write per client for all of it."""
        clients, self.to_flush = self.to_flush, []
        for client in clients:
            client.flush()

    def announce_erasure(self, erased: dict) -> None:
        """Tell the clients of the erased student's (or course's) course to drop them."""
        frame = Frame.erasure(erased, self.last_id)
        for client in self.clients:
            if client.ended is None and client.filter.hears_erasure(erased) and client.queue(frame):
                self.write_soon(client)

    def close_all(self) -> None:
        for client in list(self.clients):
            client.end(CLOSED)

    async def watch(self, interval: float) -> None:
        """The streams' watchdog: send deadlines and pings (see Client.check), for ever."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for client in list(self.clients):
                client.check(now)


@dataclass(slots=True)
class Subscription:
    """Hub.subscribe's `with`: a class, as a generator's frame would be held by every open
    stream (400 bytes each)."""

    hub: Hub
    client: Client

    def __enter__(self) -> Client:
        self.hub.clients.add(self.client)
        self.hub.per_owner[self.client.owner] += 1
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        owner = self.client.owner
        self.hub.clients.discard(self.client)
        self.hub.per_owner[owner] -= 1
        if not self.hub.per_owner[owner]:
            del self.hub.per_owner[owner]


async def catch_up(hub: Hub, storage: Storage, page_size: int = 1_000) -> None:
    """Deliver from the database whatever was committed and not delivered yet.

    Safe at any moment: ids commit in order under the commit order, so what is committed
    is every id up to the highest, and what the bus brings later is skipped by id.
    """
    while True:
        # A task of its own: `databases` binds a connection to its task, and a long-lived
        # task whose connection broke while being released could never read again.
        documents = await asyncio.create_task(storage.events_after(hub.last_id, page_size))
        hub.deliver(documents)
        if len(documents) < page_size:
            return


async def deliver_message(hub: Hub, storage: Storage, payload: bytes) -> None:
    """A batch from the bus, after any earlier events it follows that never came: those of
    a process that died between its commit and its publish, or whose publish failed."""
    message = decode_message(payload)
    if message is None:
        return
    if "erased" in message:
        hub.announce_erasure(message["erased"])
        return
    async with hub.filling:
        if message["follows"] > hub.last_id:
            await catch_up(hub, storage)
        hub.deliver(message["events"])


RECONNECT_MIN_SECONDS = 0.25


RECONNECT_MAX_SECONDS = 8.0


async def relay_bus_to_hub(bus: Bus, hub: Hub, storage: Storage) -> None:
    """The background subscriber: bus -> hub, for ever, reconnecting with backoff."""
    delay = RECONNECT_MIN_SECONDS
    while True:
        try:
            async with bus.subscribe() as messages:
                async with hub.filling:
                    await catch_up(hub, storage)
                hub.subscribed.set()
                if delay > RECONNECT_MIN_SECONDS:
                    logger.info("bus subscription restored")
                delay = RECONNECT_MIN_SECONDS
                async for payload in messages:
                    await deliver_message(hub, storage, payload)
        except Exception as error:  # any failure means: reconnect
            logger.warning("bus subscription lost (%s); retrying in %.1f s", error, delay)
        hub.subscribed.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_SECONDS)


GAP_CHECK_SECONDS = 1.0


async def close_gaps(hub: Hub, storage: Storage) -> None:
    """A gap no later message reveals (its process died and the others went quiet) closes
    within two checks: events committed a whole check ago and still undelivered are read
    from the database. Younger ones are left to their publish, normally a millisecond away."""
    committed_before = 0
    while True:
        await asyncio.sleep(GAP_CHECK_SECONDS)
        try:
            committed_before = await finish_if_cancelled(
                check_for_gap(hub, storage, committed_before)
            )
        except Exception as error:
            logger.warning("could not check for undelivered events: %r", error)


async def check_for_gap(hub: Hub, storage: Storage, committed_before: int) -> int:
    """Fill the hub from the database if it is behind what was committed a check ago; the
    highest id committed now, for the next check."""
    latest = await storage.max_event_id()
    if hub.last_id < committed_before:
        async with hub.filling:
            await catch_up(hub, storage)
    return latest


async def finish_if_cancelled(work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work` to its end even if the caller is cancelled meanwhile, then let the
    cancellation through. A database call cut off mid-way is no use, and on SQLite it leaves
    aiosqlite's worker thread to answer later, into an event loop shutdown may have closed."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
