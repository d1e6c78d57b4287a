"""Ingest: POST /api/v1/events. The committer coalesces concurrent POSTs into one
transaction and one bus message, stored and published in id order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from telemetry import metrics
from telemetry.access import bearer_token, envelope_token, require_grant
from telemetry.bus import Bus, encode_batch
from telemetry.config import Settings
from telemetry.errors import ApiError, FieldErrors, StorageUnavailable, storage_unavailable
from telemetry.events import (
    is_json_content_type,
    normalise_event,
    parse_json_body,
    pseudonymized,
    read_body,
)
from telemetry.hub import finish_if_cancelled
from telemetry.pioneer import is_pioneer_envelope, normalise_pioneer
from telemetry.service import service_of
from telemetry.storage import (
    Storage,
    StoredBatch,
    StoredEvent,
)

logger = logging.getLogger(__name__)


def normalise_batch(body: Any, now: dt.datetime, settings: Settings) -> list[dict[str, Any]]:
    """A request body (one event or an array of them) to normalised events, or an ApiError."""
    items, prefix = (body, "events") if isinstance(body, list) else ([body], "event")
    if not items:
        raise ApiError(422, "empty_batch", "the request holds no events")
    if len(items) > settings.max_batch_events:
        raise ApiError(
            413,
            "batch_too_large",
            f"a batch holds at most {settings.max_batch_events} events; this one has {len(items)}",
        )
    errors = FieldErrors()
    events = []
    for index, item in enumerate(items):
        path = f"{prefix}[{index}]" if body is items else prefix
        normalise = normalise_pioneer if is_pioneer_envelope(item) else normalise_event
        events.append(normalise(item, path, now, settings, errors))
    if errors.details:
        raise ApiError(
            422, "invalid_event", "some events are invalid; none was stored", errors.details
        )
    return [event for event in events if event is not None]


@dataclass
class PendingWrite:
    events: list[dict]
    done: asyncio.Future[list[StoredEvent]]


# Every POST is answered within this: 201, or 503 with Retry-After (clients retry 5xx).
POST_DEADLINE_SECONDS = 8.0


# One batch: the commit order, the transaction and the publish. A POST may wait for the batch
# before its own, so twice this stays within POST_DEADLINE_SECONDS.
COMMIT_DEADLINE_SECONDS = 4.0


# Batches stored back to back under one hold of the commit order (other processes wait).
PIPELINED_BATCHES = 8


# While storing fails, how often the committer tries the ingest path by itself, so that
# /healthz recovers without waiting for a POST.
PROBE_SECONDS = 1.0


def is_bad_row(error: Exception) -> bool:
    """A failure of the data (SQLSTATE class 22 or 23), not of the database."""
    if isinstance(error, asyncpg.PostgresError):
        return str(error.sqlstate)[:2] in ("22", "23")
    return isinstance(error, sqlite3.IntegrityError | sqlite3.DataError)


class Committer:
    """Coalesces concurrent POSTs into one transaction and one bus message.

    Batches form naturally: whatever queued while the previous commit ran goes into the
    next one, so an idle service adds no wait at all. Under load the next batch is stored
    while the last one is published (see _commit).
    """

    def __init__(self, storage: Storage, bus: Bus, max_events: int) -> None:
        self.storage = storage
        self.bus = bus
        self.max_events = max_events
        self.failure: str | None = None  # why the last attempt to store failed, until one works
        self._queue: asyncio.Queue[PendingWrite] = asyncio.Queue()
        self._carried: list[PendingWrite] = []

    async def submit(self, events: list[dict]) -> list[StoredEvent]:
        pending = PendingWrite(events, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        try:
            async with asyncio.timeout(POST_DEADLINE_SECONDS):
                return await asyncio.shield(pending.done)
        except TimeoutError:
            pending.done.cancel()  # still queued: never stored; in flight: a retry dedupes
            raise StorageUnavailable("storing took too long") from None

    async def run(self) -> None:
        while True:
            if self._carried:  # taken by the last commit, never stored: first in line
                batch, self._carried = self._carried, []
            else:
                try:
                    async with asyncio.timeout(PROBE_SECONDS if self.failure else None):
                        first = await self._queue.get()
                except TimeoutError:
                    await finish_if_cancelled(self._try(self._probe))
                    continue
                batch = self._take([first])
            if batch:  # shutdown waits for a commit under way, never cuts one off
                await finish_if_cancelled(self._commit_batch(batch))

    def _take(self, batch: list[PendingWrite]) -> list[PendingWrite]:
        """`batch` and what queued behind it, up to max_events; none whose POST gave up."""
        size = sum(len(pending.events) for pending in batch)
        while not self._queue.empty() and size < self.max_events:
            batch.append(self._queue.get_nowait())
            size += len(batch[-1].events)
        return [pending for pending in batch if not pending.done.done()]

    async def _commit_batch(self, batch: list[PendingWrite]) -> None:
        error = await self._try(self._commit, batch)
        if error is None:
            return
        if len(batch) > 1 and is_bad_row(error):
            # One request's bad row must not fail its neighbours: retry them one by one.
            for pending in batch:
                await self._commit_batch([pending])
            return
        logger.warning("could not store %d events: %r", sum(len(p.events) for p in batch), error)
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(StorageUnavailable(str(error)))

    async def _try(self, attempt: Callable[..., Awaitable[None]], *args: Any) -> Exception | None:
        """Run one attempt to store within the commit deadline; keep `failure` up to date."""
        try:
            async with asyncio.timeout(COMMIT_DEADLINE_SECONDS):
                await attempt(*args)
        except Exception as error:
            if not is_bad_row(error):
                self.failure = "timed out" if isinstance(error, TimeoutError) else repr(error)
            return error
        if self.failure is not None:
            logger.info("storing again after: %s", self.failure)
            self.failure = None
        return None

    async def _probe(self) -> None:
        # An empty batch takes the commit order and the events table's write lock, as a
        # real one does, and stores nothing.
        async with self.storage.commit_order():
            await self.storage.store([])

    async def _commit(self, batch: list[PendingWrite]) -> None:
        """Store `batch`, then, while its publish runs, whatever queued meanwhile, and so on:
        PostgreSQL stores the next batch while Redis takes the last one, under one hold of
        the commit order. Publishes go out one after another, in id order."""
        async with self.storage.commit_order():
            stored = await self._store(batch)
            publishing = asyncio.create_task(self._publish_and_answer(batch, stored))
            try:
                for _ in range(PIPELINED_BATCHES - 1):
                    batch = self._take([])
                    if not batch:
                        break
                    # Until stored, the next run of the committer owns it: on any failure
                    # here it is tried again there, alone, with the usual handling.
                    self._carried = batch
                    try:
                        stored = await self._store(batch)
                    except Exception:
                        break
                    self._carried = []
                    await publishing
                    publishing = asyncio.create_task(self._publish_and_answer(batch, stored))
            finally:
                await publishing

    async def _store(self, batch: list[PendingWrite]) -> StoredBatch:
        received_at = dt.datetime.now(dt.UTC)
        events = [
            {**event, "received_at": received_at} for pending in batch for event in pending.events
        ]
        started = time.perf_counter()
        stored = await self.storage.store(events)
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_EVENTS.observe(len(events))
        duplicates = sum(item.duplicate for item in stored.results)
        metrics.EVENTS_STORED.inc(len(events) - duplicates)
        metrics.EVENTS_DUPLICATE.inc(duplicates)
        return stored

    async def _publish_and_answer(self, batch: list[PendingWrite], stored: StoredBatch) -> None:
        try:
            payload = encode_batch(stored)
            if payload is not None:
                await self.bus.publish(payload)
        except Exception as error:
            # Stored is what we promised; other processes read what they missed from the
            # database (deliver_message, close_gaps).
            logger.warning("could not publish a batch to the bus: %r", error)
        start = 0
        for pending in batch:
            end = start + len(pending.events)
            if not pending.done.done():
                pending.done.set_result(stored.results[start:end])
            start = end


def refuse_unknown_parameters(query: Mapping[str, str]) -> None:
    """A typo in the extension's serverUrl (`?course_id=`, `?tokn=`) shows at once."""
    errors = FieldErrors()
    for name in query:
        if name != "token":
            errors.add(name, "is not a parameter of this endpoint")
    if errors.details:
        raise ApiError(422, "invalid_query", "some query parameters are invalid", errors.details)


