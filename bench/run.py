"""Rerunnable benchmark of the telemetry service against local PostgreSQL and Redis.

    /work/venv/bin/python bench/run.py [--quick]

Starts every server itself (the service, the no-op and one-transaction-per-request
comparators, nginx with nchan), drives the load (wrk for ingest, bench/fanout.py for
fan-out), checks that nothing was lost, and prints one table of figures and same-run
ratios, also written to bench/results/. Figures move up to 3x between runs on a 2-core
machine: compare the ratios, which are measured in the same run.
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
import redis.asyncio as aioredis

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import fanout  # noqa: E402

PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
SERVICE_DB, NAIVE_DB = "telemetry_bench", "telemetry_bench_naive"
SERVICE_CHANNEL, NAIVE_CHANNEL = "telemetry:bench", "telemetry:naive"
PORTS = {"service": 18700, "noop": 18701, "naive": 18702, "nchan": 18703}
WRK_CONNECTIONS = 32
FILE_LIMIT = 20_000


@dataclass(frozen=True)
class Plan:
    ingest_seconds: int
    fanout_events: int
    sse_clients: int
    ws_clients: int
    idle_clients: int


FULL = Plan(
    ingest_seconds=15, fanout_events=1_000, sse_clients=1_000, ws_clients=100, idle_clients=5_000
)
QUICK = Plan(
    ingest_seconds=4, fanout_events=300, sse_clients=1_000, ws_clients=100, idle_clients=5_000
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
    return server(args, port, env, log)


def service_env() -> dict[str, str]:
    return {
        "DATABASE_URL": PG_URL.format(name=SERVICE_DB),
        "REDIS_URL": REDIS_URL,
        "NOTIFICATION_CHANNEL": SERVICE_CHANNEL,
        "LOG_LEVEL": "WARNING",
        # Every benchmark client comes from 127.0.0.1, one "client" to the stream limit.
        "MAX_STREAMS_PER_CLIENT": "10000",
    }


def naive_env() -> dict[str, str]:
    return {"DATABASE_URL": PG_URL.format(name=NAIVE_DB), "REDIS_URL": REDIS_URL}


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


def run_wrk(port: int, seconds: int, batch: int, run_id: str) -> dict:
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
    env = {**os.environ, "BENCH_RUN": run_id, "BENCH_BATCH": str(batch)}
    output = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["events_per_s"] = result["acked"] * batch / (result["duration_us"] / 1e6)
    return result


async def measure_ingest(
    port: int, seconds: int, batch: int, run_id: str, db: str | None, channel: str | None
) -> dict:
    """wrk against one endpoint; with a database, count the rows and published events."""
    counter = PublishedCounter(channel, run_id) if channel else None
    listener = None
    if counter:
        ready = asyncio.Event()
        listener = asyncio.create_task(counter.run(ready))
        await ready.wait()
    result = await asyncio.to_thread(run_wrk, port, seconds, batch, run_id)
    if db:
        await asyncio.sleep(1.0)  # let the last publishes arrive
        result["stored"] = await count_rows(db, run_id)
        result["published"] = counter.count if counter else None
        result["lost"] = max(0, result["acked"] * batch - result["stored"])
        result["unpublished"] = result["stored"] - (counter.count if counter else 0)
    if listener:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    return result


async def ingest_phase(plan: Plan, logs: Path) -> dict[str, dict]:
    seconds = plan.ingest_seconds
    results: dict[str, dict] = {}
    with uvicorn("bench.noop_app:app", PORTS["noop"], {}, logs / "noop.log"):
        run_wrk(PORTS["noop"], 2, 1, "warm-noop")
        results["noop"] = await measure_ingest(PORTS["noop"], seconds, 1, "noop", None, None)
    with uvicorn("bench.naive_app:app", PORTS["naive"], naive_env(), logs / "naive.log"):
        run_wrk(PORTS["naive"], 2, 1, "warm-naive")
        results["naive"] = await measure_ingest(
            PORTS["naive"], seconds, 1, "naive", NAIVE_DB, NAIVE_CHANNEL
        )
    with uvicorn("telemetry:app", PORTS["service"], service_env(), logs / "service.log"):
        run_wrk(PORTS["service"], 2, 1, "warm-service")
        results["single"] = await measure_ingest(
            PORTS["service"], seconds, 1, "single", SERVICE_DB, SERVICE_CHANNEL
        )
        results["batch"] = await measure_ingest(
            PORTS["service"], seconds, 50, "batch", SERVICE_DB, SERVICE_CHANNEL
        )
    return results


# Fan-out

FANOUT_RATE = 100.0
# One Python client process reading 110,000 deliveries/s shares the two cores with the
# server: at 1,100 clients it saturates (nchan shows it too), at 400 it does not.
SMALL_SSE_CLIENTS, SMALL_WS_CLIENTS = 300, 100
SERVICE_TARGET = fanout.Target(
    "service", PORTS["service"], "/api/v1/stream", "/api/v1/ws", "/api/v1/events", b"retry:"
)
NCHAN_TARGET = fanout.Target("nchan", PORTS["nchan"], "/sub", "/sub", "/pub", b"\n\n")


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
        shutil.copy(prefix / "error.log", logs / "nchan-error.log")
        shutil.rmtree(prefix, ignore_errors=True)


async def fanout_phase(plan: Plan, logs: Path) -> dict[str, dict]:
    """The issue's fan-out, and a smaller one where the measuring client is not saturated."""
    full = (plan.sse_clients, plan.ws_clients, plan.fanout_events, FANOUT_RATE)
    small = (SMALL_SSE_CLIENTS, SMALL_WS_CLIENTS, plan.fanout_events, FANOUT_RATE)
    results: dict[str, dict] = {}
    with uvicorn("telemetry:app", PORTS["service"], service_env(), logs / "service.log"):
        results["fanout"] = await fanout.measure_fanout(SERVICE_TARGET, *full, "fanout")
        results["fanout_small"] = await fanout.measure_fanout(SERVICE_TARGET, *small, "small")
    with uvicorn("telemetry:app", PORTS["service"], service_env(), logs / "service.log") as proc:
        results["idle"] = await fanout.measure_idle(SERVICE_TARGET, proc.pid, plan.idle_clients)
    with nchan(logs):
        results["nchan"] = await fanout.measure_fanout(NCHAN_TARGET, *full, "nchan")
        results["nchan_small"] = await fanout.measure_fanout(NCHAN_TARGET, *small, "nchan")
    return results


