"""Generated junk thrown at POST /api/v1/events: never a 5xx, rows change only for valid events."""

import json

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.application import create_app
from telemetry.config import Settings

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["student_id", "event_type", "event_id", "occurred_at", "cell_index", "seq", "status",
     "error", "duration_ms", "outputs", "source", "eventId", "emailAddress", "hasError", "x"]
)  # fmt: skip
EVENTS = st.dictionaries(FIELDS, JSON_VALUES | st.text(max_size=30), max_size=8)
BODIES = st.one_of(
    EVENTS.map(lambda event: json.dumps(event).encode()),
    st.lists(EVENTS, max_size=4).map(lambda events: json.dumps(events).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/json; charset=x"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_client(tmp_path_factory):
    database = tmp_path_factory.mktemp("junk") / "telemetry.db"
    app = create_app(Settings(database_url=f"sqlite:///{database}", max_batch_events=3))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app.state.service.storage.database


@pytest.mark.asyncio(loop_scope="module")
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES, content_type=CONTENT_TYPES)
async def test_junk_never_breaks_the_service_nor_the_data(app_client, body, content_type) -> None:
    client, database = app_client
    before = await database.fetch_val("SELECT COUNT(*) FROM events")
    response = await client.post(
        "/api/v1/events", content=body, headers={"content-type": content_type}
    )
    after = await database.fetch_val("SELECT COUNT(*) FROM events")
    assert response.status_code in (201, 400, 413, 415, 422), response.text
    if response.status_code == 201:
        receipts = response.json()["events"]
        assert after - before == sum(not receipt["duplicate"] for receipt in receipts)
    else:
        assert after == before
        assert response.json()["error"]["status"] == response.status_code
