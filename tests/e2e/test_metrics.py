"""GET /metrics from real uvicorn processes: the streams', the bus's and the cut-offs' figures
move as dashboards connect, Redis drops and slow dashboards are let go; with several workers
and PROMETHEUS_MULTIPROC_DIR, every scrape shows all the workers' figures summed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import Server, wait_for
from tests.e2e.clients import SseClient, WebSocketClient, event, post_events
from tests.scrape import Figures, figure, parse_figures, total


def scrape(server: Server) -> Figures:
    response = httpx.get(f"{server.url}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    return parse_figures(response.text)


def connected(server: Server, transport: str) -> float:
    return figure(scrape(server), "telemetry_dashboards_connected", transport=transport)


def healthy(server: Server) -> bool:
    return httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


async def test_dashboards_bus_reconnects_and_gap_fills_are_counted(
    postgres_database_url, private_redis, start_server, connect_dashboard
) -> None:
    server = start_server(DATABASE_URL=postgres_database_url, REDIS_URL=private_redis.url)
    before = scrape(server)
    sse = await connect_dashboard(SseClient(server.url))
    ws = await connect_dashboard(WebSocketClient(server.ws_url))
    await wait_for(lambda: connected(server, "sse") == 1 and connected(server, "websocket") == 1)
    # Redis down: the batch is never published, so the gap check delivers it from the database.
    private_redis.stop()
    posted = [receipt["id"] for receipt in await post_events(server.url, event(1))]
    await sse.wait_for_ids(posted)
    private_redis.start()
    await wait_for(lambda: healthy(server), timeout=20)
    after = scrape(server)
    assert figure(after, "telemetry_bus_reconnects_total") >= 1
    assert total(after, "telemetry_gap_fills_total") > total(before, "telemetry_gap_fills_total")
    await ws.wait_for_ids(posted)
    await sse.close()
    await ws.close()
    await wait_for(lambda: connected(server, "sse") == 0 and connected(server, "websocket") == 0)


# A dashboard that stopped reading is cut off by the send deadline, or by its queue filling up.
CUT_OFFS = {
    "deadline": {"SEND_TIMEOUT_SECONDS": "1"},
    "overflow": {"CLIENT_QUEUE_LIMIT": "3", "SEND_TIMEOUT_SECONDS": "60"},
}


@pytest.mark.parametrize("reason", CUT_OFFS)
async def test_slow_dashboards_cut_off_are_counted_by_reason(
    reason, start_server, raw_sse_socket
) -> None:
    server = start_server(**CUT_OFFS[reason])
    raw_sse_socket(server)  # never reads
    await wait_for(lambda: connected(server, "sse") == 1)

    def cut_off() -> dict[str, float]:
        figures = scrape(server)
        return {label: figure(figures, "telemetry_dashboards_cut_off_total", reason=label)
                for label in CUT_OFFS}  # fmt: skip

    assert cut_off() == {"deadline": 0, "overflow": 0}
    for number in range(200):  # fill every buffer towards the dashboard until it is let go
        await post_events(server.url, event(number, source="y" * 100_000))
        if connected(server, "sse") == 0:
            break
    await wait_for(lambda: cut_off()[reason] == 1, timeout=20)
    assert cut_off() == {label: int(label == reason) for label in CUT_OFFS}
    assert connected(server, "sse") == 0


STORED = "telemetry_events_stored_total"
CONNECTED = "telemetry_dashboards_connected"


def stored_per_worker(directory: Path) -> list[float]:
    """Each worker's own count, read from the file the library keeps for it."""
    counts = []
    for path in directory.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            counts += [sample.value for sample in metric.samples if sample.name == STORED]
    return counts


async def test_several_workers_are_summed_with_a_multiprocess_directory(
    production, tmp_path
) -> None:
    directory = tmp_path / "prometheus"  # made by the service
    server = production(WEB_CONCURRENCY="2", PROMETHEUS_MULTIPROC_DIR=str(directory))
    posted = 0
    # Each POST on a connection of its own, until both workers have stored some.
    while posted < 200 and not (posted >= 20 and all(stored_per_worker(directory))):
        await post_events(server.url, event(posted))
        posted += 1
    per_worker = stored_per_worker(directory)
    assert len(per_worker) == 2 and all(per_worker) and sum(per_worker) == posted
    # Whichever worker answers a scrape, it shows every worker's events.
    for _ in range(10):
        assert figure(scrape(server), STORED) == posted


def streams_per_worker(directory: Path) -> dict[int, float]:
    """Each worker's open streams, read from the file the library keeps for it."""
    streams = {}
    for path in directory.glob("gauge_livesum_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            values = [sample.value for sample in metric.samples if sample.name == CONNECTED]
            streams[int(path.stem.rpartition("_")[2])] = sum(values)
    return streams


async def test_the_streams_of_a_killed_worker_leave_the_sum_and_its_counts_stay(
    production, tmp_path, connect_dashboard
) -> None:
    directory = tmp_path / "prometheus"
    server = production(WEB_CONCURRENCY="2", PROMETHEUS_MULTIPROC_DIR=str(directory))
    posted = len(await post_events(server.url, event(1), event(2)))
    # Streams on connections of their own, until both workers hold some.
    for _ in range(40):
        await connect_dashboard(SseClient(server.url))
        per_worker = streams_per_worker(directory)
        if len(per_worker) == 2 and all(per_worker.values()):
            break
    assert len(per_worker) == 2 and all(per_worker.values())
    opened = sum(per_worker.values())
    await wait_for(lambda: connected(server, "sse") == opened)
    victim, its_streams = next(iter(per_worker.items()))
    os.kill(victim, signal.SIGKILL)  # no chance to close its streams: uvicorn starts another
    await wait_for(lambda: connected(server, "sse") == opened - its_streams, timeout=20)
    assert figure(scrape(server), STORED) == posted
