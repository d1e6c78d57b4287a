"""A dashboard cut off by the service (send deadline, full queue) loses its connection at once,
even when it reads nothing: the socket and its descriptor are released, not left waiting for a
drain that never comes."""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Server, wait_for
from tests.e2e.clients import event, post_events

DASHBOARDS = 12
# Settings that get a dashboard which stopped reading cut off: by the send deadline, or by
# its queue filling up.
CUT_OFFS = {
    "send deadline": {"SEND_TIMEOUT_SECONDS": "1"},
    "full queue": {"CLIENT_QUEUE_LIMIT": "3", "SEND_TIMEOUT_SECONDS": "60"},
}


def open_descriptors(server: Server) -> int:
    assert server.process is not None
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def connected(server: Server) -> int:
    return httpx.get(f"{server.url}/healthz").json()["clients"]


@pytest.fixture
def stalled_dashboards() -> Iterator[Callable[[Server, bytes], None]]:
    """Dashboards that send their request and then never read a byte."""
    sockets: list[socket.socket] = []

    def connect(server: Server, request: bytes) -> None:
        for _ in range(DASHBOARDS):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(request)

    try:
        yield connect
    finally:
        for sock in sockets:
            sock.close()


SSE_REQUEST = b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
WEBSOCKET_REQUEST = (
    b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    + base64.b64encode(b"sixteen byte key")
    + b"\r\n\r\n"
)


@pytest.mark.parametrize("request_bytes", [SSE_REQUEST, WEBSOCKET_REQUEST], ids=["sse", "ws"])
@pytest.mark.parametrize("settings", CUT_OFFS.values(), ids=CUT_OFFS.keys())
async def test_a_cut_off_dashboard_that_reads_nothing_releases_its_socket(
    settings, request_bytes, start_server, stalled_dashboards
) -> None:
    server = start_server(**settings)
    before = open_descriptors(server)
    stalled_dashboards(server, request_bytes)
    await wait_for(lambda: connected(server) == DASHBOARDS)
    # Give or take the health checks' own connections, which come and go.
    assert open_descriptors(server) >= before + DASHBOARDS - 2
    for number in range(200):  # fill every buffer towards the dashboards until they are cut off
        await post_events(server.url, event(number, source="y" * 100_000))
        if connected(server) == 0:
            break
    await wait_for(lambda: connected(server) == 0, timeout=20)
    # Their sockets stay open on the client's side: only the server can have let go.
    await wait_for(lambda: open_descriptors(server) <= before + 2, timeout=5)
