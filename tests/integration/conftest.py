import pytest

from telemetry import Storage


@pytest.fixture
async def storage(database_url: str):
    """The storage layer, connected and with the schema applied, on each database."""
    storage = Storage(database_url, pool_size=3)
    await storage.connect()
    yield storage
    await storage.disconnect()
