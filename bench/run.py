"""Rerunnable benchmark of the telemetry service against local PostgreSQL and Redis.

    .venv/bin/python bench/run.py [--quick]

Starts every server itself (the service, the no-op endpoint, nginx with nchan), drives the
load (wrk for ingest, bench/fanout.py for fan-out), checks that nothing was lost, and
prints one table of figures, same-run ratios and targets, also written to bench/results/.
Figures move up to 3x between runs on a shared 2-core machine: compare the ratios, which
are measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import classroom  # bench/classroom.py, beside this script
import redis.asyncio as aioredis

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
SERVICE_DB, CEILING_DB = "telemetry_bench", "telemetry_bench_ceiling"
SERVICE_CHANNEL = "telemetry:bench"
PORTS = {"service": 18700, "noop": 18701, "nchan": 18703}
WRK_CONNECTIONS = 32
FILE_LIMIT = 20_000
CEILING_ROWS, CEILING_CONNECTIONS = 100, 4


@dataclass(frozen=True)
class Plan:
    ingest_seconds: int
    # (name, SSE clients, WebSocket clients, events, events per second)
    fanouts: tuple[tuple[str, int, int, int, float], ...]


FULL = Plan(
    ingest_seconds=15,
    fanouts=(
        ("20/s", 1_000, 100, 600, 20.0),
        ("100/s", 1_000, 100, 1_500, 100.0),
        ("idle", 5_000, 0, 100, 5.0),
    ),
)
QUICK = Plan(
    ingest_seconds=5,
    fanouts=(
        ("20/s", 1_000, 100, 200, 20.0),
        ("100/s", 1_000, 100, 500, 100.0),
        ("idle", 5_000, 0, 30, 5.0),
    ),
)


# Processes


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(FILE_LIMIT, soft), hard), hard))


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def server(args: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None):
    """A server subprocess, ready once its port accepts, terminated then killed afterwards."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    process = subprocess.Popen(
        args, env={**os.environ, **(env or {})}, cwd=REPO_DIR, stdout=out, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            out.close()


def uvicorn(app: str, port: int, env: dict[str, str], log: Path):
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "3",
        "--backlog",
        "4096",
    ]
    return server(args, port, {"WEB_CONCURRENCY": "1", **env}, log)


def service_env(workers: int = 1) -> dict[str, str]:
    return {
        "DATABASE_URL": PG_URL.format(name=SERVICE_DB),
        "REDIS_URL": REDIS_URL,
        "NOTIFICATION_CHANNEL": SERVICE_CHANNEL,
        "LOG_LEVEL": "WARNING",
        # Every benchmark client comes from 127.0.0.1, one "client" to the stream limit.
        "MAX_STREAMS_PER_CLIENT": "10000",
        "WEB_CONCURRENCY": str(workers),
    }


# Database and bus checks


async def reset_database(name: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def count_rows(name: str, run_id: str) -> int:
    connection = await asyncpg.connect(PG_URL.format(name=name))
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM events WHERE event_id LIKE $1", run_id + "-%"
        )
    finally:
        await connection.close()


class PublishedCounter:
    """Counts one run's events published on a channel, by their event_id prefix."""

    def __init__(self, channel: str, run_id: str) -> None:
        self.channel = channel
        self.marker = b'"event_id":"%s-' % run_id.encode()
        self.count = 0

    async def run(self, ready: asyncio.Event) -> None:
        client = aioredis.from_url(REDIS_URL)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            ready.set()
            async for message in pubsub.listen():
                if message["type"] == "message":
                    self.count += message["data"].count(self.marker)
        finally:
            await pubsub.aclose()
            await client.aclose()


# Ingest


@dataclass(frozen=True)
class Load:
    """The files post.lua replays: classroom.write_load's events and help beats."""

    events: Path
    help: Path

    @classmethod
    def write(cls, directory: Path) -> Load:
        return cls(*classroom.write_load(directory))

    def env(self) -> dict[str, str]:
        return {"BENCH_EVENTS": str(self.events), "BENCH_HELP": str(self.help)}


