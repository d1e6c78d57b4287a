#!/usr/bin/env python3
"""Fan-out benchmark: M SSE + K WebSocket receivers, a paced publisher, loss and latency.

Opens M Server-Sent-Events connections (raw non-blocking sockets and a small HTTP/1.1 +
text/event-stream parser, chunked or not: cheap enough to hold thousands from one
process) and K WebSocket connections (the websockets package's Sans-I/O ClientProtocol
on the same sockets), waits until every receiver has seen a warm-up event, then POSTs
N events at R events/s, open loop: each POST leaves at its scheduled time, whatever
earlier POSTs are doing. Every receiver records the arrival of every event_id. Printed
per transport: delivered/expected (loss, duplicates) and end-to-end latency
p50/p95/p99/max, from just before the POST's bytes are written to the kernel's receive
timestamp of the event at the receiver.

Targets:
  the service                    --base http://127.0.0.1:8000  (+ --events-path,
                                 --stream-path, --ws-path to move the contract's paths)
  nchan                          --nchan http://127.0.0.1:8092  (POST /pub with the raw
                                 event JSON, GET /sub/sse, WS /sub/ws)
  anything else                  --post-url, --sse-url, --ws-url (override the above)

Example:
  .venv/bin/python bench/fanout.py --base http://127.0.0.1:8000 --sse 1000 --ws 100 \
      --events 500 --rate 100
The last line of output is "RESULT {json}" (also --json-out FILE).

Measuring thousands of streams from one Python process on 2 shared cores:
- arrival times are the kernel's receive timestamps (SO_TIMESTAMPNS), so the client's
  own queueing is not counted as server latency;
- up to --timed receivers per transport (spread evenly over the connection order) are
  read the moment data arrives and give the latency figures; the others are drained
  every --bulk-interval and count for delivery, loss and duplicates, with latency upper
  bounds only;
- the publisher shares the event loop: how late POSTs left their schedule, the loop lag
  and this process's CPU share are reported beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import select
import socket
import struct
import sys
import time
import uuid
from array import array
from datetime import UTC, datetime
from urllib.parse import urlsplit

from benchlib import cpu_snapshot, parse_cpu_specs, percentile, process_tree_rss_kib
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

EVENT_ID_BYTES = re.compile(rb'"event_id"\s*:\s*"([0-9A-Fa-f-]{36})"')
MAX_WARMUP = 400
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; equals SCM_TIMESTAMPNS
TIMESPEC = struct.Struct("@qq")
ANC_SIZE = socket.CMSG_SPACE(TIMESPEC.size)
READ_BUFFER = bytearray(65536)  # one event loop thread: one shared read buffer
READ_VIEW = memoryview(READ_BUFFER)
perf_counter = time.perf_counter


class Run:
    """The event ids of one run, their send times and POST outcomes."""

    def __init__(self, n_events: int) -> None:
        total = MAX_WARMUP + n_events
        self.n_events = n_events
        self.ids = [str(uuid.uuid4()) for _ in range(total)]
        self.index_bytes = {eid.encode(): i for i, eid in enumerate(self.ids)}
        self.sent_at = array("d", [0.0]) * total  # time.time() just before the POST
        self.status = array("i", [0]) * total  # HTTP status; -1 = request failed
        self.post_latency = array("d", [0.0]) * total
        self.post_errors: dict[str, int] = {}
        self.scheduled_at = array("d", [0.0]) * total  # perf_counter() the POST was due
        self.warmups_sent = 0
        self.schedule_lag: list[float] = []  # how late each measured POST left
        self.user_stamps = 0  # reads the kernel did not timestamp


class Transport:
    """Per-transport aggregates: arrival (event index, latency) pairs.

    Timed receivers are read the moment their bytes arrive: their latencies are
    exact and are the ones reported. Bulk receivers (beyond --timed per transport)
    are drained every --bulk-interval: they count for delivery, loss and duplicates,
    and their latencies are upper bounds only (a read stamps every event in it with
    the arrival time of its last packet).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[Receiver] = []
        self.idx = array("i")
        self.lat = array("d")
        self.bulk_idx = array("i")
        self.bulk_lat = array("d")
        self.connect_errors: dict[str, int] = {}


