"""Faults injected against the real servers: the service bends, nothing acknowledged is lost."""

import asyncio
import signal
import socket
import struct
import time
from urllib.parse import urlsplit

import asyncpg
import httpx

from tests.conftest import REDIS_URL, wait_for
from tests.e2e.clients import SseClient, WebSocketClient, event, post_events
from tests.faults import TcpProxy


def ids_of(receipts: list[dict]) -> list[int]:
    return [receipt["id"] for receipt in receipts]


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/healthz", timeout=5)


async def test_dashboards_get_every_event_across_a_killed_redis_subscription(
    postgres_database_url, private_redis, start_server, connect_dashboard
) -> None:
    server = start_server(DATABASE_URL=postgres_database_url, REDIS_URL=private_redis.url)
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))
    posted = []
    for number in range(6):
        if number % 2:
            private_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        posted += ids_of(await post_events(server.url, event(number)))
    await sse.wait_for_ids(posted)
    await ws.wait_for_ids(posted)
    assert "bus subscription lost" in server.logs()


async def test_redis_restart_keeps_dashboards_connected_and_posts_stored(
    postgres_database_url, private_redis, start_server, connect_dashboard
) -> None:
    server = start_server(DATABASE_URL=postgres_database_url, REDIS_URL=private_redis.url)
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))
    before = ids_of(await post_events(server.url, event(1)))
    private_redis.stop()
    during = ids_of(await post_events(server.url, event(2), event(3)))  # still 201
    assert health(server).status_code == 503
    assert health(server).json()["bus"].startswith("down")
    private_redis.start()
    await wait_for(lambda: health(server).status_code == 200, timeout=20)
    after = ids_of(await post_events(server.url, event(4)))
    await sse.wait_for_ids(before + during + after)
    await ws.wait_for_ids(before + during + after)
    assert not sse.ended.is_set() and not ws.ended.is_set()


async def test_service_starts_with_redis_down_and_recovers_by_itself(
    postgres_database_url, private_redis, start_server, connect_dashboard
) -> None:
    private_redis.stop()
    server = start_server(DATABASE_URL=postgres_database_url, REDIS_URL=private_redis.url)
    response = health(server)
    assert response.status_code == 503 and response.json()["database"] == "up"
    sse = await connect_dashboard(SseClient(server.url))
    stored = ids_of(await post_events(server.url, event(1)))
    private_redis.start()
    await wait_for(lambda: health(server).status_code == 200, timeout=20)
    await sse.wait_for_ids(stored)


async def post_status(server, *events: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{server.url}/api/v1/events", json=list(events))


async def count_rows(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval("SELECT COUNT(*) FROM events")
    finally:
        await connection.close()


async def test_database_outage_answers_503_then_recovers_without_restart(
    postgres_database_url, channel, start_server, connect_dashboard
) -> None:
    parts = urlsplit(postgres_database_url)
    proxy = await TcpProxy(parts.hostname, parts.port).start()
    try:
        via_proxy = postgres_database_url.replace(f":{parts.port}/", f":{proxy.port}/")
        # The proxy lives on this event loop: start (which blocks while polling) in a thread.
        server = await asyncio.to_thread(
            start_server, DATABASE_URL=via_proxy, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
        )
        sse = await connect_dashboard(SseClient(server.url))
        first = ids_of(await post_events(server.url, event(1)))
        proxy.cut()
        response = await post_status(server, event(2), event(3))
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert (await asyncio.to_thread(health, server)).json()["database"].startswith("down")
        assert await count_rows(postgres_database_url) == 1  # nothing half-written
        proxy.restore()
        retried = await post_status(server, event(2), event(3))
        assert retried.status_code == 201
        await sse.wait_for_ids(first + ids_of(retried.json()["events"]))
    finally:
        await proxy.stop()


async def test_terminated_database_connections_are_replaced(
    postgres_database_url, channel, start_server
) -> None:
    server = start_server(
        DATABASE_URL=postgres_database_url, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
    )
    await post_events(server.url, event(1))
    admin = await asyncpg.connect(postgres_database_url)
    try:
        killed = await admin.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert killed >= 1
    statuses = [(await post_status(server, event(n))).status_code for n in range(2, 6)]
    assert set(statuses) <= {201, 503} and statuses[-1] == 201
    stored = await count_rows(postgres_database_url)
    assert stored == 1 + statuses.count(201)


async def test_slow_consumer_is_cut_off_while_others_keep_up(
    start_server, raw_sse_socket, connect_dashboard
) -> None:
    server = start_server(CLIENT_QUEUE_LIMIT="20", SEND_TIMEOUT_SECONDS="30")
    fast = await connect_dashboard(SseClient(server.url))
    raw_sse_socket(server)  # stuck: never reads
    await wait_for(lambda: health(server).json()["clients"] == 2)
    big = "x" * 200_000  # enough to fill every socket buffer between us and the server
    posted = []
    for number in range(80):
        posted += ids_of(await post_events(server.url, event(number, source=big)))
    await fast.wait_for_ids(posted)
    await wait_for(lambda: health(server).json()["clients"] == 1)  # the stuck one was let go


async def test_vanished_clients_are_detected_and_freed(start_server, raw_sse_socket) -> None:
    server = start_server(SEND_TIMEOUT_SECONDS="1", SSE_PING_SECONDS="0.5")
    reset = raw_sse_socket(server)
    raw_sse_socket(server)  # silent: never reads, never closes
    await wait_for(lambda: health(server).json()["clients"] == 2)
    # An abortive close sends RST, no FIN.
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()
    for number in range(80):  # fill every buffer to the silent client so writes block
        await post_events(server.url, event(number, source="y" * 200_000))
    await wait_for(lambda: health(server).json()["clients"] == 0, timeout=20)


EXTENSION_RETRY_SECONDS = 0.5 + 1 + 2


async def test_sigterm_ends_streams_finishes_posts_and_exits_promptly(
    postgres_database_url, channel, start_server, connect_dashboard
) -> None:
    server = start_server(
        DATABASE_URL=postgres_database_url, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
    )
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))

    acknowledged: list[int] = []

    async def post_until_refused() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            for number in range(10_000):
                try:
                    response = await client.post(f"{server.url}/api/v1/events", json=event(number))
                except httpx.TransportError:
                    return
                if response.status_code == 201:
                    acknowledged.extend(ids_of(response.json()["events"]))

    posters = [asyncio.create_task(post_until_refused()) for _ in range(4)]
    await wait_for(lambda: len(acknowledged) >= 20)  # POSTs are in flight when the signal lands
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(sse.ended.wait(), 10)
    await asyncio.wait_for(ws.ended.wait(), 10)
    assert ws.close_code == 1012  # service restart: reconnect
    returncode = await asyncio.to_thread(server.process.wait, 25)
    # Gone within cell-monitor-extension's retries (0.5 + 1 + 2 s), so a restart loses no POST.
    assert time.monotonic() - started < EXTENSION_RETRY_SECONDS
    assert returncode in (0, -signal.SIGTERM)
    await asyncio.gather(*posters)
    connection = await asyncpg.connect(postgres_database_url)
    try:
        stored = {row["id"] for row in await connection.fetch("SELECT id FROM events")}
    finally:
        await connection.close()
    assert acknowledged and set(acknowledged) <= stored
