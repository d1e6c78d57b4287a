"""The whole path under real uvicorn processes: POST -> storage -> bus -> SSE and WebSocket."""

import subprocess
import sys

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.clients import SseClient, WebSocketClient, event, post_events


async def test_posted_events_reach_sse_and_websocket_dashboards(
    production, connect_dashboard
) -> None:
    server = production()
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))
    receipts = await post_events(server.url, event(1, source="print('hi')"), event(2))
    ids = [receipt["id"] for receipt in receipts]
    await sse.wait_for_ids(ids)
    await ws.wait_for_ids(ids)
    assert sse.documents == ws.documents
    assert sse.documents[0]["source"] == "print('hi')"
    assert sse.documents[0]["event_id"] == "e1" and sse.documents[0]["student_id"] == "s1"
    assert sse.retry == 2000


async def test_same_event_id_twice_gives_one_row_and_one_message(
    production, connect_dashboard
) -> None:
    server = production()
    sse = await connect_dashboard(SseClient(server.url))
    first = await post_events(server.url, event(1))
    again = await post_events(server.url, event(1), event(2))
    assert again[0] == {**first[0], "duplicate": True}
    await sse.wait_for_ids([first[0]["id"], again[1]["id"]])
    replay = await connect_dashboard(SseClient(server.url, last_event_id=0))
    await replay.wait_for_ids([first[0]["id"], again[1]["id"]])


async def test_event_posted_to_one_dyno_reaches_dashboards_on_another(
    production, connect_dashboard
) -> None:
    web1, web2 = production(), production()
    sse = await connect_dashboard(SseClient(web2.url))
    ws = await connect_dashboard(WebSocketClient(web2.ws_url))
    receipts = await post_events(web1.url, event(1))
    receipts += await post_events(web2.url, event(2))
    ids = [receipt["id"] for receipt in receipts]
    await sse.wait_for_ids(ids)
    await ws.wait_for_ids(ids)


async def test_embedded_default_needs_no_server(start_server, connect_dashboard) -> None:
    server = start_server()
    health = httpx.get(f"{server.url}/healthz").json()
    assert (health["database"], health["bus"]) == ("up", "up")
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))
    ids = [receipt["id"] for receipt in await post_events(server.url, event(1), event(2))]
    await sse.wait_for_ids(ids)
    await ws.wait_for_ids(ids)
    assert (server.cwd / "telemetry.db").exists()


async def test_stream_filters_apply_server_side(production, connect_dashboard) -> None:
    server = production()
    by_student = await connect_dashboard(SseClient(server.url, student_id="s2"))
    by_type = await connect_dashboard(WebSocketClient(server.ws_url, event_type="help"))
    receipts = await post_events(
        server.url, event(1), event(2), event(5, event_type="help"), event(4, event_type="help")
    )
    await by_student.wait_for_ids([receipts[1]["id"], receipts[2]["id"]])
    await by_type.wait_for_ids([receipts[2]["id"], receipts[3]["id"]])


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DATABASE_URL", "mysql://u@h/d"), ("REDIS_URL", "http://h"), ("DATABASE_POOL_SIZE", "lots")],
)
def test_misconfiguration_fails_at_start_with_one_line(variable: str, value: str, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "telemetry:app", "--app-dir", str(REPO), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", variable: value},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert variable in line
