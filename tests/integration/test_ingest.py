"""The HTTP API in process (httpx over ASGI, lifespan run) on PostgreSQL and SQLite."""

import pytest

from tests.errors import assert_error

EVENT = {"student_id": "s1", "event_type": "cell_executed", "event_id": "e1", "source": "1+1"}


async def count_events(client) -> int:
    return await client.service.storage.database.fetch_val("SELECT COUNT(*) FROM events")


async def test_post_answers_201_with_ids_and_duplicate_flags(client) -> None:
    first = await client.post("/api/v1/events", json=EVENT)
    assert first.status_code == 201
    [receipt] = first.json()["events"]
    assert receipt["event_id"] == "e1" and receipt["duplicate"] is False
    again = await client.post("/api/v1/events", json=[EVENT, {**EVENT, "event_id": "e2"}])
    assert again.status_code == 201
    assert [(r["id"] == receipt["id"], r["duplicate"]) for r in again.json()["events"]] == [
        (True, True),
        (False, False),
    ]
    assert await count_events(client) == 2


async def test_server_generates_event_ids_when_absent(client) -> None:
    response = await client.post("/api/v1/events", json={"student_id": "s", "event_type": "x"})
    assert len(response.json()["events"][0]["event_id"]) == 36


JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
TOO_MANY = b"[" + b",".join([b'{"student_id":"s","event_type":"x"}'] * 6) + b"]"
TOO_LONG = b'{"student_id":"' + b"x" * 3000 + b'"}'


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{", JSON, 400, "malformed_json"),
        (b"\xff\xfe\x00", JSON, 400, "malformed_json"),
        (b"student_id=s", FORM, 415, "unsupported_media_type"),
        (b'{"a":1}', {}, 415, "unsupported_media_type"),
        (b'{"event_type":"x"}', JSON, 422, "invalid_event"),
        (b"[]", JSON, 422, "empty_batch"),
        (TOO_MANY, JSON, 413, "batch_too_large"),
        (TOO_LONG, JSON, 413, "body_too_large"),
    ],
)
async def test_bad_input_gets_a_json_error_and_stores_nothing(
    client, content, headers, status, code
):
    response = await client.post("/api/v1/events", content=content, headers=headers)
    assert_error(response, status, code)
    assert await count_events(client) == 0


async def test_invalid_fields_are_each_named(client) -> None:
    response = await client.post(
        "/api/v1/events", json=[EVENT, {"student_id": 5, "event_type": "x", "status": "maybe"}]
    )
    error = assert_error(response, 422, "invalid_event")
    assert [d["field"] for d in error["details"]] == ["events[1].student_id", "events[1].status"]
    assert await count_events(client) == 0


async def test_body_larger_than_declared_is_cut_off(client) -> None:
    async def body():
        yield b'{"student_id":"s","event_type":"x","source":"'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    response = await client.post(
        "/api/v1/events", content=body(), headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "/api/v1/events", 405),
        ("GET", "/nope", 404),
        ("DELETE", "/api/v1/events", 405),
        ("POST", "/api/v1/events/anything", 404),
        ("POST", "/api/v1/events/2026/11/27", 404),
    ],
)
async def test_unknown_routes_and_methods_get_json_errors(client, method, path, status) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["status"] == status


async def test_healthz_reports_database_and_bus(client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "up", "bus": "up", "clients": 0}


async def test_healthz_is_503_naming_the_database_when_it_is_gone(
    api_client, postgres_database_url
) -> None:
    async with api_client(postgres_database_url) as client:
        await client.service.storage.disconnect()
        try:
            response = await client.get("/healthz")
        finally:
            await client.service.storage.database.connect()
        assert response.status_code == 503
        body = response.json()
        assert body["database"].startswith("down") and body["bus"] == "up"


async def test_pioneer_s3_date_suffix_reaches_the_same_endpoint(client) -> None:
    # jupyterlab-pioneer appends /YYYY/MM/DD/HH when its exporter id contains "s3".
    envelope = {
        "data": {"eventDetail": {"eventName": "NotebookSaveEvent", "eventTime": 1795737731762}},
        "params": {"student_id": "s-42"},
        "env": [],
    }
    response = await client.post("/api/v1/events/2026/11/27/00", json=envelope)
    assert response.status_code == 201, response.text
    assert await count_events(client) == 1
