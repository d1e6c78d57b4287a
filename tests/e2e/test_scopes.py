"""Scoped dashboard tokens on the streams, over real sockets to a deployed-like server
(PostgreSQL, Redis): live, replayed after an old id, and refused for another course."""

from __future__ import annotations

import httpx
import pytest
import websockets

from tests.conftest import wait_for
from tests.e2e.clients import SseClient, WebSocketClient, post_events

LEE, DUO, ALL, DS = "lee-secret-1", "duo-secret-2", "all-secret-3", "ds-secret-5"
TOKENS = f"lee={LEE}:cs101,duo={DUO}:cs101+ds200,root={ALL},ds={DS}:ds200"


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


ADMIN = "dpo-secret-4"


async def test_an_erasure_reaches_open_dashboards_of_every_process_and_is_never_replayed(
    production, connect_dashboard
) -> None:
    env = {"DASHBOARD_TOKENS": TOKENS, "ADMIN_TOKENS": f"dpo={ADMIN}"}
    first, second = production(**env), production(**env)
    ada = {"student_id": "ada", "course_id": "cs101", "event_type": "cell_executed"}
    bob = {"student_id": "bob", "course_id": "ds200", "event_type": "cell_executed"}
    stored = await post_events(first.url, ada, bob, ada)
    urls = {"sse": (SseClient, second.url), "ws": (WebSocketClient, second.ws_url)}
    dashboards = {}
    for name, token in (("lee", LEE), ("root", ALL)):
        for kind, (client, url) in urls.items():
            dashboard = client(url, last_event_id=0, token=token)
            dashboards[name, kind] = await connect_dashboard(dashboard)
    other = await connect_dashboard(SseClient(second.url, last_event_id=0, token=DS))
    await other.wait_for_ids([stored[1]["id"]])
    for (name, _), dashboard in dashboards.items():
        expected = [r["id"] for r in stored if name == "root" or r is not stored[1]]
        await dashboard.wait_for_ids(expected)
    response = httpx.delete(
        f"{first.url}/api/v1/students/ada", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["deleted"]["events"] == 2
    notice = {"type": "erased", "student_id": "ada", "course_id": "cs101"}
    for dashboard in dashboards.values():
        await wait_for(lambda d=dashboard: d.erasures == [notice])
    # Resuming from before ada's events replays nothing of hers, on either process.
    later = await post_events(first.url, bob, {**ada, "student_id": "cy"})
    for server in (first, second):
        resumed = await connect_dashboard(SseClient(server.url, last_event_id=0, token=ALL))
        await resumed.wait_for_ids([stored[1]["id"], *(receipt["id"] for receipt in later)])
        ws = await connect_dashboard(WebSocketClient(server.ws_url, last_event_id=0, token=LEE))
        await ws.wait_for_ids([later[1]["id"]])
    assert other.erasures == []  # ds200's dashboard is not told about a cs101 student
    logs = first.logs()
    [line] = [line for line in logs.splitlines() if '"action":"erase"' in line]
    assert '"token":"dpo"' in line and '"deleted":{"events":2' in line
    assert '"endpoint":"DELETE /api/v1/students/{student_id}"' in line and ADMIN not in logs
    assert "DELETE /api/v1/students/REDACTED HTTP/1.1" in logs  # uvicorn's own line
