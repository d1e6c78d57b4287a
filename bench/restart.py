"""Restart benchmark: how long the Procfile's uvicorn takes to exit on SIGTERM while dashboards
are connected, against the 3.5 s cell-monitor-extension keeps retrying (0.5 + 1 + 2 s).

    .venv/bin/python bench/restart.py               # 5 rounds, 20 SSE + 5 WebSocket dashboards
    .venv/bin/python bench/restart.py --sqlite      # on the SQLite default

Against PostgreSQL and Redis (database `telemetry_bench_restart`, recreated) unless --sqlite.
Each round starts the service with the Procfile's flags, opens the dashboards, waits until
the service counts them, sends SIGTERM and times the process's exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from run import PG_URL, REDIS_URL, reset_database  # noqa: E402

DATABASE = "telemetry_bench_restart"
RETRY_BUDGET_SECONDS = 0.5 + 1 + 2  # cell-monitor-extension's retries after a failed POST
PROCFILE_FLAGS = [
    "--proxy-headers", "--forwarded-allow-ips=*", "--timeout-graceful-shutdown", "20",
    "--ws-max-size", "65536",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for_clients(url: str, count: int) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            try:
                health = (await client.get(f"{url}/healthz")).json()
                if health.get("clients", 0) >= count:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def hold_sse(url: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=None) as client:
        async with client.stream("GET", f"{url}/api/v1/stream") as response:
            async for _ in response.aiter_bytes():
                if stop.is_set():
                    return


async def hold_websocket(url: str, stop: asyncio.Event) -> None:
    async with websockets.connect(url.replace("http", "ws") + "/api/v1/ws") as socket_:
        async for _ in socket_:
            if stop.is_set():
                return


async def one_round(env: dict[str, str], sse: int, ws: int, log: Path) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "uvicorn", "telemetry:app", "--host", "127.0.0.1",
            "--port", str(port), *PROCFILE_FLAGS]  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args, env={**os.environ, **env}, cwd=REPO_DIR, stdout=out, stderr=subprocess.STDOUT
        )
    stop = asyncio.Event()
    holders = [asyncio.create_task(hold_sse(url, stop)) for _ in range(sse)]
    try:
        await asyncio.wait_for(wait_for_clients(url, 0), 30)
        holders += [asyncio.create_task(hold_websocket(url, stop)) for _ in range(ws)]
        await asyncio.wait_for(wait_for_clients(url, sse + ws), 30)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        return time.monotonic() - started
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sse", type=int, default=20)
    parser.add_argument("--ws", type=int, default=5)
    parser.add_argument("--sqlite", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        if args.sqlite:
            env = {"DATABASE_URL": f"sqlite:///{workdir}/telemetry.db"}
        else:
            await reset_database(DATABASE)
            env = {"DATABASE_URL": PG_URL.format(name=DATABASE), "REDIS_URL": REDIS_URL,
                   "NOTIFICATION_CHANNEL": "telemetry:bench:restart"}  # fmt: skip
        env |= {"LOG_LEVEL": "WARNING", "MAX_STREAMS_PER_CLIENT": "1000", "WEB_CONCURRENCY": "1"}
        log = Path(workdir) / "uvicorn.log"
        times = [await one_round(env, args.sse, args.ws, log) for _ in range(args.rounds)]
    backend = "SQLite" if args.sqlite else "PostgreSQL + Redis"
    print(f"SIGTERM to exit, {args.sse} SSE + {args.ws} WebSocket dashboards open, {backend}:")
    print("  " + ", ".join(f"{seconds:.2f} s" for seconds in times))
    print(f"  median {statistics.median(times):.2f} s, max {max(times):.2f} s;"
          f" the extension retries for {RETRY_BUDGET_SECONDS:.1f} s")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
