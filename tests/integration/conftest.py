import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry import Settings, Storage, create_app


@pytest.fixture
async def storage(database_url: str):
    """The storage layer, connected and with the schema applied, on each database."""
    storage = Storage(database_url, pool_size=3)
    await storage.connect()
    yield storage
    await storage.disconnect()


@pytest.fixture
async def api(database_url: str):
    """The HTTP API in process, its lifespan run, on each database."""
    app = create_app(Settings(database_url=database_url))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app
            yield client
