"""The storage layer and the HTTP API in process, on each database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.config import Settings, load_settings
from telemetry.service import Service
from telemetry.storage import Storage
from tests.integration.classes import CLASS, TOKENS


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    """The storage layer, connected and with the schema applied, on each database."""
    storage = Storage(database_url, pool_size=3)
    await storage.connect()
    try:
        yield storage
    finally:
        await storage.disconnect()


class ApiClient(httpx.AsyncClient):
    """An httpx client talking to the app in process, and the app's running service."""

    service: Service


@contextlib.asynccontextmanager
async def running_api(database_url: str) -> AsyncIterator[ApiClient]:
    app = create_app(Settings(database_url=database_url, max_body_bytes=2_000, max_batch_events=5))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with ApiClient(transport=transport, base_url="http://test") as client:
            client.service = app.state.service
            yield client


@pytest.fixture
def api_client() -> Callable[[str], AbstractAsyncContextManager[ApiClient]]:
    """Opens the app on a database: `async with api_client(url) as client`, lifespan run.

    It takes bodies up to 2,000 bytes and batches up to 5 events, so limits are cheap to hit.
    """
    return running_api


@pytest.fixture
async def client(api_client, database_url: str) -> AsyncIterator[ApiClient]:
    async with api_client(database_url) as client:
        yield client


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiClient]:
    """The HTTP API in process with its default limits, on each database."""
    app = create_app(Settings(database_url=database_url))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with ApiClient(transport=transport, base_url="http://test") as client:
            client.service = app.state.service
            yield client


@pytest.fixture
async def scoped_api(database_url: str) -> AsyncIterator[ApiClient]:
    """The app with scoped tokens, and a class of five: each posted a failing run and a help."""
    tokens = load_settings({"DASHBOARD_TOKENS": TOKENS}).dashboard_tokens
    app = create_app(Settings(database_url=database_url, dashboard_tokens=tokens))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with ApiClient(transport=transport, base_url="http://test") as client:
            client.service = app.state.service
            events = []
            for student in CLASS:
                run = {"event_type": "cell_executed", "notebook_path": "w1.ipynb", "cell_id": "c1"}
                events += [{**student, **run, "status": "error"}, {**student, "event_type": "help"}]
            response = await client.post("/api/v1/events", json=events)
            assert response.status_code == 201, response.text
            yield client
