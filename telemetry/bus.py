"""The bus between processes: Redis pub/sub, or in-process without REDIS_URL. It carries each
committed batch, naming the highest id committed before it, and erasures; it knows no client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
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
        # Unbounded: the subscriber never awaits a client, so it drains the queue every tick.
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
        pass

    async def aclose(self) -> None:
        pass


class RedisBus:
    """Fan-out across processes through a Redis pub/sub channel."""

    PUBLISH_TIMEOUT_SECONDS = 2.0
    HEALTH_CHECK_SECONDS = 10

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        timeout = self.PUBLISH_TIMEOUT_SECONDS
        self._publisher = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    async def publish(self, payload: bytes) -> None:
        await self._publisher.publish(self.channel, payload)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[bytes]]:
        # No retry: a silent reconnect would lose what was published meanwhile (see hub.py).
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


def encode_erasure(erased: dict) -> bytes:
    """An erasure: `student_id`, `course_id` and, for a student, the `courses` they were in."""
    return orjson.dumps({"erased": erased})


def decode_message(payload: bytes) -> dict | None:
    """A bus message, {"follows": id, "events": [...]} or {"erased": {...}}; None, and a
    warning, if it is neither."""
    try:
        message = orjson.loads(payload)
        if isinstance(message.get("erased"), dict):
            return message
        message["follows"] = int(message["follows"])
        if isinstance(message["events"], list):
            return message
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        pass
    logger.warning("ignored a malformed bus message of %d bytes", len(payload))
    return None