# Report


def check(ok: bool) -> str:
    return "yes" if ok else "NO"


def table_rows(r: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    """(measure, figure, same-run comparator, ratio, target and whether it is met)."""
    single, noop, naive, batch = r["single"], r["noop"], r["naive"], r["batch"]
    fan, nch, idle = r["fanout"], r["nchan"], r["idle"]
    small, nch_small = r["fanout_small"], r["nchan_small"]
    noop_ratio = single["rps"] / noop["rps"]
    naive_ratio = single["rps"] / naive["rps"]
    single_lost = single["lost"] + max(0, single["unpublished"])
    batch_lost = batch["lost"] + max(0, batch["unpublished"])
    return [
        (
            "single-event POST req/s",
            f"{single['rps']:,.0f}",
            f"no-op {noop['rps']:,.0f}",
            f"{noop_ratio:.2f}x",
            f">= 0.40x: {check(noop_ratio >= 0.40)}",
        ),
        (
            "single-event POST p99",
            f"{single['p99_us'] / 1000:.1f} ms",
            f"no-op {noop['p99_us'] / 1000:.1f} ms",
            "",
            f"<= 25 ms: {check(single['p99_us'] <= 25_000)}",
        ),
        (
            "vs one transaction per request",
            f"{single['rps']:,.0f} req/s",
            f"naive {naive['rps']:,.0f} req/s, p99 {naive['p99_us'] / 1000:.0f} ms",
            f"{naive_ratio:.1f}x",
            f">= 6x: {check(naive_ratio >= 6)}",
        ),
        (
            "single: acked / stored / published",
            f"{single['acked']:,} / {single['stored']:,} / {single['published']:,}",
            "",
            "",
            f"none lost: {check(single_lost == 0)}",
        ),
        (
            "50-event batches events/s",
            f"{batch['events_per_s']:,.0f}",
            f"p99 {batch['p99_us'] / 1000:.0f} ms",
            "",
            f">= 40,000: {check(batch['events_per_s'] >= 40_000)}",
        ),
        (
            "batches: acked / stored / published",
            f"{batch['acked'] * batch['batch']:,} / {batch['stored']:,} / {batch['published']:,}",
            "",
            "",
            f"none lost: {check(batch_lost == 0)}",
        ),
        (
            f"fan-out {fan['clients']} clients, p99",
            f"{fan['p99_ms']:.1f} ms",
            f"nchan {nch['p99_ms']:.1f} ms",
            f"{fan['p99_ms'] / nch['p99_ms']:.2f}x",
            f"<= 50 ms: {check(fan['p99_ms'] <= 50)}",
        ),
        (
            "fan-out p50 / max",
            f"{fan['p50_ms']:.1f} / {fan['max_ms']:.0f} ms",
            f"nchan {nch['p50_ms']:.1f} / {nch['max_ms']:.0f} ms",
            "",
            "",
        ),
        (
            f"fan-out {small['clients']} clients, p50 / p99",
            f"{small['p50_ms']:.1f} / {small['p99_ms']:.1f} ms",
            f"nchan {nch_small['p50_ms']:.1f} / {nch_small['p99_ms']:.1f} ms",
            f"{small['p50_ms'] / nch_small['p50_ms']:.2f}x / "
            f"{small['p99_ms'] / nch_small['p99_ms']:.2f}x",
            f"none lost: {check(small['lost'] == 0)}",
        ),
        (
            "fan-out deliveries received",
            f"{fan['received']:,} of {fan['expected']:,}",
            f"nchan {nch['received']:,} of {nch['expected']:,}",
            "",
            f"none lost: {check(fan['lost'] == 0)}",
        ),
        (
            f"{idle['clients']:,} idle SSE, RSS growth",
            f"{idle['kb_per_client']:.1f} KB/conn",
            f"{idle['rss_before_kb'] / 1024:.0f} -> {idle['rss_after_kb'] / 1024:.0f} MB",
            "",
            f"<= 20 KB: {check(idle['kb_per_client'] <= 20)}",
        ),
    ]


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
        f"{sys.version.split()[0]}, one uvicorn worker, wrk -t1 -c{WRK_CONNECTIONS} "
        f"{plan.ingest_seconds}s per run, fan-out {plan.fanout_events} events at "
        f"{FANOUT_RATE:.0f}/s, load average before {load:.2f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    plan = QUICK if parser.parse_args().quick else FULL
    raise_file_limit()
    header = machine_line(plan)
    results_dir = BENCH_DIR / "results"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    logs = results_dir / f"{stamp}-logs"
    logs.mkdir(parents=True)
    for name in (SERVICE_DB, NAIVE_DB):
        await reset_database(name)
    results = await ingest_phase(plan, logs)
    results.update(await fanout_phase(plan, logs))
    report = render(table_rows(results), header)
    print(report)
    (results_dir / f"{stamp}.txt").write_text(report + "\n")
    (results_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