def run_wrk(port: int, seconds: int, batch: int, run_id: str, load: Load) -> dict:
    args = [
        "wrk",
        "-t1",
        f"-c{WRK_CONNECTIONS}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "post.lua"),
        f"http://127.0.0.1:{port}/api/v1/events",
    ]
    env = {**os.environ, **load.env(), "BENCH_RUN": run_id, "BENCH_BATCH": str(batch)}
    output = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["events_per_s"] = result["acked"] * batch / (result["duration_us"] / 1e6)
    return result


async def measure_ingest(
    port: int, seconds: int, batch: int, run_id: str, stored: bool, load: Load
) -> dict:
    """wrk against one endpoint; for the service, count the rows and published events."""
    if not stored:
        return await asyncio.to_thread(run_wrk, port, seconds, batch, run_id, load)
    counter = PublishedCounter(SERVICE_CHANNEL, run_id)
    ready = asyncio.Event()
    listener = asyncio.create_task(counter.run(ready))
    await ready.wait()
    try:
        result = await asyncio.to_thread(run_wrk, port, seconds, batch, run_id, load)
        # Every acknowledged event was published before its reply; wait for Redis to hand
        # the last ones to the counter, and for POSTs still in flight when wrk stopped to
        # be stored and published too, polling with a deadline.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            result["stored"] = await count_rows(SERVICE_DB, run_id)
            result["published"] = counter.count
            if result["published"] == result["stored"] >= result["acked"] * batch:
                break
            await asyncio.sleep(0.1)
        result["lost"] = max(0, result["acked"] * batch - result["stored"])
        result["unpublished"] = max(0, result["stored"] - counter.count)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    return result


async def insert_ceiling(seconds: float, load: Load) -> dict:
    """PostgreSQL's own rate for 100-row INSERTs into an events-like table, from a few
    concurrent connections: what the ingest path could reach if Python cost nothing. The
    payloads are the load's events as posted."""
    await reset_database(CEILING_DB)
    url = PG_URL.format(name=CEILING_DB)
    setup = await asyncpg.connect(url)
    await setup.execute(
        "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " event_id text UNIQUE NOT NULL, student_id text NOT NULL, event_type text NOT NULL,"
        " received_at timestamptz NOT NULL DEFAULT now(), payload jsonb NOT NULL)"
    )
    await setup.close()
    statement = (
        "INSERT INTO events (event_id, student_id, event_type, payload)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])"
    )
    with open(load.events, encoding="utf-8") as lines:
        payloads = [line.strip() for _, line in zip(range(CEILING_ROWS), lines, strict=False)]
    rows = 0
    stop = time.monotonic() + seconds

    async def one(worker: int) -> None:
        nonlocal rows
        connection = await asyncpg.connect(url)
        try:
            counter = 0
            while time.monotonic() < stop:
                ids = [f"{worker}-{counter + n}" for n in range(CEILING_ROWS)]
                counter += CEILING_ROWS
                students = [f"student-{n % 500}" for n in range(CEILING_ROWS)]
                types = ["cell_executed"] * CEILING_ROWS
                await connection.execute(statement, ids, students, types, payloads)
                rows += CEILING_ROWS
        finally:
            await connection.close()

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(CEILING_CONNECTIONS)))
    return {"events_per_s": rows / (time.monotonic() - started), "rows": rows}


async def ingest_phase(plan: Plan, logs: Path, load: Load) -> dict[str, dict]:
    seconds, service = plan.ingest_seconds, PORTS["service"]
    results: dict[str, dict] = {}
    with uvicorn("bench.noop_app:app", PORTS["noop"], {}, logs / "noop.log"):
        run_wrk(PORTS["noop"], 2, 1, "warm-noop", load)
        results["noop"] = await measure_ingest(PORTS["noop"], seconds, 1, "noop", False, load)
        results["noop_batch"] = await measure_ingest(
            PORTS["noop"], seconds, 50, "noop-batch", False, load
        )
    with uvicorn("telemetry:app", service, service_env(), logs / "service.log"):
        run_wrk(service, 2, 1, "warm-service", load)
        results["single"] = await measure_ingest(service, seconds, 1, "single", True, load)
        results["batch"] = await measure_ingest(service, seconds, 50, "batch", True, load)
    with uvicorn("telemetry:app", service, service_env(2), logs / "service2.log"):
        run_wrk(service, 2, 1, "warm-two", load)
        results["two_workers"] = await measure_ingest(service, seconds, 1, "two", True, load)
    results["ceiling"] = await insert_ceiling(seconds, load)
    return results