async def post_events(request: Request) -> Response:
    """Store one event or a batch; 201 with each event's id once all are committed."""
    try:
        return await accept_events(request)
    except ApiError as refusal:
        metrics.INGEST_REFUSALS.labels(refusal.code).inc()
        raise


async def accept_events(request: Request) -> Response:
    service = service_of(request)
    settings = service.settings
    refuse_unknown_parameters(request.query_params)
    if not is_json_content_type(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "send the events as application/json")
    try:
        body = parse_json_body(await read_body(request, settings.max_body_bytes))
    except ClientDisconnect:
        return Response(status_code=400)
    tokens = [
        bearer_token(request.headers),
        request.query_params.get("token"),
        envelope_token(body),
    ]
    grant = (
        require_grant(settings.ingest_tokens, tokens, "ingest") if settings.ingest_tokens else None
    )
    events = normalise_batch(body, dt.datetime.now(dt.UTC), settings)
    if grant is not None and grant.courses:  # the token's course, for events naming none
        [course] = grant.courses
        events = [event | {"course_id": event["course_id"] or course} for event in events]
    if settings.pseudonymize_salt:  # the one place: nothing after this sees a raw id or name
        events = [pseudonymized(event, settings.pseudonymize_salt) for event in events]
    try:
        stored = await service.committer.submit(events)
    except StorageUnavailable:
        raise storage_unavailable("the events could not be stored") from None
    return JSONResponse({"events": [item.receipt() for item in stored]}, status_code=201)
