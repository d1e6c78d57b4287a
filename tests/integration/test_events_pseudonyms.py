"""Pseudonymous mode through the HTTP API, on both databases: the raw ids and names the
clients send reach no table, no answer and no log line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.config import Settings
from telemetry.events import pseudonym
from telemetry.forgetting import FORGOTTEN_TABLES
from tests.pseudonym_samples import CAMEL, OURS, PIONEER, RAW_IDS, SALT, leaks


@pytest.fixture
async def pseudonymous(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=database_url, pseudonymize_salt=SALT))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.storage = app.state.service.storage
            yield client


async def test_raw_ids_and_names_reach_no_table_answer_or_log(pseudonymous, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        hand = [{**OURS, "event_type": "help"}, {**OURS, "event_type": "help_stop"}]
        for body in (OURS, CAMEL, PIONEER, *hand):
            response = await pseudonymous.post("/api/v1/events", json=body)
            assert response.status_code == 201, response.text
            assert leaks(response.text) == []
        answers = [
            await pseudonymous.get(path)
            for path in ("/api/v1/events", "/api/v1/students", "/api/v1/events.csv",
                         "/api/v1/students.csv", "/api/v1/cells", "/api/v1/help",
                         "/api/v1/help/stats", "/api/v1/help/stats.csv")
        ]  # fmt: skip
    for answer in answers:
        assert answer.status_code == 200 and leaks(answer.text) == [], answer.text
    assert leaks("\n".join(record.getMessage() for record in caplog.records)) == []
    database = pseudonymous.storage.database
    for table in FORGOTTEN_TABLES:
        rows = await database.fetch_all(f"SELECT * FROM {table}")
        assert rows, f"{table} is empty: nothing to search"
        assert leaks(repr([tuple(row) for row in rows])) == [], table
    students = await database.fetch_all("SELECT student_id, name FROM students ORDER BY 1")
    assert sorted((row[0], row[1]) for row in students) == sorted(
        (pseudonym(SALT, raw), None) for raw in RAW_IDS
    )
    counts = await database.fetch_all("SELECT student_id, events FROM student_counts")
    assert dict((row[0], row[1]) for row in counts)[pseudonym(SALT, RAW_IDS[0])] == 3


async def test_help_actions_take_the_pseudonym_the_dashboard_shows(pseudonymous) -> None:
    raised = {**OURS, "event_type": "help"}
    assert (await pseudonymous.post("/api/v1/events", json=raised)).status_code == 201
    [hand] = (await pseudonymous.get("/api/v1/help")).json()["queue"]
    assert hand["student_id"] == pseudonym(SALT, OURS["student_id"]) and hand["name"] is None
    answer = await pseudonymous.post(f"/api/v1/help/{hand['student_id']}/on-my-way")
    assert answer.status_code == 201, answer.text
    assert (await pseudonymous.get("/api/v1/help")).json()["queue"][0]["on_my_way"]
