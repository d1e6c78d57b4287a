"""Tokens, CORS, origins and limits against a real server and real clients."""

import httpx
import pytest
import websockets

from tests.e2e.clients import SseClient, WebSocketClient, event

INGEST, DASHBOARD = "ingest-secret-1", "dashboard-secret-1"


@pytest.fixture
def server(start_server):
    return start_server(
        INGEST_TOKENS=f"old-ingest,{INGEST}",
        DASHBOARD_TOKENS=DASHBOARD,
        CORS_ORIGINS="https://hub.uni.edu",
        MAX_STREAMS_PER_CLIENT="2",
    )


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/events", json=body, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "body"),
    [
        ({}, event(1)),
        ({"headers": {"authorization": "Bearer wrong"}}, event(1)),
        ({"headers": {"authorization": f"Basic {INGEST}"}}, event(1)),
        ({"params": {"token": "wrong"}}, event(1)),
        ({}, {"data": {"eventDetail": {}}, "params": {"token": "wrong"}}),
    ],
)
def test_ingest_without_a_valid_token_is_401_and_echoes_nothing(server, kwargs, body) -> None:
    response = post(server, body, **kwargs)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "wrong" not in response.text and INGEST not in response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"headers": {"authorization": f"Bearer {INGEST}"}},
        {"headers": {"authorization": "Bearer old-ingest"}},  # rotation: both work
        {"params": {"token": INGEST}},
    ],
)
def test_ingest_with_a_valid_token_is_stored(server, kwargs) -> None:
    assert post(server, event(1), **kwargs).status_code == 201


async def test_pioneer_envelope_token_is_accepted_and_never_stored(
    server, connect_dashboard
) -> None:
    body = {
        "data": {
            "eventDetail": {"eventName": "NotebookSaveEvent", "eventTime": 1795687200000},
            "notebookState": {"sessionID": "sess", "notebookPath": "hw.ipynb"},
        },
        "params": {"token": INGEST, "student_id": "ada"},
        "env": [],
    }
    response = post(server, body)
    assert response.status_code == 201, response.text
    replay = await connect_dashboard(SseClient(server.url, last_event_id=0, token=DASHBOARD))
    await replay.wait_for_ids([response.json()["events"][0]["id"]])
    assert replay.documents[0]["student_id"] == "ada"
    assert INGEST not in str(replay.documents)


async def test_dashboard_streams_need_a_token(server, connect_dashboard) -> None:
    refused = httpx.get(f"{server.url}/api/v1/stream", timeout=5)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    with pytest.raises(websockets.InvalidStatus) as error:
        async with websockets.connect(f"{server.ws_url}/api/v1/ws"):
            pass
    assert error.value.response.status_code == 403
    sse = await connect_dashboard(SseClient(server.url, token=DASHBOARD))
    ws = await connect_dashboard(WebSocketClient(server.ws_url, token=DASHBOARD))
    [receipt] = post(server, event(1), params={"token": INGEST}).json()["events"]
    await sse.wait_for_ids([receipt["id"]])
    await ws.wait_for_ids([receipt["id"]])


def test_session_cookie_opens_the_stream_for_event_source(server) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as browser:
        assert browser.post("/api/v1/session").status_code == 401
        login = browser.post("/api/v1/session", headers={"authorization": f"Bearer {DASHBOARD}"})
        assert login.status_code == 200
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        with browser.stream("GET", "/api/v1/stream") as stream:
            assert stream.status_code == 200


async def test_websocket_from_a_foreign_origin_is_refused(server) -> None:
    url = f"{server.ws_url}/api/v1/ws?token={DASHBOARD}"
    with pytest.raises(websockets.InvalidStatus) as error:
        async with websockets.connect(url, origin="https://evil.example"):
            pass
    assert error.value.response.status_code == 403
    async with websockets.connect(url, origin="https://hub.uni.edu"):
        pass


def test_cors_preflight_allows_only_configured_origins(server) -> None:
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    allowed = httpx.options(
        f"{server.url}/api/v1/events", headers={**preflight, "origin": "https://hub.uni.edu"}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://hub.uni.edu"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    denied = httpx.options(
        f"{server.url}/api/v1/events", headers={**preflight, "origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in denied.headers
    assert denied.status_code == 400 and denied.headers["content-type"] == "application/json"
    error = denied.json()["error"]
    assert error["code"] == "cors_refused" and "CORS_ORIGINS" in error["message"]


def test_open_ingest_answers_any_origin_but_reads_stay_same_origin(start_server) -> None:
    server = start_server()
    origin = {"origin": "https://jupyter.any.example"}
    preflight = httpx.options(
        f"{server.url}/api/v1/events",
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    response = httpx.post(f"{server.url}/api/v1/events", json=event(1), headers=origin)
    assert response.status_code == 201
    assert response.headers["access-control-allow-origin"] == "*"
    read = httpx.get(f"{server.url}/api/v1/events", headers=origin)
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    read_preflight = httpx.options(
        f"{server.url}/api/v1/students",
        headers={**origin, "access-control-request-method": "GET"},
    )
    assert read_preflight.status_code == 400
    assert read_preflight.json()["error"]["code"] == "cors_refused"


async def test_streams_per_token_are_limited(server, connect_dashboard) -> None:
    await connect_dashboard(SseClient(server.url, token=DASHBOARD))
    await connect_dashboard(WebSocketClient(server.ws_url, token=DASHBOARD))
    third = httpx.get(f"{server.url}/api/v1/stream", params={"token": DASHBOARD}, timeout=5)
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(f"{server.ws_url}/api/v1/ws?token={DASHBOARD}"):
            pass


def test_a_head_request_for_the_stream_gets_its_headers_and_frees_the_connection(server) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        head = client.head("/api/v1/stream", params={"token": DASHBOARD})
        assert head.status_code == 200
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.headers["x-content-type-options"] == "nosniff"
        # The same keep-alive connection answers the next request.
        assert client.get("/healthz").json()["clients"] == 0


def test_tokens_never_reach_the_logs(server) -> None:
    post(server, event(1), params={"token": INGEST})
    httpx.get(f"{server.url}/api/v1/stream", params={"token": "guess"}, timeout=5)
    logs = server.logs()
    assert "/api/v1/events?token=REDACTED" in logs
    assert INGEST not in logs and "guess" not in logs


def test_open_service_warns_once_at_start(start_server) -> None:
    server = start_server()
    assert server.logs().count("running open") == 1


def test_security_headers_on_responses(server) -> None:
    response = httpx.get(f"{server.url}/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'self'" in response.headers["content-security-policy"]
