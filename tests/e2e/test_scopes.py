"""Scoped dashboard tokens on the streams, over real sockets to a deployed-like server
(PostgreSQL, Redis): live, replayed after an old id, and refused for another course."""

from __future__ import annotations

import httpx
import pytest
import websockets

from tests.e2e.clients import SseClient, WebSocketClient, post_events

LEE, DUO, ALL = "lee-secret-1", "duo-secret-2", "all-secret-3"
TOKENS = f"lee={LEE}:cs101,duo={DUO}:cs101+ds200,root={ALL}"


@pytest.fixture
def server(production):
    return production(DASHBOARD_TOKENS=TOKENS)


def mixed_class(tag: str) -> list[dict]:
    """One event per course, one for no course, then a last one of cs101: a client that
    has it and nothing else unexpected was never sent the others (ids come in order)."""
    courses = ["ds200", "ma300", None, "cs101"]
    return [
        {"student_id": f"{tag}-{course}", "event_type": "cell_executed", "event_id": f"{tag}{n}"}
        | ({"course_id": course} if course else {})
        for n, course in enumerate(courses)
    ]


def ids_of_courses(receipts: list[dict], events: list[dict], courses: set) -> list[int]:
    return [r["id"] for r, e in zip(receipts, events, strict=True) if e.get("course_id") in courses]


@pytest.mark.parametrize("client_class", [SseClient, WebSocketClient])
async def test_scoped_streams_get_their_courses_live_and_on_resume(
    server, client_class, connect_dashboard
) -> None:
    url = server.url if client_class is SseClient else server.ws_url
    old = mixed_class("old")
    stored = await post_events(server.url, *old)
    # Resuming from an old id (0): the replay holds the token's courses only.
    lee = await connect_dashboard(client_class(url, last_event_id=0, token=LEE))
    duo = await connect_dashboard(client_class(url, last_event_id=0, token=DUO))
    root = await connect_dashboard(client_class(url, last_event_id=0, token=ALL))
    await lee.wait_for_ids(ids_of_courses(stored, old, {"cs101"}))
    await duo.wait_for_ids(ids_of_courses(stored, old, {"cs101", "ds200"}))
    await root.wait_for_ids([receipt["id"] for receipt in stored])
    live = mixed_class("live")
    posted = await post_events(server.url, *live)
    await lee.wait_for_ids(ids_of_courses(stored + posted, old + live, {"cs101"}))
    await duo.wait_for_ids(ids_of_courses(stored + posted, old + live, {"cs101", "ds200"}))
    await root.wait_for_ids([receipt["id"] for receipt in stored + posted])
    assert {document["course_id"] for document in lee.documents} == {"cs101"}


async def test_streams_for_another_course_or_its_student_are_refused(server) -> None:
    await post_events(server.url, *mixed_class("x"))
    for params in ({"course_id": "ds200"}, {"student_id": "x-ds200"}, {"student_id": "x-None"}):
        response = httpx.get(f"{server.url}/api/v1/stream", params={**params, "token": LEE})
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "out_of_scope"
        query = httpx.QueryParams({**params, "token": LEE})
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}/api/v1/ws?{query}"):
                pass
        assert refused.value.response.status_code == 403


async def test_stream_openings_are_logged_by_name_never_by_secret(
    server, connect_dashboard
) -> None:
    await connect_dashboard(SseClient(server.url, last_event_id=0, token=LEE))
    await connect_dashboard(WebSocketClient(server.ws_url, token=DUO))
    logs = server.logs()
    assert '"token":"lee"' in logs and '"endpoint":"GET /api/v1/stream"' in logs
    assert '"token":"duo"' in logs and '"endpoint":"WEBSOCKET /api/v1/ws"' in logs
    assert '"last_event_id":"0"' in logs
    assert LEE not in logs and DUO not in logs
