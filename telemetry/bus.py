"""The bus between processes: Redis pub/sub in production, in-process without REDIS_URL.
A message names the highest id committed before its batch, so a gap can be read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncIterator,
)
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from telemetry.config import Settings
from telemetry.storage import StoredBatch

logger = logging.getLogger(__name__)


class MemoryBus:
    """Fan-out within this one process: the embedded default, needing no server."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[bytes]] = set()

    async def publish(self, payload: bytes) -> None:
        # The subscriber only parses and hands frames to client queues, never awaiting a
        # client, so this queue drains every tick and needs no bound.
        for queue in self._queues:
            queue.put_nowait(payload)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[bytes]]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield self._drain(queue)
        finally:
            self._queues.discard(queue)

    @staticmethod
    async def _drain(queue: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
        while True:
            yield await queue.get()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisBus:
    """Fan-out across processes through a Redis pub/sub channel."""

    PUBLISH_TIMEOUT_SECONDS = 2.0
    HEALTH_CHECK_SECONDS = 10

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self._publisher = aioredis.from_url(
            url,
            socket_timeout=self.PUBLISH_TIMEOUT_SECONDS,
            socket_connect_timeout=self.PUBLISH_TIMEOUT_SECONDS,
        )

    async def publish(self, payload: bytes) -> None:
        await self._publisher.publish(self.channel, payload)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[bytes]]:
        # No retry: a silent reconnect would hide the messages lost meanwhile (module docstring).
        client = aioredis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=self.PUBLISH_TIMEOUT_SECONDS,
            health_check_interval=self.HEALTH_CHECK_SECONDS,
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            yield self._messages(pubsub)
        finally:
            await pubsub.aclose()
            await client.aclose()

    @staticmethod
    async def _messages(pubsub: Any) -> AsyncIterator[bytes]:
        async for message in pubsub.listen():
            if message["type"] == "message":
                yield message["data"]

    async def ping(self) -> None:
        await self._publisher.ping()

    async def aclose(self) -> None:
        await self._publisher.aclose()


Bus = MemoryBus | RedisBus


def build_bus(settings: Settings) -> Bus:
    if settings.redis_url is None:
        return MemoryBus()
    return RedisBus(settings.redis_url, settings.notification_channel)


def encode_batch(batch: StoredBatch) -> bytes | None:
    """One bus message per committed batch: its new events' documents and the id they follow."""
    documents = [item.document for item in batch.results if not item.duplicate]
    if not documents:
        return None
    return orjson.dumps({"follows": batch.follows, "events": documents})


# An erasure on the bus: {"erased": {"student_id": ..., "course_id": ..., "courses": [...]}}
# or a course's (no "courses"): the dashboards of `courses` (else of `course_id`) hear it.
ERASURE_PREFIX = b'{"erased":'


def encode_erasure(erased: dict) -> bytes:
    return orjson.dumps({"erased": erased})


def decode_erasure(payload: bytes) -> dict | None:
    """The erasure a bus message announces; None for a batch of events."""
    if not payload.startswith(ERASURE_PREFIX):
        return None
    try:
        erased = orjson.loads(payload)["erased"]
        found = {key: erased.get(key) for key in ("student_id", "course_id")}
        if "courses" in erased:
            found["courses"] = list(erased["courses"])
        return found
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None  # decode_message warns about it


def decode_message(payload: bytes) -> tuple[int, list[dict]] | None:
    """A bus message's (follows, documents); None, and a warning, if it is not one."""
    try:
        message = orjson.loads(payload)
        return int(message["follows"]), list(message["events"])
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        logger.warning("ignored a malformed bus message of %d bytes", len(payload))
        return None
