"""An operator's worst day against real processes, PostgreSQL and Redis: a process killed
between its commit and its publish, connections terminated under load, PostgreSQL
restarted, dashboards that stop reading."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest

from tests.conftest import REDIS_URL, wait_for
from tests.e2e.clients import SseClient, WebSocketClient, event, post_events

# What a POST may take, at worst, before it is answered 201 or 503.
POST_DEADLINE_SECONDS = 10.0


def ids_of(receipts: list[dict]) -> list[int]:
    return [receipt["id"] for receipt in receipts]


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/healthz", timeout=5)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition until it holds; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def kill_between_commit_and_publish(server, database_url: str) -> int:
    """POST one event to `server` and SIGKILL it after its commit, before its publish:
    its INSERT is held by a table lock, the process frozen, the lock released so that the
    commit lands, then the process killed. Returns the id it committed.

    The server must have stored before: its statement is prepared, so what the lock holds
    is the INSERT's execution, which completes without the frozen process.
    """
    admin = await asyncpg.connect(database_url)
    doomed_post = asyncio.create_task(
        asyncio.to_thread(httpx.post, f"{server.url}/api/v1/events", json=event(99), timeout=30)
    )
    try:
        stored = await admin.fetchval("SELECT COUNT(*) FROM events")
        holding = admin.transaction()
        await holding.start()
        await admin.execute("LOCK TABLE events IN EXCLUSIVE MODE")

        async def insert_waits() -> bool:
            return await admin.fetchval(
                "SELECT COUNT(*) > 0 FROM pg_locks"
                " WHERE relation = 'events'::regclass AND NOT granted"
            )

        await until(insert_waits)
        server.process.send_signal(signal.SIGSTOP)
        await holding.rollback()

        async def committed() -> bool:
            return await admin.fetchval("SELECT COUNT(*) FROM events") == stored + 1

        await until(committed)
        server.process.kill()
        await asyncio.to_thread(server.process.wait)
        return await admin.fetchval("SELECT MAX(id) FROM events")
    finally:
        server.process.kill()
        await admin.close()
        with contextlib.suppress(httpx.TransportError):
            await doomed_post


@pytest.mark.parametrize("then", ["all goes quiet", "the others keep posting"])
async def test_events_of_a_process_killed_between_commit_and_publish_reach_every_dashboard(
    then, production, connect_dashboard, postgres_database_url
) -> None:
    doomed, web1, web2 = production(), production(), production()
    dashboards = [
        await connect_dashboard(client)
        for web in (web1, web2)
        for client in (SseClient(web.url), WebSocketClient(web.ws_url))
    ]
    before = ids_of(await post_events(doomed.url, event(0)))
    before += ids_of(await post_events(web1.url, event(1), event(2)))
    for dashboard in dashboards:
        await dashboard.wait_for_ids(before)
    expected = [*before, await kill_between_commit_and_publish(doomed, postgres_database_url)]
    if then == "the others keep posting":
        expected += ids_of(await post_events(web2.url, event(3)))
        expected += ids_of(await post_events(web1.url, event(4)))
    for dashboard in dashboards:  # each id once, in id order, within a few seconds
        await dashboard.wait_for_ids(expected, timeout=5)
    for resume_from in [0, *expected]:
        late = await connect_dashboard(SseClient(web2.url, last_event_id=resume_from))
        await late.wait_for_ids([id_ for id_ in expected if id_ > resume_from])


class Posters:
    """Clients posting as hard as they can, retrying each 503 at once with the same event_id,
    recording every answer and how long it took."""

    def __init__(self, server, count: int) -> None:
        self.url = f"{server.url}/api/v1/events"
        self.answers: list[tuple[float, int, str | None, float]] = []  # sent, status, R-A, s
        self.acknowledged: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._post(first)) for first in range(count)]
        self._count = count

    async def _post(self, number: int) -> None:
        async with httpx.AsyncClient(timeout=POST_DEADLINE_SECONDS * 2) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                response = await client.post(self.url, json=event(number))
                took = time.monotonic() - sent
                retry_after = response.headers.get("retry-after")
                self.answers.append((sent, response.status_code, retry_after, took))
                if response.status_code == 201:
                    self.acknowledged.add(f"e{number}")
                    number += self._count

    def stored_since(self, moment: float) -> bool:
        return any(sent >= moment and status == 201 for sent, status, _, _ in self.answers)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def assert_every_answer_was_201_or_503_in_time(self) -> None:
        for _, status, retry_after, took in self.answers:
            assert status in (201, 503), status
            assert status == 201 or (retry_after or "").isdigit()
            assert took < POST_DEADLINE_SECONDS, took


async def assert_acknowledged_are_stored(database_url: str, acknowledged: set[str]) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        stored = {row["event_id"] for row in await connection.fetch("SELECT event_id FROM events")}
    finally:
        await connection.close()
    assert acknowledged and acknowledged <= stored


TERMINATE_APP_CONNECTIONS = """
SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


