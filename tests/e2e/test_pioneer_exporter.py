"""jupyterlab-pioneer's real remote_exporter coroutine against a real uvicorn server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyterlab_pioneer.default_exporters import remote_exporter
from websockets.asyncio.client import ClientConnection, connect

from telemetry.storage import format_timestamp
from tests.conftest import REDIS_URL, Server, fresh_postgres_database
from tests.pioneer_samples import (
    CELL_FIELDS,
    EVENT_TYPES,
    NOTEBOOK_PATH,
    SECRETS,
    SESSION,
    pioneer_data,
)

TOKEN = "course-token-7d1e"
PARAMS = {"course_id": "SI101", "token": TOKEN}
ENV = ["JUPYTERHUB_USER", "WORKSPACE_ID"]


@pytest.fixture(params=["sqlite", "postgres+redis"])
async def backend(request: pytest.FixtureRequest, channel: str) -> AsyncIterator[dict[str, str]]:
    """The embedded default, then PostgreSQL with the Redis bus."""
    if request.param == "sqlite":
        yield {}
    else:
        async with fresh_postgres_database() as url:
            yield {"DATABASE_URL": url, "REDIS_URL": REDIS_URL, "NOTIFICATION_CHANNEL": channel}


@pytest.fixture
def jupyter_server_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """remote_exporter reads the env values from its own process, the Jupyter server."""
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("WORKSPACE_ID", "w-9")


async def export(server: Server, data: dict, exporter_id: str = "ClassroomTelemetry", **args):
    """One call of the exporter, configured as docs-pioneer.md tells admins to."""
    config = {"id": exporter_id, "url": f"{server.url}/api/v1/events", "params": PARAMS, "env": ENV}
    return await remote_exporter({**config, **args, "data": data})


def now_ms() -> int:
    return int(time.time() * 1000)  # Date.now()


async def receive(websocket: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(websocket.recv(), 10)) for _ in range(count)]


@pytest.mark.usefixtures("jupyter_server_environ")
async def test_every_event_type_from_the_real_exporter_is_stored_and_broadcast(
    backend: dict[str, str], start_server
) -> None:
    server = start_server(PIONEER_ENVIRON_ALLOW="COURSE,HOME", **backend)
    sent_at = []
    # last_event_id=0 replays whatever a POST commits before this socket is subscribed.
    async with connect(f"{server.ws_url}/api/v1/ws?last_event_id=0") as live:
        for name, info, content, _ in EVENT_TYPES:
            sent_at.append(now_ms())
            result = await export(server, pioneer_data(name, info, sent_at[-1], content))
            assert result["message"]["code"] == 201, result
        broadcast = await receive(live, len(EVENT_TYPES))
    async with connect(f"{server.ws_url}/api/v1/ws?last_event_id=0") as later:
        stored = await receive(later, len(EVENT_TYPES))

    assert stored == broadcast
    for document, (name, _, _, expected), ms in zip(stored, EVENT_TYPES, sent_at, strict=True):
        assert (document["event_type"], document["student_id"]) == (name, "alice")
        assert (document["session_id"], document["notebook_path"]) == (SESSION, NOTEBOOK_PATH)
        assert document["occurred_at"] == format_timestamp(
            dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        )
        assert document["course_id"] == "SI101"
        assert {key: document[key] for key in CELL_FIELDS if document[key] is not None} == expected
        pioneer = document["extra"]["pioneer"]
        assert pioneer["params"] == {"course_id": "SI101"}
        assert pioneer["env"] == [{"JUPYTERHUB_USER": "alice"}, {"WORKSPACE_ID": "w-9"}]
    [opened] = [document for document in stored if document["event_type"] == "NotebookOpenEvent"]
    environ = opened["extra"]["pioneer"]["eventInfo"]["environ"]
    assert environ == {"COURSE": "SI101", "HOME": "/home/jovyan"}
    for secret in (*SECRETS, TOKEN):
        assert secret not in json.dumps(stored) and secret not in server.logs()


@pytest.mark.usefixtures("jupyter_server_environ")
async def test_exporter_id_with_s3_is_stored_despite_its_url_suffix(start_server) -> None:
    server = start_server()
    data = pioneer_data("NotebookSaveEvent", None, now_ms())
    result = await export(server, data, exporter_id="S3Exporter")
    assert result["message"]["code"] == 201, result
    async with connect(f"{server.ws_url}/api/v1/ws?last_event_id=0") as websocket:
        [document] = await receive(websocket, 1)
    assert (document["event_type"], document["student_id"]) == ("NotebookSaveEvent", "alice")


async def test_exporter_without_a_student_gets_a_422_naming_what_is_missing(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    server = start_server()
    result = await export(server, pioneer_data("NotebookSaveEvent", None, now_ms()), env=[])
    assert result["message"]["code"] == 422
    [detail] = json.loads(result["message"]["body"])["error"]["details"]
    assert detail["field"] == "event.params.student_id"
    assert "JUPYTERHUB_USER" in detail["problem"]
