"""The erasure endpoints in process, on both databases: admin tokens only, nothing of the
erased left in any table of schema.sql, counts answered, dashboards told, the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.access import RedactTokens
from telemetry.application import create_app
from telemetry.config import Settings, load_settings
from telemetry.events import pseudonym
from telemetry.hub import StreamFilter
from telemetry.storage import SCHEMA_PATH
from tests.errors import assert_error
from tests.integration.conftest import ApiClient

ADMIN, DASHBOARD = "dpo-secret-1", "lee-secret-2"
# Marks everything Ada and the course "solo" ever sent: no table may hold it afterwards.
ADA, SOLO_CODE = "ada-to-erase@uni.edu", "print('solo-course-code')"
TABLES = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA_PATH.read_text())


def class_events() -> list[dict]:
    run = {"event_type": "cell_executed", "notebook_path": "w1.ipynb", "cell_id": "c1"}
    return [
        {**run, "student_id": ADA, "course_id": "cs101", "status": "error", "source": "ada()"},
        {"student_id": ADA, "event_type": "help", "student_name": "Ada L."},
        {**run, "student_id": "bob", "course_id": "cs101", "status": "ok", "source": "bob()"},
        {**run, "student_id": "cy", "course_id": "solo", "status": "error", "source": SOLO_CODE},
        {"student_id": "cy", "event_type": "help", "course_id": "solo"},
    ]


@pytest.fixture
def admin_api(database_url: str) -> Callable[..., AbstractAsyncContextManager[ApiClient]]:
    """The app with the given token variables, a class of three already posted."""

    @asynccontextmanager
    async def open_api(**environment: str) -> AsyncIterator[ApiClient]:
        tokens = load_settings(environment)
        settings = Settings(
            database_url=database_url,
            dashboard_tokens=tokens.dashboard_tokens,
            admin_tokens=tokens.admin_tokens,
            pseudonymize_salt=tokens.pseudonymize_salt,
        )
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with ApiClient(transport=transport, base_url="http://test") as client:
                client.service = app.state.service
                response = await client.post("/api/v1/events", json=class_events())
                assert response.status_code == 201, response.text
                yield client

    return open_api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def every_row(api: ApiClient) -> str:
    """Every row of every table of schema.sql, as text."""
    rows = []
    for table in TABLES:  # names read from schema.sql, never from input
        found = await api.service.storage.database.fetch_all(f"SELECT * FROM {table}")
        rows += [str(dict(row._mapping)) for row in found]
    return "\n".join(rows)


async def test_erasure_is_refused_while_no_admin_token_is_configured(admin_api) -> None:
    async with admin_api(DASHBOARD_TOKENS=f"lee={DASHBOARD}") as api:
        for path in (f"/api/v1/students/{ADA}", "/api/v1/courses/solo"):
            for headers in ({}, bearer(DASHBOARD), bearer(ADMIN)):
                response = await api.delete(path, headers=headers)
                error = assert_error(response, 403, "no_admin_tokens")
                assert "no admin tokens configured" in error["message"]
        assert ADA in await every_row(api)


async def test_erasure_needs_an_admin_token_and_an_admin_token_cannot_read(admin_api) -> None:
    async with admin_api(DASHBOARD_TOKENS=f"lee={DASHBOARD}", ADMIN_TOKENS=f"dpo={ADMIN}") as api:
        for headers in ({}, bearer(DASHBOARD), bearer("dpo")):
            response = await api.delete(f"/api/v1/students/{ADA}", headers=headers)
            assert_error(response, 401, "unauthorized")
        # Not from a cookie or the query string either: a Bearer header only.
        response = await api.delete(f"/api/v1/students/{ADA}", params={"token": ADMIN})
        assert_error(response, 401, "unauthorized")
        assert_error(await api.get("/api/v1/events", headers=bearer(ADMIN)), 401, "unauthorized")
        assert ADA in await every_row(api)


async def test_an_erased_student_is_in_no_table_and_the_answer_counts_what_went(
    admin_api,
) -> None:
    async with admin_api(ADMIN_TOKENS=f"dpo={ADMIN}") as api:
        before = await every_row(api)
        assert ADA in before and "ada()" in before and "Ada L." in before
        response = await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["erased"] == {"student_id": ADA, "course_id": "cs101"}
        deleted = body["deleted"]
        assert (deleted["events"], deleted["students"], deleted["hand_raises"]) == (2, 1, 1)
        assert set(deleted) >= {"cell_runs", "student_counts", "activity"}
        after = await every_row(api)
        assert ADA not in after and "ada()" not in after and "Ada L." not in after
        assert "bob()" in after and SOLO_CODE in after  # the others stay
        again = await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
        assert_error(again, 404, "no_such_student")


async def test_an_erased_course_is_in_no_table(admin_api) -> None:
    async with admin_api(ADMIN_TOKENS=f"other=x-secret,dpo={ADMIN}") as api:
        response = await api.delete("/api/v1/courses/solo", headers=bearer(ADMIN))
        assert response.status_code == 200, response.text
        assert response.json()["erased"] == {"student_id": None, "course_id": "solo"}
        assert response.json()["deleted"]["events"] == 2
        after = await every_row(api)
        assert SOLO_CODE not in after and "'solo'" not in after and "'cy'" not in after
        assert ADA in after and "bob()" in after
        assert_error(await api.delete("/api/v1/courses/solo", headers=bearer(ADMIN)), 404,
                     "no_such_course")  # fmt: skip


async def test_open_dashboards_of_the_course_are_told_and_others_are_not(admin_api) -> None:
    async with admin_api(ADMIN_TOKENS=f"dpo={ADMIN}") as api:
        hub = api.service.hub
        with (
            hub.subscribe(StreamFilter()) as everyone,
            hub.subscribe(StreamFilter(courses=frozenset({"cs101"}))) as same,
            hub.subscribe(StreamFilter(courses=frozenset({"solo"}))) as other,
        ):
            response = await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
            assert response.status_code == 200, response.text
            notice = {"type": "erased", "student_id": ADA, "course_id": "cs101"}
            for client in (everyone, same):
                frames = list(client.frames) or await client.next_frames()
                assert [json.loads(frame.ws) for frame in frames] == [notice]
            assert not other.frames


async def test_dashboards_of_every_course_the_student_was_seen_in_are_told(admin_api) -> None:
    """Cy ran code in solo, then moved to cs101: solo's dashboards showed Cy, so they hear."""
    async with admin_api(ADMIN_TOKENS=f"dpo={ADMIN}") as api:
        moved = {"student_id": "cy", "course_id": "cs101", "event_type": "opened"}
        assert (await api.post("/api/v1/events", json=[moved])).status_code == 201
        hub = api.service.hub
        with (
            hub.subscribe(StreamFilter(courses=frozenset({"solo"}))) as before,
            hub.subscribe(StreamFilter(courses=frozenset({"cs101"}))) as now,
            hub.subscribe(StreamFilter(courses=frozenset({"ma300"}))) as never,
        ):
            response = await api.delete("/api/v1/students/cy", headers=bearer(ADMIN))
            assert response.status_code == 200, response.text
            assert response.json()["erased"] == {"student_id": "cy", "course_id": "cs101"}
            notice = {"type": "erased", "student_id": "cy", "course_id": "cs101"}
            for client in (before, now):
                frames = list(client.frames) or await asyncio.wait_for(client.next_frames(), 10)
                assert [json.loads(frame.ws) for frame in frames] == [notice]
            assert not never.frames


