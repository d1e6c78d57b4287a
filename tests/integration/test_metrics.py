"""GET /metrics in process: who may read it, and the ingest figures it shows, on each database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.config import load_settings
from tests.errors import assert_error
from tests.scrape import Figures, figure, parse_figures, total

EVERY_COURSE, SCOPED, ADMIN = "root-secret-1", "lee-secret-2", "admin-secret-3"
TOKENS = {"DASHBOARD_TOKENS": f"root={EVERY_COURSE},lee={SCOPED}:cs101", "ADMIN_TOKENS": ADMIN}


@pytest.fixture
async def guarded_api(sqlite_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a dashboard token of every course, one scoped to cs101, and an admin token."""
    settings = load_settings({"DATABASE_URL": sqlite_database_url, **TOKENS})
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def scrape(client: httpx.AsyncClient, **headers: str) -> Figures:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse_figures(response.text)


async def test_metrics_need_a_dashboard_token_of_every_course(guarded_api) -> None:
    error = assert_error(await guarded_api.get("/metrics"), 401, "unauthorized")
    assert error["message"] == "a valid dashboard token is required"
    assert_error(await guarded_api.get("/metrics", headers=bearer(ADMIN)), 401, "unauthorized")
    scoped = await guarded_api.get("/metrics", headers=bearer(SCOPED))
    assert assert_error(scoped, 403, "out_of_scope")["details"][0]["field"] == "token"
    assert "lee-secret" not in scoped.text
    figures = await scrape(guarded_api, **bearer(EVERY_COURSE))
    assert ("telemetry_events_stored_total", frozenset()) in figures
    by_query = await guarded_api.get("/metrics", params={"token": EVERY_COURSE})
    assert by_query.status_code == 200


async def test_metrics_refuse_unknown_parameters(guarded_api) -> None:
    response = await guarded_api.get("/metrics?name=x", headers=bearer(EVERY_COURSE))
    assert_error(response, 422, "invalid_query")


async def test_metrics_are_open_while_dashboards_are(api) -> None:
    figures = await scrape(api)
    assert figure(figures, "telemetry_dashboards_connected", transport="sse") == 0
    assert figure(figures, "telemetry_dashboards_cut_off_total", reason="deadline") == 0


async def test_stored_duplicate_and_refused_events_move_their_figures(api) -> None:
    # The registry is the test process's: figures are compared before and after.
    before = await scrape(api)
    new = [{"student_id": "ada", "event_type": "run", "event_id": f"m{n}"} for n in (1, 2)]
    assert (await api.post("/api/v1/events", json=new)).status_code == 201
    assert (await api.post("/api/v1/events", json=new[:1])).json()["events"][0]["duplicate"]
    assert (await api.post("/api/v1/events", json=[{"student_id": "ada"}])).status_code == 422
    assert (await api.post("/api/v1/events", content=b"{")).status_code == 415
    after = await scrape(api)

    def moved(name: str, **labels: str) -> float:
        return figure(after, name, **labels) - figure(before, name, **labels)

    assert moved("telemetry_events_stored_total") == 2
    assert moved("telemetry_events_duplicate_total") == 1
    assert moved("telemetry_ingest_refusals_total", reason="invalid_event") == 1
    assert moved("telemetry_ingest_refusals_total", reason="unsupported_media_type") == 1
    refusals = "telemetry_ingest_refusals_total"
    assert total(after, refusals) - total(before, refusals) == 2
    assert moved("telemetry_commit_seconds_count") == 2
    assert moved("telemetry_commit_seconds_sum") > 0
    assert moved("telemetry_commit_batch_events_count") == 2
    assert moved("telemetry_commit_batch_events_sum") == 3
    assert moved("telemetry_commit_batch_events_bucket", le="2.0") == 2
