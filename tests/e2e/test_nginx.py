"""deploy/nginx.conf, as shipped, in front of a real uvicorn: POSTs, live SSE with resume and
WebSockets pass through it over TLS, and a client that stops half-way through its request
headers is cut off by the proxy."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Server, free_port
from tests.e2e.clients import SseClient, WebSocketClient, event

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HEADER_TIMEOUT_SECONDS = 1  # the shipped 10 s, shortened so the test does not wait for it


class Nginx:
    """Debian's nginx running deploy/nginx.conf with its ports and certificate swapped."""

    def __init__(self, upstream: Server, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ws_url = f"wss://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / "nginx.conf"
        self.config.write_text(self.render(upstream.port))
        self.process: subprocess.Popen[bytes] | None = None

    def render(self, upstream_port: int) -> str:
        certificate, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
            check=True, capture_output=True,
        )  # fmt: skip
        site = (REPO / "deploy" / "nginx.conf").read_text()
        swaps = {
            r"server 127\.0\.0\.1:8000;": f"server 127.0.0.1:{upstream_port};",
            r"listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
            r"listen 80;": f"listen 127.0.0.1:{free_port()};",
            r"listen \[::\]:\d+[^;]*;\n": "",
            r"ssl_certificate\s+\S+;": f"ssl_certificate {certificate};",
            r"ssl_certificate_key\s+\S+;": f"ssl_certificate_key {key};",
            r"client_header_timeout 10s;": f"client_header_timeout {HEADER_TIMEOUT_SECONDS}s;",
        }
        for pattern, replacement in swaps.items():
            site, count = re.subn(pattern, replacement, site)
            assert count, f"deploy/nginx.conf no longer has {pattern!r}"
        temp = self.workdir
        return f"""
daemon off;
pid {temp}/nginx.pid;
error_log {temp}/error.log info;
events {{}}
http {{
    access_log {temp}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    {site}
}}
"""

    def start(self) -> Nginx:
        command = [NGINX, "-p", str(self.workdir), "-c", str(self.config)]
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workdir / "error.log").read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def proxied(production, tmp_path: Path) -> Iterator[Callable[[], Nginx]]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is missing: `apt-get install -y nginx` (.ci/run does)", pytrace=False)
    proxies: list[Nginx] = []

    def start() -> Nginx:
        proxies.append(Nginx(production(), tmp_path).start())
        return proxies[-1]

    try:
        yield start
    finally:
        for proxy in proxies:
            proxy.stop()


async def post_through(proxy: Nginx, *events: dict) -> list[int]:
    async with httpx.AsyncClient(verify=False) as client:
        response = await client.post(f"{proxy.url}/api/v1/events", json=list(events))
    assert response.status_code == 201, response.text
    return [receipt["id"] for receipt in response.json()["events"]]


async def test_a_post_and_a_resumed_sse_stream_pass_through_the_proxy(
    proxied, connect_dashboard
) -> None:
    proxy = proxied()
    missed = await post_through(proxy, event(1), event(2))
    sse = await connect_dashboard(SseClient(proxy.url, last_event_id=missed[0], verify=False))
    await sse.wait_for_ids(missed[1:])
    live = await post_through(proxy, event(3))
    await sse.wait_for_ids(missed[1:] + live)


async def test_a_websocket_passes_through_the_proxy(proxied, connect_dashboard) -> None:
    proxy = proxied()
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    ws = await connect_dashboard(WebSocketClient(proxy.ws_url, ssl=insecure))
    live = await post_through(proxy, event(1))
    await ws.wait_for_ids(live)


async def test_a_client_stalled_in_its_request_headers_is_cut_off_by_the_proxy(proxied) -> None:
    proxy = proxied()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=ssl._create_unverified_context()
    )
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    await writer.drain()
    async with asyncio.timeout(HEADER_TIMEOUT_SECONDS + 5):
        assert await reader.read() == b""  # nginx closes without an answer (its 408 is silent)
    writer.close()