# Fan-out


@contextlib.contextmanager
def nchan(logs: Path):
    prefix = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
    config = (BENCH_DIR / "nchan.conf").read_text()
    config = config.replace("{prefix}", str(prefix)).replace("{port}", str(PORTS["nchan"]))
    (prefix / "nginx.conf").write_text(config)
    args = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    try:
        with server(args, PORTS["nchan"], log=logs / "nchan.log") as process:
            yield process
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(prefix / "error.log", logs / "nchan-error.log")
        shutil.rmtree(prefix, ignore_errors=True)


def target_urls(name: str) -> list[str]:
    if name == "nchan":
        base = f"127.0.0.1:{PORTS['nchan']}"
        return [
            f"--post-url=http://{base}/pub",
            f"--sse-url=http://{base}/sub",
            f"--ws-url=ws://{base}/sub",
        ]
    return [f"--base=http://127.0.0.1:{PORTS['service']}"]


async def run_fanout(
    name: str, pid: int, sse: int, ws: int, events: int, rate: float, idle: bool, log: Path
) -> dict:
    """One fanout.py run against a server process: its RESULT plus CPU and memory figures."""
    args = [
        sys.executable,
        str(BENCH_DIR / "fanout.py"),
        *target_urls(name),
        f"--sse={sse}",
        f"--ws={ws}",
        f"--events={events}",
        f"--rate={rate}",
        f"--cpu=server={pid}",
        f"--label={name}",
    ]
    if idle:
        args.append(f"--rss={pid}")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    with open(log, "ab") as out:
        out.write(output)
    line = next((x for x in output.decode().splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"fanout.py against {name} gave no RESULT: see {log}")
    result = json.loads(line[len("RESULT ") :])
    transports = result["transports"].values()
    delivered = sum(t["delivered"] for t in transports)
    summary = {
        "clients": sse + ws,
        "rate": rate,
        "expected": sum(t["expected"] for t in transports),
        "delivered": delivered,
        "lost": sum(t["lost"] for t in transports),
        "duplicates": sum(t["duplicates"] for t in transports),
        "dropped": sum(t["dropped"] for t in transports),
        "p50_ms": max(t["latency_ms"]["p50"] or 0 for t in transports),
        "p99_ms": max(t["latency_ms"]["p99"] or 0 for t in transports),
        "cpu_s": result["cpu_s"]["server"],
        "cpu_share": result["cpu_share"]["server"],
        "us_per_delivery": 1e6 * result["cpu_s"]["server"] / delivered if delivered else None,
        "client_cpu_share": result["client"]["cpu_share"],
        "raw": result,
    }
    if idle and result.get("server_rss"):
        summary["kib_per_connection"] = result["server_rss"]["kib_per_connection"]
    return summary


async def fanout_phase(plan: Plan, logs: Path) -> dict[str, dict]:
    """Each scenario against a fresh service, then the same against nchan."""
    results: dict[str, dict] = {}
    for scenario, sse, ws, events, rate in plan.fanouts:
        idle = scenario == "idle"
        log = logs / "fanout.log"
        with uvicorn("telemetry:app", PORTS["service"], service_env(), logs / "service.log") as p:
            results[f"service {scenario}"] = await run_fanout(
                "service", p.pid, sse, ws, events, rate, idle, log
            )
        with nchan(logs) as p:
            results[f"nchan {scenario}"] = await run_fanout(
                "nchan", p.pid, sse, ws, events, rate, idle, log
            )
    return results


# Report


def check(ok: bool) -> str:
    return "yes" if ok else "NO"


def fanout_rows(r: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for scenario, p99_target in (("20/s", None), ("100/s", 100.0)):
        svc, nch = r[f"service {scenario}"], r[f"nchan {scenario}"]
        title = f"{svc['clients'] - 100:,} SSE + 100 WS, {svc['rate']:.0f} events/s"
        ratio = svc["p99_ms"] / nch["p99_ms"]
        target = (
            f"<= 3x nchan: {check(ratio <= 3)}"
            if p99_target is None
            else f"<= {p99_target:.0f} ms: {check(svc['p99_ms'] <= p99_target)}"
        )
        rows.append(
            (
                f"{title}, p50 / p99",
                f"{svc['p50_ms']:.1f} / {svc['p99_ms']:.1f} ms",
                f"nchan {nch['p50_ms']:.1f} / {nch['p99_ms']:.1f} ms",
                f"{ratio:.1f}x",
                target,
            )
        )
        cpu_ratio = svc["us_per_delivery"] / nch["us_per_delivery"]
        rows.append(
            (
                "  server CPU per client-event",
                f"{svc['us_per_delivery']:.1f} µs ({svc['cpu_share']:.2f} core)",
                f"nchan {nch['us_per_delivery']:.1f} µs ({nch['cpu_share']:.2f} core)",
                f"{cpu_ratio:.2f}x",
                f"<= 2x: {check(cpu_ratio <= 2)}, aim 1.5x: {check(cpu_ratio <= 1.5)}",
            )
        )
        rows.append(delivery_row(svc, nch))
    svc, nch = r["service idle"], r["nchan idle"]
    rows.append(
        (
            f"{svc['clients']:,} idle SSE, {svc['rate']:.0f} events/s, p50 / p99",
            f"{svc['p50_ms']:.1f} / {svc['p99_ms']:.1f} ms",
            f"nchan {nch['p50_ms']:.1f} / {nch['p99_ms']:.1f} ms",
            f"{svc['p99_ms'] / nch['p99_ms']:.1f}x",
            f"<= 250 ms: {check(svc['p99_ms'] <= 250)}",
        )
    )
    rows.append(
        (
            "  resident memory per connection",
            f"{svc['kib_per_connection']:.1f} KiB",
            f"nchan {nch['kib_per_connection']:.1f} KiB",
            f"{svc['kib_per_connection'] / nch['kib_per_connection']:.1f}x",
            f"<= 20 KiB: {check(svc['kib_per_connection'] <= 20)}",
        )
    )
    rows.append(delivery_row(svc, nch))
    return rows


def delivery_row(svc: dict, nch: dict) -> tuple[str, str, str, str, str]:
    clean = svc["lost"] == 0 and svc["duplicates"] == 0 and svc["dropped"] == 0
    return (
        "  delivered / lost / duplicates",
        f"{svc['delivered']:,} of {svc['expected']:,} / {svc['lost']} / {svc['duplicates']}",
        f"nchan {nch['delivered']:,} of {nch['expected']:,} / {nch['lost']} / {nch['duplicates']}",
        "",
        f"none lost: {check(clean)}",
    )


def ingest_rows(r: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    single, noop, batch, two, ceiling = (
        r["single"],
        r["noop"],
        r["batch"],
        r["two_workers"],
        r["ceiling"],
    )
    noop_ratio = single["rps"] / noop["rps"]
    noop_batch = r["noop_batch"]["events_per_s"]
    ceiling_ratio = batch["events_per_s"] / ceiling["events_per_s"]
    two_ratio = two["rps"] / single["rps"]
    rows = [
        (
            "single-event POSTs, req/s",
            f"{single['rps']:,.0f}",
            f"no-op {noop['rps']:,.0f}",
            f"{noop_ratio:.2f}x",
            f">= 0.20x: {check(noop_ratio >= 0.20)}, aim 0.40x: {check(noop_ratio >= 0.40)}",
        ),
        (
            "  p50 / p99",
            f"{single['p50_us'] / 1000:.1f} / {single['p99_us'] / 1000:.1f} ms",
            f"no-op {noop['p50_us'] / 1000:.1f} / {noop['p99_us'] / 1000:.1f} ms",
            "",
            f"p99 <= 25 ms: {check(single['p99_us'] <= 25_000)}",
        ),
        (
            "50-event batches, events/s",
            f"{batch['events_per_s']:,.0f} (p99 {batch['p99_us'] / 1000:.0f} ms)",
            f"PostgreSQL 100-row INSERTs {ceiling['events_per_s']:,.0f}",
            f"{ceiling_ratio:.2f}x",
            f">= 0.30x: {check(ceiling_ratio >= 0.30)}",
        ),
        (
            "  against the no-op, same batches",
            "",
            f"no-op {noop_batch:,.0f} events/s",
            f"{batch['events_per_s'] / noop_batch:.2f}x",
            "",
        ),
        (
            "WEB_CONCURRENCY=2, single-event req/s",
            f"{two['rps']:,.0f} ({two['rps'] / noop['rps']:.2f}x no-op, p99"
            f" {two['p99_us'] / 1000:.0f} ms)",
            f"one worker {single['rps']:,.0f}",
            f"{two_ratio:.2f}x",
            f">= 1x: {check(two_ratio >= 1)}",
        ),
    ]
    for name, result, batch_size in (
        ("single", single, 1),
        ("batches", batch, 50),
        ("two", two, 1),
    ):
        missing = result["lost"] + result["unpublished"]
        acked = result["acked"] * batch_size
        rows.append(
            (
                f"  {name}: acked / stored / published",
                f"{acked:,} / {result['stored']:,} / {result['published']:,}",
                "",
                "",
                f"none lost: {check(missing == 0)}",
            )
        )
    return rows


def render(rows: list[tuple[str, ...]], header: str) -> str:
    titles = ("measure", "figure", "same-run comparator", "ratio", "target")
    widths = [max(len(row[i]) for row in [titles, *rows]) for i in range(len(titles))]
    lines = [header, ""]
    for row in [titles, tuple("-" * w for w in widths), *rows]:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(lines)


def machine_line(plan: Plan) -> str:
    load = os.getloadavg()[0]
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, one uvicorn worker unless said, wrk -t1 "
        f"-c{WRK_CONNECTIONS} {plan.ingest_seconds}s per run, load average before {load:.2f}"
    )


def load_line(mix: dict) -> str:
    types = ", ".join(f"{count:,} {kind}" for kind, count in mix["types"].items())
    return (
        f"{mix['events']:,} cell-monitor-extension events replayed ({types}; {mix['errors']:,}"
        f" errors, {mix['tracebacks']:,} of them ANSI tracebacks; {mix['mean_bytes']} bytes"
        f" on average) from {classroom.STUDENTS} students, {classroom.CELL_COUNT} cells, plus"
        f" {classroom.HANDS} help beats every {classroom.HELP_BEAT_SECONDS} s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run")
    parser.add_argument("--only", choices=("ingest", "fanout"), help="run one phase only")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    raise_file_limit()
    header = machine_line(plan)
    results_dir = BENCH_DIR / "results"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    logs = results_dir / f"{stamp}-logs"
    logs.mkdir(parents=True)
    results: dict[str, dict] = {}
    rows = []
    await reset_database(SERVICE_DB)  # fan-out alone, on a new machine, needs it too
    if args.only != "fanout":
        with tempfile.TemporaryDirectory(prefix="bench-load-") as directory:
            load = Load.write(Path(directory))
            mix = classroom.describe(load.events)
            results.update(await ingest_phase(plan, logs, load))
        header += f"\nload: {load_line(mix)}"
        results["load"] = mix
        rows += ingest_rows(results)
    if args.only != "ingest":
        results.update(await fanout_phase(plan, logs))
        rows += fanout_rows(results)
    report = render(rows, header)
    print(report)
    (results_dir / f"{stamp}.txt").write_text(report + "\n")
    (results_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
