"""What the handlers reach through their request: built by the lifespan at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from telemetry.bus import Bus
from telemetry.config import Settings
from telemetry.hub import Hub
from telemetry.storage import Storage

if TYPE_CHECKING:  # annotations only: that module imports this one
    from telemetry.ingest import Committer

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """What the handlers reach through their request: built by the lifespan at start-up."""

    settings: Settings
    storage: Storage
    bus: Bus
    hub: Hub
    committer: Committer


def service_of(connection: HTTPConnection) -> Service:
    return connection.app.state.service
