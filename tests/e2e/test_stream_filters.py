"""Stream filters over real sockets: only matching events are ever written to the client."""

import asyncio

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

EVENTS = [
    {"student_id": "s1", "course_id": "c1", "event_type": "cell_executed"},
    {"student_id": "s2", "course_id": "c2", "event_type": "cell_executed"},
    {"student_id": "s1", "course_id": "c1", "event_type": "help"},
]


def post(server, events: list[dict]) -> list[int]:
    response = httpx.post(f"{server.url}/api/v1/events", json=events, timeout=10)
    assert response.status_code == 201, response.text
    return [receipt["id"] for receipt in response.json()["events"]]


async def test_sse_writes_only_events_matching_student_and_type(start_server, tmp_path) -> None:
    server = start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'telemetry.db'}")
    replayed = post(server, EVENTS)
    params = {"student_id": "s1", "event_type": "cell_executed", "last_event_id": "0"}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        aconnect_sse(client, "GET", "/api/v1/stream", params=params) as source,
    ):
        messages = (message async for message in source.aiter_sse() if message.data)
        first = await anext(messages)  # the replay: the first event only
        assert int(first.id) == replayed[0]
        live = await asyncio.to_thread(post, server, EVENTS)  # subscribed since the replay
        second = await asyncio.wait_for(anext(messages), 10)
    # Had the two non-matching events been written, they would have come first (id order).
    assert int(second.id) == live[0]
    assert orjson.loads(second.data)["student_id"] == "s1"


async def test_websocket_writes_only_events_of_its_course(start_server, tmp_path) -> None:
    server = start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'telemetry.db'}")
    replayed = post(server, EVENTS)
    url = f"{server.ws_url}/api/v1/ws?course_id=c2&last_event_id=0"
    async with connect(url) as websocket:
        first = orjson.loads(await asyncio.wait_for(websocket.recv(), 10))
        assert first["id"] == replayed[1]
        live = await asyncio.to_thread(post, server, EVENTS)
        second = orjson.loads(await asyncio.wait_for(websocket.recv(), 10))
    assert (second["id"], second["course_id"]) == (live[1], "c2")


async def test_a_misspelt_filter_is_refused_rather_than_streaming_everything(
    start_server, tmp_path
) -> None:
    server = start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'telemetry.db'}")
    response = httpx.get(f"{server.url}/api/v1/stream", params={"course": "c1"}, timeout=10)
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"field": "course", "problem": "is not a parameter of this endpoint"}
    ]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{server.ws_url}/api/v1/ws?course=c1"):
            pass
    assert refused.value.response.status_code == 403