class BulkPoller:
    """Drains many sockets with one epoll_wait per interval instead of one wake-up per packet."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.epoll = select.epoll()
        self.receivers: dict[int, Receiver] = {}

    def add(self, receiver: Receiver) -> None:
        fd = receiver.sock.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.receivers[fd] = receiver

    def remove(self, receiver: Receiver) -> None:
        for fd, r in list(self.receivers.items()):
            if r is receiver:
                del self.receivers[fd]
                try:
                    self.epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            ready = self.epoll.poll(0)
            # In slices, so timed receivers and the publisher are never held up for long.
            for start in range(0, len(ready), 64):
                for fd, _ in ready[start : start + 64]:
                    receiver = self.receivers.get(fd)
                    if receiver is not None:
                        receiver._readable()
                await asyncio.sleep(0)


class Receiver:
    """One subscriber connection: a non-blocking socket read with recvmsg().

    Each read carries the kernel's receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME):
    the moment the bytes reached this machine's socket, not the moment this busy
    event loop got round to them, so thousands of receivers in one process do not
    add their own queueing to each other's latency. Where the kernel gives no
    timestamp, time.time() at read is used (timestamps reported as "user").
    """

    kind = ""

    def __init__(self, run: Run, transport: Transport) -> None:
        self.run = run
        self.transport = transport
        self.got = bytearray(len(run.ids))
        self.connected = False
        self.ready = False
        self.closed_at: float | None = None
        self.close_reason = ""
        self.duplicates = 0
        self.measured = 0  # measured events received (cheap completeness check)
        self.foreign = 0  # event ids we did not publish (other traffic on the channel)
        self.multi_event_reads = 0  # timed reads holding 2+ of our events share one timestamp
        self.sock: socket.socket | None = None
        self.bulk: BulkPoller | None = None  # None: a timed receiver
        self.loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future = self.loop.create_future()
        transport.receivers.append(self)

    async def open(self, host: str, port: int, timeout: float) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass
        self.sock = sock
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, (host, port)), timeout)
            await self.loop.sock_sendall(sock, self.opening_bytes())
            self.loop.add_reader(sock.fileno(), self._readable)
            await asyncio.wait_for(asyncio.shield(self.handshake), timeout)
        except BaseException:
            self.close()
            raise
        self.connected = True
        if self.bulk is not None and self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.bulk.add(self)

    def _readable(self) -> None:
        try:
            # recvmsg_into a shared buffer: recvmsg(n) would allocate n bytes per call.
            nbytes, ancdata, _, _ = self.sock.recvmsg_into([READ_BUFFER], ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(repr(exc))
            return
        if not nbytes:
            self._lost("closed by server")
            return
        data = READ_VIEW[:nbytes].tobytes()
        stamp = None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = TIMESPEC.unpack_from(cdata)
                stamp = sec + nsec * 1e-9
        if stamp is None:
            stamp = time.time()
            self.run.user_stamps += 1
        self.on_data(data, stamp)

    def _lost(self, reason: str) -> None:
        if self.closed_at is None:
            self.closed_at = time.time()
            self.close_reason = reason
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(reason))
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            if self.bulk is not None:
                self.bulk.remove(self)
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()
            self.sock = None

    def found(self, payload: bytes, end: int, stamp: float) -> None:
        """Deliver every event id in payload[:end]."""
        index = self.run.index_bytes
        mine = 0
        for match in EVENT_ID_BYTES.finditer(payload, 0, end):
            idx = index.get(match.group(1))
            if idx is None:
                self.foreign += 1
            else:
                mine += 1
                self.deliver(idx, stamp)
        if mine > 1 and self.bulk is None:
            self.multi_event_reads += 1

    def deliver(self, idx: int, stamp: float) -> None:
        if self.got[idx]:
            self.duplicates += 1
            return
        self.got[idx] = 1
        if idx < MAX_WARMUP:
            self.ready = True
            return
        sent = self.run.sent_at[idx]
        if sent:
            if self.bulk is None:
                self.transport.idx.append(idx)
                self.transport.lat.append(stamp - sent)
            else:
                self.transport.bulk_idx.append(idx)
                self.transport.bulk_lat.append(stamp - sent)
            self.measured += 1

    def opening_bytes(self) -> bytes:
        raise NotImplementedError

    def on_data(self, data: bytes, stamp: float) -> None:
        raise NotImplementedError


class SSEReceiver(Receiver):
    """HTTP/1.1 GET + text/event-stream parser; chunked or raw (read-until-close) bodies."""

    def __init__(self, run: Run, transport: Transport, request: bytes) -> None:
        super().__init__(run, transport)
        self.request = request
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.chunk_buf = b""
        self.data_left = 0
        self.crlf_left = 0
        self.sse_buf = b""

    def opening_bytes(self) -> bytes:
        return self.request

    def on_data(self, data: bytes, stamp: float) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail("response head over 64 KiB")
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.head = b""
            status_line, *lines = head.split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            try:
                status = int(status_line.split()[1])
            except (IndexError, ValueError):
                self._fail(f"bad status line {status_line!r}")
                return
            if status != 200:
                self._fail(f"HTTP {status}")
                return
            if "text/event-stream" not in headers.get("content-type", ""):
                self._fail(f"content-type {headers.get('content-type')!r}")
                return
            self.chunked = "chunked" in headers.get("transfer-encoding", "")
            self.in_body = True
            self.handshake.set_result(None)
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
        if data:
            self._feed_sse(data, stamp)

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.chunk_buf + data if self.chunk_buf else data
        out = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.data_left:
                piece = buf[pos : pos + self.data_left]
                out.append(piece)
                pos += len(piece)
                self.data_left -= len(piece)
                if not self.data_left:
                    self.crlf_left = 2
            elif self.crlf_left:
                skip = min(self.crlf_left, n - pos)
                pos += skip
                self.crlf_left -= skip
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
                pos = eol + 2
                if size == 0:  # last chunk: the server ended the stream
                    pos = n
                    break
                self.data_left = size
        self.chunk_buf = buf[pos:]
        return b"".join(out)

    def _feed_sse(self, data: bytes, stamp: float) -> None:
        # Events end at a blank line; "\r\n" line ends (sse-starlette's default) are
        # folded to "\n" first. A lone "\r" as line end is not supported.
        buf = self.sse_buf + data if self.sse_buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.sse_buf = buf
            return
        self.sse_buf = buf[end + 2 :]
        self.found(buf, end, stamp)


class WSReceiver(Receiver):
    """WebSocket client on the websockets package's Sans-I/O protocol (ClientProtocol)."""

    def __init__(self, run: Run, transport: Transport, url: str, deflate: bool) -> None:
        super().__init__(run, transport)
        extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        self.protocol = ClientProtocol(parse_uri(url), extensions=extensions, max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self.fragments: list[bytes] = []

    def opening_bytes(self) -> bytes:
        return b"".join(self.protocol.data_to_send())

    def on_data(self, data: bytes, stamp: float) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                    if event.fin and not self.fragments:
                        self.found(event.data, len(event.data), stamp)
                    else:
                        self.fragments.append(event.data)
                        if event.fin:
                            message = b"".join(self.fragments)
                            self.fragments.clear()
                            self.found(message, len(message), stamp)
            elif not self.handshake.done():  # the HTTP response to the upgrade
                if protocol.handshake_exc is not None:
                    self._fail(f"handshake: {protocol.handshake_exc}")
                    return
                self.handshake.set_result(None)
        outgoing = protocol.data_to_send()  # pongs, close frames
        if outgoing and self.sock is not None:
            payload = b"".join(d for d in outgoing if d)
            if payload:
                self.loop.create_task(self._send(payload))
            if not all(outgoing) or protocol.state is State.CLOSED:
                self._lost(f"closed by server ({protocol.close_code})")

    async def _send(self, payload: bytes) -> None:
        try:
            if self.sock is not None:
                await self.loop.sock_sendall(self.sock, payload)
        except OSError:
            pass

    def say_goodbye(self) -> None:
        """Send a close frame (best effort) so the server unregisters us promptly."""
        if self.sock is not None and self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            payload = b"".join(d for d in self.protocol.data_to_send() if d)
            try:
                self.sock.send(payload)
            except OSError:
                pass


def split_url(url: str) -> tuple[str, int, str, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    default_port = 443 if parts.scheme in ("https", "wss") else 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, parts.port or default_port, path, parts.netloc


def sse_request(url: str) -> bytes:
    _, _, path, netloc = split_url(url)
    return (
        f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nAccept: text/event-stream\r\n"
        "Cache-Control: no-cache\r\nUser-Agent: bench-fanout\r\n\r\n"
    ).encode()


async def open_receivers(
    make,
    url: str,
    count: int,
    transport: Transport,
    sem,
    timeout: float,
    timed: int,
    bulk: BulkPoller,
) -> None:
    """Open count receivers; every step-th one (timed receivers, evenly spread over the
    connection order, so over the server's fan-out order) is read as data arrives."""
    host, port, _, _ = split_url(url)
    step = max(1, -(-count // timed)) if timed else count + 1

    async def one(n: int) -> None:
        async with sem:
            receiver = make()
            if n % step:
                receiver.bulk = bulk
            try:
                await receiver.open(host, port, timeout)
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                transport.connect_errors[reason] = transport.connect_errors.get(reason, 0) + 1

    await asyncio.gather(*(one(n) for n in range(count)))


def event_body(event_id: str, students: int) -> bytes:
    event = {
        "event_id": event_id,
        "student_id": f"s{random.randint(1, students)}",
        "event_type": "cell_executed",
        "notebook_path": "lab1.ipynb",
        "cell_id": f"c{random.randint(1, 40)}",
        "source": "print(1)",
        "status": "ok",
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(event, separators=(",", ":")).encode()


class HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection for the publisher: one request at a time.

    Hand-rolled (like the SSE reader) so the send time is taken immediately before
    the request bytes are written, with no library code or event-loop turn between.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Future | None = None
        self.buf = b""
        self.closed = False
        self.status_at_close: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status_at_close is not None and exc is None:
            self._finish_with(self.status_at_close)
        self._finish_with(ConnectionError(repr(exc) if exc else "connection closed"))

    def _finish_with(self, result) -> None:
        if self.response is not None and not self.response.done():
            if isinstance(result, Exception):
                self.response.set_exception(result)
            else:
                self.response.set_result(result)

    def request(self, data: bytes) -> asyncio.Future:
        self.response = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.status_at_close = None
        self.transport.write(data)
        return self.response

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        body = self.buf[end + 4 :]
        status = int(head[0].split()[1])
        if status in (204, 304):
            pass  # no body by definition
        elif "content-length" in headers:
            if len(body) < int(headers["content-length"]):
                return
        elif "chunked" in headers.get("transfer-encoding", ""):
            if not body.endswith(b"0\r\n\r\n"):
                return
        else:
            self.status_at_close = status  # body ends when the server closes the connection
            return
        if headers.get("connection") == "close":
            self.transport.close()
        self._finish_with(status)


class Publisher:
    """POSTs event bodies over a small pool of raw keep-alive connections."""

    def __init__(self, url: str, size: int) -> None:
        self.host, self.port, self.path, self.netloc = split_url(url)
        self.size = size
        self.idle: asyncio.Queue[HTTPConnection] = asyncio.Queue()
        self.all: list[HTTPConnection] = []

    async def _connect(self) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(HTTPConnection, self.host, self.port)
        conn.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.all.append(conn)
        return conn

    async def start(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await self._connect())

    def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()

    async def post(self, run: Run, idx: int, students: int) -> None:
        body = event_body(run.ids[idx], students)
        data = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: bench-fanout\r\n\r\n"
        ).encode() + body
        conn = await self.idle.get()
        try:
            if conn.closed:
                conn = await self._connect()
            started = perf_counter()
            run.sent_at[idx] = time.time()
            if run.scheduled_at[idx]:
                run.schedule_lag.append(started - run.scheduled_at[idx])
            pending = conn.request(data)
            run.status[idx] = await asyncio.wait_for(pending, 30)
            run.post_latency[idx] = perf_counter() - started
        except Exception as exc:
            run.status[idx] = -1
            reason = str(exc) or type(exc).__name__
            run.post_errors[reason] = run.post_errors.get(reason, 0) + 1
            if conn.transport is not None:
                conn.transport.close()
            conn.closed = True
        finally:
            self.idle.put_nowait(conn)


async def lag_monitor(samples: list[float], stop: asyncio.Event, interval: float = 0.01) -> None:
    while not stop.is_set():
        t0 = perf_counter()
        await asyncio.sleep(interval)
        samples.append(perf_counter() - t0 - interval)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize_transport(tr: Transport, run: Run, acked: set[int], end_time: float) -> dict:
    receivers = tr.receivers
    connected = [r for r in receivers if r.connected]
    expected = len(acked) * len(connected)
    pairs = [(i, lat) for i, lat in zip(tr.idx, tr.lat, strict=True) if i in acked]
    lats = sorted(lat for _, lat in pairs)
    bulk_lats = sorted(lat for i, lat in zip(tr.bulk_idx, tr.bulk_lat, strict=True) if i in acked)
    delivered = len(pairs) + len(bulk_lats)
    timed = [r for r in connected if r.bulk is None]
    measured = range(MAX_WARMUP, MAX_WARMUP + run.n_events)
    complete = sum(1 for r in connected if all(r.got[i] for i in acked))
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for i, lat in pairs:
        if lat < first.get(i, float("inf")):
            first[i] = lat
        if lat > last.get(i, float("-inf")):
            last[i] = lat
    firsts, lasts = sorted(first.values()), sorted(last.values())
    return {
        "transport": tr.name,
        "requested": len(receivers),
        "connected": len(connected),
        "timed_receivers": len(timed),
        "connect_errors": tr.connect_errors,
        "ready": sum(1 for r in connected if r.ready),
        "dropped": sum(1 for r in connected if r.closed_at is not None and r.closed_at <= end_time),
        "drop_reasons": sorted({r.close_reason for r in connected if r.closed_at is not None})[:5],
        "complete_receivers": complete,
        "expected": expected,
        "delivered": delivered,
        "delivery_ratio": round(delivered / expected, 6) if expected else None,
        "lost": expected - delivered,
        "duplicates": sum(r.duplicates for r in receivers),
        "multi_event_reads": sum(r.multi_event_reads for r in receivers),
        "foreign_events": sum(r.foreign for r in receivers),
        "delivered_unacked": sum(
            1 for r in connected for i in measured if r.got[i] and i not in acked
        ),
        "latency_ms": {
            "p50": ms(percentile(lats, 50)),
            "p95": ms(percentile(lats, 95)),
            "p99": ms(percentile(lats, 99)),
            "max": ms(lats[-1] if lats else None),
            "mean": ms(sum(lats) / len(lats) if lats else None),
        },
        # Bulk receivers: each read is stamped with its last packet's arrival, so these
        # are upper bounds; they show a slow tail the timed sample could miss.
        "bulk_latency_upper_ms": {
            "p99": ms(percentile(bulk_lats, 99)),
            "max": ms(bulk_lats[-1] if bulk_lats else None),
        },
        # Per event, over timed receivers: when the first and the last got it (fan-out spread).
        "first_receiver_ms": {"p50": ms(percentile(firsts, 50)), "p99": ms(percentile(firsts, 99))},
        "last_receiver_ms": {"p50": ms(percentile(lasts, 50)), "p99": ms(percentile(lasts, 99))},
    }


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        sys.exit(
            f"need {needed} file descriptors, the hard limit allows {soft}: raise it (ulimit -Hn)"
        )
    return soft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    t = p.add_argument_group("target")
    t.add_argument("--base", default="http://127.0.0.1:8000", help="project-style server base URL")
    t.add_argument("--events-path", default="/api/v1/events")
    t.add_argument("--stream-path", default="/api/v1/stream")
    t.add_argument("--ws-path", default="/api/v1/ws")
    t.add_argument("--nchan", metavar="BASE", help="nchan base URL: /pub, /sub/sse, /sub/ws")
    t.add_argument("--post-url", help="overrides the publish URL")
    t.add_argument("--sse-url", help="overrides the SSE URL")
    t.add_argument("--ws-url", help="overrides the WebSocket URL (ws://...)")
    load = p.add_argument_group("load")
    load.add_argument("--sse", type=int, default=100, help="SSE connections M (default 100)")
    load.add_argument("--ws", type=int, default=100, help="WebSocket connections K (default 100)")
    load.add_argument("--events", type=int, default=200, help="measured events N (default 200)")
    load.add_argument("--rate", type=float, default=20.0, help="events per second R (default 20)")
    load.add_argument("--students", type=int, default=30, help="student id pool for posted events")
    load.add_argument(
        "--publish-concurrency",
        type=int,
        default=64,
        help="publisher connections (max concurrent POSTs)",
    )
    load.add_argument(
        "--timed",
        type=int,
        default=100,
        help="receivers per transport read the moment data arrives, spread evenly over the "
        "connection order; their latencies are the reported ones (default 100)",
    )
    load.add_argument(
        "--bulk-interval",
        type=float,
        default=0.05,
        help="the other receivers are drained this often (s); they count delivery and loss",
    )
    load.add_argument(
        "--connect-concurrency", type=int, default=100, help="connections opened at once"
    )
    load.add_argument("--connect-timeout", type=float, default=30.0)
    load.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="how long warm-up events are posted until every receiver has seen one",
    )
    load.add_argument(
        "--drain-timeout", type=float, default=10.0, help="wait after the last POST for stragglers"
    )
    load.add_argument(
        "--ws-deflate",
        action="store_true",
        help="negotiate permessage-deflate like a browser (default off)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--label", default="")
    o.add_argument(
        "--cpu",
        action="append",
        default=[],
        metavar="NAME=PID[,PID]",
        help="report CPU seconds of these processes and their children during "
        "the measured phase; repeatable (e.g. server=123 backend=456,789)",
    )
    o.add_argument(
        "--rss",
        metavar="PID[,PID]",
        help="server process (tree) whose resident memory to sample before connecting, once all "
        "receivers are connected and idle, and at the end: reports KiB per connection",
    )
    o.add_argument("--json-out")
    o.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)

    base = args.base.rstrip("/")
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    if args.nchan:
        nb = args.nchan.rstrip("/")
        post, sse, ws = nb + "/pub", nb + "/sub/sse", "ws" + nb[4:] + "/sub/ws"
    else:
        post, sse, ws = base + args.events_path, base + args.stream_path, ws_base + args.ws_path
    args.post_url = args.post_url or post
    args.sse_url = args.sse_url or sse
    args.ws_url = args.ws_url or ws
    # Bounded by design: a run cannot exceed these whatever the options say.
    if not (0 <= args.sse <= 5000 and 0 <= args.ws <= 5000):
        p.error("--sse and --ws must be within 0..5000")
    if not (1 <= args.events <= 100_000 and 0.1 <= args.rate <= 10_000):
        p.error("--events must be 1..100000 and --rate 0.1..10000")
    if args.events / args.rate > 600:
        p.error("--events / --rate must be at most 600 s")
    for name in ("connect_timeout", "ready_timeout", "drain_timeout"):
        if not 0 < getattr(args, name) <= 120:
            p.error(f"--{name.replace('_', '-')} must be within (0, 120] s")
    return args


async def bench(args: argparse.Namespace) -> dict:
    run = Run(args.events)
    sse, ws = Transport("sse"), Transport("ws")
    sem = asyncio.Semaphore(args.connect_concurrency)
    started = time.time()

    rss_pids = [int(p) for p in args.rss.split(",") if p] if args.rss else []
    rss = {"before_kib": process_tree_rss_kib(rss_pids)} if rss_pids else None
    t0 = perf_counter()
    request = sse_request(args.sse_url)
    bulk = BulkPoller(args.bulk_interval)
    bulk_task = asyncio.create_task(bulk.run())
    await asyncio.gather(
        open_receivers(
            lambda: SSEReceiver(run, sse, request),
            args.sse_url,
            args.sse,
            sse,
            sem,
            args.connect_timeout,
            args.timed,
            bulk,
        ),
        open_receivers(
            lambda: WSReceiver(run, ws, args.ws_url, args.ws_deflate),
            args.ws_url,
            args.ws,
            ws,
            sem,
            args.connect_timeout,
            args.timed,
            bulk,
        ),
    )
    connect_s = perf_counter() - t0
    receivers = [r for r in sse.receivers + ws.receivers if r.connected]
    if rss is not None:
        await asyncio.sleep(1.0)  # idle: let the server finish setting the connections up
        rss["connected_kib"] = process_tree_rss_kib(rss_pids)
        rss["kib_per_connection"] = (
            round((rss["connected_kib"] - rss["before_kib"]) / len(receivers), 2)
            if receivers
            else None
        )
    print(
        f"connected: sse {sum(r.connected for r in sse.receivers)}/{args.sse}, "
        f"ws {sum(r.connected for r in ws.receivers)}/{args.ws} in {connect_s:.1f} s"
        + (
            f"; errors sse={sse.connect_errors} ws={ws.connect_errors}"
            if sse.connect_errors or ws.connect_errors
            else ""
        ),
        flush=True,
    )

    publisher = Publisher(args.post_url, args.publish_concurrency)
    try:
        await publisher.start()
    except OSError as exc:
        sys.exit(f"cannot connect to the publish URL {args.post_url}: {exc}")
    # Warm-up: post until every connected receiver has seen one (subscription live
    # end to end), at most --ready-timeout seconds.
    t0 = perf_counter()
    deadline = t0 + args.ready_timeout
    while run.warmups_sent < MAX_WARMUP and perf_counter() < deadline:
        idx = run.warmups_sent
        run.warmups_sent += 1
        await publisher.post(run, idx, args.students)
        wait_until = perf_counter() + 0.25
        while perf_counter() < wait_until and not all(r.ready for r in receivers):
            await asyncio.sleep(0.01)
        if all(r.ready for r in receivers) and run.warmups_sent >= 3:
            break
    ready_s = perf_counter() - t0
    warm_status = [run.status[i] for i in range(run.warmups_sent)]
    print(
        f"ready: {sum(r.ready for r in receivers)}/{len(receivers)} receivers after "
        f"{run.warmups_sent} warm-up events ({ready_s:.1f} s); warm-up POST statuses "
        f"{sorted(set(warm_status))}",
        flush=True,
    )
    await asyncio.sleep(0.5)  # let the warm-up traffic drain

    # Measured phase: open-loop publisher at --rate.
    lag: list[float] = []
    stop_lag = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(lag, stop_lag))
    cpu0_self = resource.getrusage(resource.RUSAGE_SELF)
    cpu_groups = parse_cpu_specs(args.cpu)
    cpu0 = cpu_snapshot(cpu_groups)
    t_start = perf_counter()
    tasks = []
    for k in range(args.events):
        target = t_start + k / args.rate
        delay = target - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        idx = MAX_WARMUP + k
        run.scheduled_at[idx] = target
        tasks.append(asyncio.create_task(publisher.post(run, idx, args.students)))
    t_last_send = perf_counter()
    await asyncio.gather(*tasks)
    t_posts_done = perf_counter()

    acked = {i for i in range(MAX_WARMUP, MAX_WARMUP + args.events) if 200 <= run.status[i] < 300}
    deadline = perf_counter() + args.drain_timeout
    while perf_counter() < deadline:
        if all(r.measured >= len(acked) for r in receivers if r.closed_at is None):
            break
        await asyncio.sleep(0.02)
    t_end = perf_counter()
    t_end_wall = time.time()
    cpu1_self = resource.getrusage(resource.RUSAGE_SELF)
    cpu1 = cpu_snapshot(cpu_groups)
    if rss is not None:
        rss["end_kib"] = process_tree_rss_kib(rss_pids)
    stop_lag.set()
    await monitor
    publisher.close()

    wall = t_end - t_start
    client_cpu = (cpu1_self.ru_utime + cpu1_self.ru_stime) - (
        cpu0_self.ru_utime + cpu0_self.ru_stime
    )
    measured = range(MAX_WARMUP, MAX_WARMUP + args.events)
    statuses: dict[str, int] = {}
    for i in measured:
        statuses[str(run.status[i])] = statuses.get(str(run.status[i]), 0) + 1
    post_lats = sorted(run.post_latency[i] for i in measured if run.status[i] > 0)
    lag.sort()
    result = {
        "label": args.label,
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "urls": {
            "post": args.post_url,
            "sse": args.sse_url if args.sse else None,
            "ws": args.ws_url if args.ws else None,
        },
        "config": {
            k: getattr(args, k)
            for k in (
                "sse",
                "ws",
                "events",
                "rate",
                "students",
                "publish_concurrency",
                "ws_deflate",
            )
        },
        "connect_s": round(connect_s, 2),
        "ready_s": round(ready_s, 2),
        "publish": {
            "events": args.events,
            "acked_2xx": len(acked),
            "statuses": statuses,
            "errors": run.post_errors,
            "achieved_rate": round((args.events - 1) / (t_last_send - t_start), 2)
            if args.events > 1
            else None,
            "post_latency_ms": {
                "p50": ms(percentile(post_lats, 50)),
                "p99": ms(percentile(post_lats, 99)),
                "max": ms(post_lats[-1] if post_lats else None),
            },
            "posts_done_s": round(t_posts_done - t_start, 2),
            # How late POSTs left against the open-loop schedule (client or pool saturated).
            "schedule_lag_ms": {
                "p99": ms(percentile(sorted(run.schedule_lag), 99)),
                "max": ms(max(run.schedule_lag, default=None)),
            },
        },
        "transports": {},
        "client": {
            "loop_lag_ms": {
                "p50": ms(percentile(lag, 50)),
                "p99": ms(percentile(lag, 99)),
                "max": ms(lag[-1] if lag else None),
            },
            "cpu_s": round(client_cpu, 3),
            "cpu_share": round(client_cpu / wall, 3),
        },
        "cpu_s": {name: round(cpu1[name] - cpu0[name], 3) for name in cpu1},
        "cpu_share": {name: round((cpu1[name] - cpu0[name]) / wall, 3) for name in cpu1},
        "measured_wall_s": round(wall, 2),
        "timestamps": "kernel" if run.user_stamps == 0 else f"user for {run.user_stamps} reads",
        "server_rss": rss,
    }
    for tr, count in ((sse, args.sse), (ws, args.ws)):
        if count:
            summary = summarize_transport(tr, run, acked, t_end_wall)
            summary["requested"] = count
            result["transports"][tr.name] = summary

    # Close everything so the server sees the clients leave before the next test.
    for r in ws.receivers:
        r.say_goodbye()
    await asyncio.sleep(0.3)
    for r in sse.receivers + ws.receivers:
        r.close()
    bulk_task.cancel()
    await asyncio.sleep(0.2)
    return result


def print_report(result: dict) -> None:
    pub = result["publish"]
    print(
        f"published {pub['events']} events at {pub['achieved_rate']} /s: "
        f"{pub['acked_2xx']} acked 2xx "
        f"(statuses {pub['statuses']}{', errors ' + str(pub['errors']) if pub['errors'] else ''}); "
        f"POST latency p50 {pub['post_latency_ms']['p50']} ms, "
        f"p99 {pub['post_latency_ms']['p99']} ms; "
        f"sends late by p99 {pub['schedule_lag_ms']['p99']} ms"
    )
    for name, tr in result["transports"].items():
        lat = tr["latency_ms"]
        ratio = tr["delivery_ratio"]
        print(
            f"{name:>3}: {tr['connected']}/{tr['requested']} connected, {tr['ready']} ready, "
            f"{tr['dropped']} dropped; delivered {tr['delivered']}/{tr['expected']}"
            f" ({'n/a' if ratio is None else f'{100 * ratio:.2f}%'}), dup {tr['duplicates']}; "
            f"latency ms p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']}; "
            f"per event first/last receiver p50 "
            f"{tr['first_receiver_ms']['p50']}/{tr['last_receiver_ms']['p50']} ms "
            f"(latency from {tr['timed_receivers']} timed receivers"
            + (
                f"; bulk upper bound p99 {tr['bulk_latency_upper_ms']['p99']} "
                f"max {tr['bulk_latency_upper_ms']['max']} ms)"
                if tr["timed_receivers"] < tr["connected"]
                else ")"
            )
        )
        if tr["connect_errors"]:
            print(f"     connect errors: {tr['connect_errors']}")
    c = result["client"]
    server = "".join(
        f", {name} CPU {secs} s ({100 * result['cpu_share'][name]:.0f}% of a core)"
        for name, secs in result["cpu_s"].items()
    )
    if result.get("server_rss"):
        r = result["server_rss"]
        print(
            f"server RSS: {r['before_kib'] / 1024:.1f} MiB before, "
            f"{r['connected_kib'] / 1024:.1f} MiB "
            f"with every receiver connected ({r['kib_per_connection']} KiB per connection), "
            f"{r['end_kib'] / 1024:.1f} MiB at the end"
        )
    print(
        f"client: loop lag p99 {c['loop_lag_ms']['p99']} ms max {c['loop_lag_ms']['max']} ms, "
        f"CPU {c['cpu_s']} s ({100 * c['cpu_share']:.0f}% of a core "
        f"over {result['measured_wall_s']} s){server}"
    )


def main() -> int:
    args = parse_args()
    raise_fd_limit(args.sse + args.ws + args.publish_concurrency + 64)
    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    result = runner(bench(args))
    print_report(result)
    line = json.dumps(result, separators=(",", ":"))
    print("RESULT " + line)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