async def test_posts_answer_201_or_503_through_repeated_connection_terminations(
    production, postgres_database_url
) -> None:
    server = production()
    admin = await asyncpg.connect(postgres_database_url)
    posters = Posters(server, count=4)
    try:
        for _ in range(5):  # the race this guards against hit about one run in five
            for _ in range(8):  # every 0.25 s for 2 s, this test's database only
                await admin.fetchval(TERMINATE_APP_CONNECTIONS)
                await asyncio.sleep(0.25)
            reachable = time.monotonic()
            await wait_for(lambda moment=reachable: posters.stored_since(moment), timeout=5)
    finally:
        await posters.stop()
        await admin.close()
    posters.assert_every_answer_was_201_or_503_in_time()
    assert any(status == 503 for _, status, _, _ in posters.answers)  # the faults did land
    await wait_for(lambda: health(server).status_code == 200, timeout=5)
    await assert_acknowledged_are_stored(postgres_database_url, posters.acknowledged)


async def test_posts_recover_after_postgresql_restarts(private_postgres, channel, start_server):
    server = start_server(
        DATABASE_URL=private_postgres.url, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
    )
    posters = Posters(server, count=2)
    try:
        for _ in range(2):
            await wait_for(lambda: len(posters.acknowledged) > 0)
            await asyncio.to_thread(private_postgres.stop)
            await wait_for(lambda: health(server).json()["database"].startswith("down"))
            await asyncio.to_thread(private_postgres.start)
            reachable = time.monotonic()
            await wait_for(lambda moment=reachable: posters.stored_since(moment), timeout=5)
    finally:
        await posters.stop()
    posters.assert_every_answer_was_201_or_503_in_time()
    await wait_for(lambda: health(server).status_code == 200, timeout=5)
    await assert_acknowledged_are_stored(private_postgres.url, posters.acknowledged)


async def test_healthz_is_down_while_events_cannot_be_stored(
    production, postgres_database_url
) -> None:
    server = production()
    admin = await asyncpg.connect(postgres_database_url)
    try:
        async with admin.transaction():  # SELECT 1 still answers; no INSERT can
            await admin.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            sent = time.monotonic()
            response = await asyncio.to_thread(
                httpx.post, f"{server.url}/api/v1/events", json=event(1), timeout=30
            )
            assert time.monotonic() - sent < POST_DEADLINE_SECONDS
            assert response.status_code == 503 and response.headers["retry-after"].isdigit()
            down = health(server)
            assert down.status_code == 503
            assert down.json()["database"].startswith("down: cannot store")
    finally:
        await admin.close()
    await wait_for(lambda: health(server).status_code == 200, timeout=5)
    assert ids_of(await post_events(server.url, event(1)))


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (
            {"SEND_TIMEOUT_SECONDS": "1"},
            "INFO telemetry.streams: dashboard dropped: a write blocked",
        ),
        (
            {"CLIENT_QUEUE_LIMIT": "5", "SEND_TIMEOUT_SECONDS": "30"},
            "WARNING telemetry.streams: slow dashboard cut off",
        ),
    ],
)
async def test_a_dashboard_cut_off_on_purpose_is_one_log_line(
    settings, line, start_server, raw_sse_socket
) -> None:
    server = start_server(**settings)
    reader = raw_sse_socket(server)  # never reads
    await wait_for(lambda: health(server).json()["clients"] == 1)
    for number in range(80):  # fill every buffer to the reader so writes block
        await post_events(server.url, event(number, source="y" * 200_000))
        if health(server).json()["clients"] == 0:
            break
    # The stream's task logs, if anything, as it lets the client go.
    await wait_for(lambda: health(server).json()["clients"] == 0, timeout=20)
    # An abortive close, or uvicorn's shutdown would wait for the unread bytes to drain.
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()
    server.stop()
    logs = server.logs()
    assert logs.count(line) == 1, logs
    assert "ERROR" not in logs and "Traceback" not in logs, logs