async def test_an_erasure_is_logged_with_the_admin_name_and_what_went(admin_api, caplog) -> None:
    async with admin_api(ADMIN_TOKENS=f"dpo={ADMIN}") as api:
        with caplog.at_level(logging.INFO, logger="telemetry.access"):
            await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
            await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "telemetry.access"]
        assert [(line["action"], line["outcome"]) for line in lines] == [
            ("erase", "erased"),
            ("erase", "nothing"),
        ]
        assert lines[0]["token"] == "dpo"
        assert lines[0]["params"] == {"student_id": ADA, "course_id": "cs101"}
        assert lines[0]["endpoint"] == "DELETE /api/v1/students/{student_id}"
        assert lines[0]["deleted"]["events"] == 2 and lines[1]["deleted"]["events"] == 0
        assert ADMIN not in caplog.text


SALT = "0a1b2c3d4e5f60718293"


@pytest.mark.parametrize("given", ["raw id", "pseudonym"])
async def test_in_pseudonymous_mode_the_admin_may_give_the_raw_id_and_no_log_shows_it(
    admin_api, caplog, given
) -> None:
    stored = pseudonym(SALT, ADA)
    async with admin_api(ADMIN_TOKENS=f"dpo={ADMIN}", PSEUDONYMIZE_SALT=SALT) as api:
        assert stored in await every_row(api) and ADA not in await every_row(api)
        with caplog.at_level(logging.INFO):
            named = ADA if given == "raw id" else stored
            response = await api.delete(f"/api/v1/students/{named}", headers=bearer(ADMIN))
            assert response.status_code == 200, response.text
            assert response.json()["erased"] == {"student_id": stored, "course_id": "cs101"}
            again = await api.delete(f"/api/v1/students/{ADA}", headers=bearer(ADMIN))
            assert_error(again, 404, "no_such_student")
        assert stored not in await every_row(api)
        # The service's own lines (httpx, the test's client, logs the URL it requested).
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("telemetry"))
        assert ADA not in ours and ADMIN not in ours
        assert f'"student_id":"{stored}"' in ours


def test_uvicorn_access_log_hides_the_id_an_erasure_names() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "DELETE", f"/api/v1/students/{ADA}", "1.1", 200), None,
    )  # fmt: skip
    RedactTokens().filter(record)
    assert ADA not in record.getMessage()
    assert "/api/v1/students/REDACTED" in record.getMessage()
