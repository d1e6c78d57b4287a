"""Resume by id: every event exactly once, in order, across client reconnects."""

import asyncio

import pytest

from tests.conftest import REDIS_URL
from tests.e2e.clients import SseClient, WebSocketClient, event, post_events


@pytest.fixture
def server(postgres_database_url, channel, start_server):
    return start_server(
        DATABASE_URL=postgres_database_url,
        REDIS_URL=REDIS_URL,
        NOTIFICATION_CHANNEL=channel,
        REPLAY_LIMIT="50",
    )


def ids_of(receipts: list[dict]) -> list[int]:
    return [receipt["id"] for receipt in receipts]


@pytest.mark.parametrize("client_class", [SseClient, WebSocketClient])
async def test_reconnecting_client_gets_exactly_what_it_missed(
    server, client_class, connect_dashboard
) -> None:
    url = server.url if client_class is SseClient else server.ws_url
    first = await connect_dashboard(client_class(url))
    seen = ids_of(await post_events(server.url, event(1), event(2)))
    await first.wait_for_ids(seen)
    await first.close()
    missed = ids_of(await post_events(server.url, event(3), event(4)))
    again = await connect_dashboard(client_class(url, last_event_id=seen[-1]))
    await again.wait_for_ids(missed)
    live = ids_of(await post_events(server.url, event(5)))
    await again.wait_for_ids(missed + live)


async def test_resume_applies_the_stream_filter_to_the_replay(server, connect_dashboard) -> None:
    receipts = await post_events(server.url, event(1), event(2), event(4))
    client = await connect_dashboard(SseClient(server.url, last_event_id=0, student_id="s1"))
    await client.wait_for_ids([receipts[0]["id"], receipts[2]["id"]])


@pytest.mark.parametrize("client_class", [SseClient, WebSocketClient])
async def test_client_too_far_behind_is_told_to_resync(
    server, client_class, connect_dashboard
) -> None:
    url = server.url if client_class is SseClient else server.ws_url
    await post_events(server.url, *(event(n) for n in range(60)))
    client = await connect_dashboard(client_class(url, last_event_id=0))
    live = ids_of(await post_events(server.url, event(100)))
    await client.wait_for_ids(live)
    assert [notice["reason"] for notice in client.notices] == ["too_far_behind"]


async def test_no_gap_or_duplicate_at_the_seam_while_events_keep_coming(
    server, connect_dashboard
) -> None:
    """Reconnect over and over while another client posts: the union is every id once."""
    posted: list[int] = []

    async def keep_posting() -> None:
        for number in range(120):
            posted.extend(ids_of(await post_events(server.url, event(number))))

    poster = asyncio.create_task(keep_posting())
    received: list[int] = []
    while not poster.done() or (posted and (not received or received[-1] < posted[-1])):
        client = await connect_dashboard(
            SseClient(server.url, last_event_id=received[-1] if received else 0)
        )
        await asyncio.sleep(0.05)  # let a few events arrive on this connection, then drop it
        await client.close()
        received.extend(client.ids)
    await poster
    assert received == posted


@pytest.mark.parametrize("client_class", [SseClient, WebSocketClient])
async def test_a_replay_of_many_pages_while_events_keep_coming_is_exact(
    client_class, postgres_database_url, channel, start_server, connect_dashboard
) -> None:
    """A dashboard 900 events behind is replayed in pages, live events arriving meanwhile."""
    server = start_server(
        DATABASE_URL=postgres_database_url, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
    )
    missed: list[int] = []
    for start in range(0, 900, 300):
        missed += ids_of(
            await post_events(server.url, *(event(n) for n in range(start, start + 300)))
        )
    url = server.url if client_class is SseClient else server.ws_url
    client = await connect_dashboard(client_class(url, last_event_id=missed[0] - 1))
    live: list[int] = []
    for number in range(900, 920):
        live += ids_of(await post_events(server.url, event(number)))
    await client.wait_for_ids(missed + live)
    assert client.ids == missed + live
