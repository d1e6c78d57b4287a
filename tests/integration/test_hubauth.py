"""The service under a JupyterHub service's prefix, in process: the page, the API, the
cookies' paths, and the first step of the hub sign-in (the rest needs a real hub:
tests/e2e/test_jupyterhub.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.config import load_settings
from tests.errors import assert_error

PREFIX = "/services/telemetry"
HUB = {
    "JUPYTERHUB_SERVICE_PREFIX": f"{PREFIX}/",
    "JUPYTERHUB_API_URL": "http://127.0.0.1:1/hub/api",  # never reached by these tests
    "JUPYTERHUB_API_TOKEN": "service-secret",
    "DASHBOARD_TOKENS": "lee=dash-secret:cs101",
}


@pytest.fixture
async def hub_app(sqlite_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings({**HUB, "DATABASE_URL": sqlite_database_url}))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            yield client


async def test_page_files_and_api_are_served_under_the_prefix(hub_app) -> None:
    page = await hub_app.get(f"{PREFIX}/")
    assert page.status_code == 200 and 'src="static/dashboard.js"' in page.text
    assert (await hub_app.get(f"{PREFIX}/static/dashboard/api.js")).status_code == 200
    event = {"student_id": "ada", "event_type": "cell_executed", "course_id": "cs101"}
    assert (await hub_app.post(f"{PREFIX}/api/v1/events", json=event)).status_code == 201
    bare = await hub_app.get(PREFIX)
    assert (bare.status_code, bare.headers["location"]) == (308, f"{PREFIX}/")


async def test_the_token_cookie_stays_under_the_prefix(hub_app) -> None:
    headers = {"Authorization": "Bearer dash-secret"}
    session = await hub_app.post(f"{PREFIX}/api/v1/session", headers=headers)
    assert session.json()["courses"] == ["cs101"]
    cookie = session.headers["set-cookie"].lower()
    assert f"path={PREFIX}/;" in cookie and "httponly" in cookie and "samesite=strict" in cookie


async def test_a_signed_out_read_points_at_the_hub_sign_in(hub_app) -> None:
    refused = await hub_app.get(f"{PREFIX}/api/v1/session")
    assert_error(refused, 401, "unauthorized")
    assert refused.headers["link"] == f'<{PREFIX}/oauth_login>; rel="login"'


async def test_the_sign_in_goes_to_the_hubs_authorize_endpoint_with_a_state(hub_app) -> None:
    start = await hub_app.get(f"{PREFIX}/oauth_login")
    assert start.status_code == 303
    target = urlsplit(start.headers["location"])
    assert target.path == "/hub/api/oauth2/authorize"
    query = {name: values[0] for name, values in parse_qs(target.query).items()}
    assert query["client_id"] == "service-telemetry"
    assert query["redirect_uri"] == f"{PREFIX}/oauth_callback"
    assert query["code_challenge_method"] == "S256"
    cookie = start.headers["set-cookie"].lower()
    assert cookie.startswith(f"telemetry_oauth_state={query['state'].lower()}.")
    assert f"path={PREFIX}/;" in cookie and "httponly" in cookie and "max-age=600" in cookie


async def test_a_callback_without_its_state_is_refused(hub_app) -> None:
    hub_app.cookies.set("telemetry_oauth_state", "mine.verifier", path=f"{PREFIX}/")
    forged = await hub_app.get(f"{PREFIX}/oauth_callback", params={"code": "c", "state": "theirs"})
    assert_error(forged, 400, "oauth_state_mismatch")
