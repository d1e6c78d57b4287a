"""The figures /metrics shows, in Prometheus' format (prometheus-client): each metric is a
constant here, counted by the module where its event happens. Imports nothing of the package,
so every module on the data path can count; the endpoint is readapi.show_metrics.

With PROMETHEUS_MULTIPROC_DIR set before start-up, every worker writes its figures there and a
scrape sums them (the library's multiprocess mode); otherwise a scrape reads its own process.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# In multiprocess mode the library opens this process's files there from the first metric on.
if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
    os.makedirs(os.environ[MULTIPROCESS_DIR_VARIABLE], exist_ok=True)

EVENTS_STORED = Counter("telemetry_events_stored", "Events committed, duplicates excluded.")
EVENTS_DUPLICATE = Counter(
    "telemetry_events_duplicate", "Events whose event_id was stored already: stored nothing."
)
INGEST_REFUSALS = Counter(
    "telemetry_ingest_refusals",
    "POSTs of events answered with an error, by the error body's code.",
    ["reason"],
)
# A batch commits in milliseconds; the committer gives up at its COMMIT_DEADLINE_SECONDS.
COMMIT_SECONDS = Histogram(
    "telemetry_commit_seconds",
    "Time to store one batch of events in its one transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
)
# Batches form by themselves: one event when idle, tens under load, up to MAX_BATCH_EVENTS
# and one request more.
BATCH_EVENTS = Histogram(
    "telemetry_commit_batch_events",
    "Events per committed batch (one transaction, one bus message).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
BUS_RECONNECTS = Counter("telemetry_bus_reconnects", "Bus subscriptions restored after being lost.")
GAP_FILLS = Counter(
    "telemetry_gap_fills",
    "Reads of committed events that the bus did not bring, by what found the gap.",
    ["found_by"],
)
DASHBOARDS = Gauge(
    "telemetry_dashboards_connected",
    "Open dashboard streams, by transport.",
    ["transport"],
    multiprocess_mode="livesum",
)
CUT_OFFS = Counter(
    "telemetry_dashboards_cut_off",
    "Dashboards cut off as too slow: their queue overflowed, or a write passed the deadline.",
    ["reason"],
)

# The fixed label values, made at start-up so that they show at zero: a series that appears
# only with its first event is invisible to rate() and to alerts until then.
SSE_DASHBOARDS = DASHBOARDS.labels("sse")
WEBSOCKET_DASHBOARDS = DASHBOARDS.labels("websocket")
GAP_FOUND_BY_MESSAGE = GAP_FILLS.labels("message")  # a batch follows events never delivered
GAP_FOUND_BY_CHECK = GAP_FILLS.labels("check")  # the periodic check, when all went quiet
CUT_OFF_OVERFLOW = CUT_OFFS.labels("overflow")
CUT_OFF_DEADLINE = CUT_OFFS.labels("deadline")


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The figures in the format the scraper accepts, and its content type: every worker's,
    aggregated, in multiprocess mode, else this process's."""
    encode, content_type = choose_encoder(accept or "")
    return encode(current_registry()), content_type


def current_registry() -> CollectorRegistry:
    directory = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if not directory:
        return REGISTRY
    forget_dead_workers(Path(directory))
    # The library's way: a fresh registry per scrape reads every process's files.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, directory)
    return registry


def forget_dead_workers(directory: Path) -> None:
    """Drop the open streams of workers that died without closing them (SIGKILL, out of
    memory): uvicorn starts another, and the dead one's figure would stay in the sum."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        if not process_exists(pid):
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape was first
                mark_process_dead(pid, str(directory))


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    return True
