"""Fan-out load for bench/run.py: SSE and WebSocket subscribers, a paced publisher, and the
latency of every delivery (POST sent to event received, one monotonic clock, this process).

Each published event carries `bench_seq` and `sent_at_ns`; the service keeps them in `extra`
and nchan passes the body through, so one regular expression reads both servers' streams.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import dataclass

import httpx
import orjson

# The closing brace keeps a number cut by a TCP read from matching.
MARKER = re.compile(rb'"bench_seq":(\d+),"sent_at_ns":(\d+)\}')
CONNECT_WAVE = 250
WS_KEY = base64.b64encode(b"bench-fanout-key").decode()


@dataclass
class Target:
    """Where to subscribe and publish: the service or nchan."""

    name: str
    port: int
    sse_path: str
    ws_path: str
    publish_path: str
    ready_marker: bytes  # what an SSE stream sends once the subscription is live


class Subscriber(asyncio.Protocol):
    """A raw SSE or WebSocket client that only timestamps what it reads.

    With 1,100 clients in one Python process on two cores, parsing on arrival would make the
    client the bottleneck, so reads are kept as (arrival time, bytes) and scanned afterwards.
    Neither SSE frames, HTTP chunk headers nor unmasked WebSocket frame headers can fall
    inside a marker, so scanning the raw bytes needs no protocol decoding.
    """

    def __init__(self, request: bytes, ready_marker: bytes) -> None:
        self.request = request
        self.ready_marker = ready_marker
        self.ready = asyncio.Event()
        self.reads: list[tuple[int, bytes]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.reads.append((time.monotonic_ns(), data))
        if not self.ready.is_set() and self.ready_marker in b"".join(d for _, d in self.reads):
            self.ready.set()

    def deliveries(self, events: int) -> tuple[int, list[int]]:
        """How many distinct events arrived, and each one's latency in nanoseconds."""
        seen = bytearray(events)
        latencies, carry = [], b""
        for arrived, data in self.reads:
            text, end = carry + data, 0
            for match in MARKER.finditer(text):
                seq, end = int(match[1]), match.end()
                if seq < events and not seen[seq]:
                    seen[seq] = 1
                    latencies.append(arrived - int(match[2]))
            carry = text[end:]
        return len(latencies), latencies


def sse_request(target: Target) -> bytes:
    return (
        f"GET {target.sse_path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()


def ws_request(target: Target) -> bytes:
    return (
        f"GET {target.ws_path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_subscriber(target: Target, websocket: bool) -> Subscriber:
    request = ws_request(target) if websocket else sse_request(target)
    marker = b" 101 " if websocket else target.ready_marker
    loop = asyncio.get_running_loop()
    _, subscriber = await loop.create_connection(
        lambda: Subscriber(request, marker), "127.0.0.1", target.port
    )
    return subscriber


def event_body(seq: int, run_id: str) -> bytes:
    # Key order matters: MARKER expects bench_seq right before sent_at_ns.
    return orjson.dumps(
        {
            "event_id": f"{run_id}-{seq}",
            "student_id": f"student-{seq % 50}",
            "event_type": "cell_executed",
            "course_id": "course-1",
            "source": "print('hello')",
            "status": "ok",
            "bench_seq": seq,
            "sent_at_ns": time.monotonic_ns(),
        }
    )


async def publish(target: Target, events: int, rate: float, run_id: str) -> int:
    """POST `events` events at `rate` per second on a fixed schedule; return the acked count."""
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", limits=limits) as http:

        async def post(seq: int) -> bool:
            response = await http.post(
                target.publish_path,
                content=event_body(seq, run_id),
                headers={"Content-Type": "application/json"},
            )
            return response.status_code < 300

        start = time.monotonic()
        posts = []
        for seq in range(events):
            await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))
            posts.append(asyncio.ensure_future(post(seq)))
        return sum(await asyncio.gather(*posts))


async def connect_all(target: Target, sse: int, ws: int) -> list[Subscriber]:
    """Open every subscription in waves (the listen backlog is finite); wait until live."""
    kinds = [False] * sse + [True] * ws
    subscribers: list[Subscriber] = []
    for start in range(0, len(kinds), CONNECT_WAVE):
        wave = kinds[start : start + CONNECT_WAVE]
        subscribers += await asyncio.gather(*(open_subscriber(target, kind) for kind in wave))
    await asyncio.wait_for(asyncio.gather(*(each.ready.wait() for each in subscribers)), 60)
    return subscribers


def close_all(subscribers: list[Subscriber]) -> None:
    for subscriber in subscribers:
        if subscriber.transport is not None:
            subscriber.transport.close()


def percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def measure_fanout(
    target: Target, sse: int, ws: int, events: int, rate: float, run_id: str
) -> dict:
    """Subscribe sse + ws clients, publish `events` at `rate`/s, and report what arrived."""
    subscribers = await connect_all(target, sse, ws)
    await asyncio.sleep(1.0)  # let every subscription settle before the first event
    acked = await publish(target, events, rate, run_id)
    await asyncio.sleep(3.0)  # the last events' delivery
    close_all(subscribers)
    counts, latencies = [], []
    for subscriber in subscribers:
        count, own = subscriber.deliveries(events)
        counts.append(count)
        latencies += own
    latencies.sort()
    expected = acked * len(subscribers)
    return {
        "clients": len(subscribers),
        "events": events,
        "acked": acked,
        "expected": expected,
        "received": len(latencies),
        "lost": expected - len(latencies),
        "incomplete_clients": sum(1 for count in counts if count < acked),
        "p50_ms": percentile(latencies, 0.50) / 1e6,
        "p99_ms": percentile(latencies, 0.99) / 1e6,
        "max_ms": (latencies[-1] / 1e6) if latencies else float("nan"),
    }


def resident_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def measure_idle(target: Target, pid: int, clients: int) -> dict:
    """Resident memory of `pid` before and after `clients` idle SSE subscriptions."""
    close_all(await connect_all(target, 100, 0))  # warm the code paths first
    await asyncio.sleep(1.0)
    before = resident_kb(pid)
    subscribers = await connect_all(target, clients, 0)
    await asyncio.sleep(2.0)
    after = resident_kb(pid)
    close_all(subscribers)
    return {
        "clients": clients,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_client": (after - before) / clients,
    }
