"""The running service that handlers reach through their request, built by the lifespan.
It only holds the parts together: no logic lives here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from telemetry.bus import Bus
from telemetry.config import Settings
from telemetry.hub import Hub
from telemetry.storage import Storage

if TYPE_CHECKING:  # ingest imports this module
    from telemetry.ingest import Committer


@dataclass
class Service:
    settings: Settings
    storage: Storage
    bus: Bus
    hub: Hub
    committer: Committer


def service_of(connection: HTTPConnection) -> Service:
    return connection.app.state.service
