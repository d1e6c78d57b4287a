"""Classroom telemetry: what students do in JupyterLab, live on instructors' dashboards.

The modules follow the data path: config, errors, events and pioneer (validation), classview,
storage and forgetting, bus, hub, service, access, ingest, readapi, streams, application.
docs/design.md lists the guarantees and the module that holds each.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`telemetry:app`, as uvicorn and the Procfile name it, built on first access: importing
    the package reads no environment, configures no logging and cannot exit."""
    if name == "app":
        from telemetry.application import app_from_environment

        return app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
