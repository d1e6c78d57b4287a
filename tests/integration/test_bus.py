"""The Redis bus and the background subscriber against a real Redis."""

import asyncio
import contextlib
import datetime as dt
import logging

import orjson
import pytest

from telemetry.bus import MemoryBus, RedisBus, encode_batch
from telemetry.config import Settings
from telemetry.hub import Hub, StreamFilter, deliver_message, relay_bus_to_hub
from telemetry.ingest import normalise_batch
from telemetry.storage import Storage, StoredBatch, StoredEvent
from tests.conftest import REDIS_URL, wait_for


async def next_message(messages, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(anext(messages), timeout)


@pytest.mark.parametrize("bus_kind", ["redis", "memory"])
async def test_published_messages_reach_every_subscriber(bus_kind: str, channel: str) -> None:
    bus = RedisBus(REDIS_URL, channel) if bus_kind == "redis" else MemoryBus()
    try:
        async with bus.subscribe() as first, bus.subscribe() as second:
            await bus.publish(b"[1]")
            assert await next_message(first) == b"[1]"
            assert await next_message(second) == b"[1]"
    finally:
        await bus.aclose()


async def test_a_killed_subscription_raises_instead_of_silently_reconnecting(private_redis) -> None:
    bus = RedisBus(private_redis.url, "c")
    try:
        async with bus.subscribe() as messages:
            private_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            with pytest.raises(Exception, match="(?i)connection"):
                await next_message(messages)
    finally:
        await bus.aclose()


async def store_and_publish(storage: Storage, bus, student: str) -> int:
    now = dt.datetime.now(dt.UTC)
    events = normalise_batch({"student_id": student, "event_type": "x"}, now, Settings())
    async with storage.commit_order():
        batch = await storage.store([{**events[0], "received_at": now}])
        with contextlib.suppress(Exception):  # Redis is down in some tests: stored counts
            await bus.publish(encode_batch(batch))
    return batch.results[0].document["id"]


def received_ids(client) -> list[int]:
    return [frame.id for frame in client.frames]


@contextlib.asynccontextmanager
async def relay(storage: Storage, redis_url: str):
    """A hub fed by the background subscriber, and one client of it."""
    bus, hub = RedisBus(redis_url, "c"), Hub(queue_limit=100)
    task = asyncio.create_task(relay_bus_to_hub(bus, hub, storage))
    try:
        with hub.subscribe(StreamFilter()) as client:
            yield bus, hub, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await bus.aclose()


async def test_events_published_while_the_subscription_is_down_are_caught_up(
    storage, private_redis
) -> None:
    async with relay(storage, private_redis.url) as (bus, hub, client):
        await wait_for(lambda: hub.bus_connected)
        first = await store_and_publish(storage, bus, "s1")
        await wait_for(lambda: received_ids(client) == [first])
        private_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        missed = await store_and_publish(storage, bus, "s2")  # published to nobody
        await wait_for(lambda: received_ids(client) == [first, missed])
        after = await store_and_publish(storage, bus, "s3")
        await wait_for(lambda: received_ids(client) == [first, missed, after])


async def test_subscriber_survives_a_redis_restart_and_catches_up(storage, private_redis) -> None:
    async with relay(storage, private_redis.url) as (bus, hub, client):
        await wait_for(lambda: hub.bus_connected)
        private_redis.stop()
        await wait_for(lambda: not hub.bus_connected)
        stored_while_down = [await store_and_publish(storage, bus, f"s{i}") for i in range(3)]
        private_redis.start()
        await wait_for(lambda: hub.bus_connected, timeout=20)
        await wait_for(lambda: received_ids(client) == stored_while_down)


async def test_subscriber_waits_for_redis_that_is_down_at_start(
    storage, private_redis, caplog
) -> None:
    private_redis.stop()
    caplog.set_level(logging.WARNING, logger="telemetry")
    async with relay(storage, private_redis.url) as (bus, hub, client):
        await wait_for(lambda: "bus subscription lost" in caplog.text)  # it tried, and failed
        assert not hub.bus_connected
        stored = await store_and_publish(storage, bus, "s1")
        private_redis.start()
        await wait_for(lambda: hub.bus_connected, timeout=20)
        await wait_for(lambda: received_ids(client) == [stored])


async def test_a_message_following_an_undelivered_id_brings_the_missing_events_first(
    storage,
) -> None:
    hub = Hub(queue_limit=100)
    with hub.subscribe(StreamFilter()) as client:
        now = dt.datetime.now(dt.UTC)
        lost, batch = [
            await storage.store(
                [{**event, "received_at": now} for event in normalise_batch(raw, now, Settings())]
            )
            for raw in (
                {"student_id": "a", "event_type": "x"},
                {"student_id": "b", "event_type": "y"},
            )
        ]  # the first batch's publish never happened
        await deliver_message(hub, storage, encode_batch(batch))
        await deliver_message(hub, storage, encode_batch(batch))  # a repeat changes nothing
        ids = [lost.results[0].document["id"], batch.results[0].document["id"]]
        assert received_ids(client) == ids


def test_bus_message_is_the_batch_of_documents_and_the_id_it_follows() -> None:
    batch = StoredBatch([StoredEvent({"id": 8}, False), StoredEvent({"id": 3}, True)], follows=7)
    assert orjson.loads(encode_batch(batch)) == {"follows": 7, "events": [{"id": 8}]}
