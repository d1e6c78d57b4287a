"""Injection payloads in every field are stored and returned verbatim, on both databases."""

import pytest

PAYLOADS = [
    "'; DROP TABLE events; --",
    "\\'; DELETE FROM students WHERE '1'='1",
    "%s %(student_id)s :student_id $1 ? {}",
    "<script>alert(1)</script>",
    "Robert'); DROP TABLE students;--",
    "\\x00 \\u0000 ' \" ` \\\\",
]
TEXT_FIELDS = [
    "student_id", "event_type", "event_id", "student_name", "course_id", "team",
    "session_id", "notebook_path", "cell_id", "source",
]  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS)
async def test_injection_payloads_are_stored_verbatim(api_client, database_url, payload) -> None:
    event = {field: f"{payload}:{field}" for field in TEXT_FIELDS}
    event["custom"] = {payload: payload}
    async with api_client(database_url) as client:
        response = await client.post("/api/v1/events", json=event)
        assert response.status_code == 201, response.text
        [stored] = await client.service.storage.events_after(0, 10)
        assert await client.service.storage.database.fetch_val("SELECT COUNT(*) FROM students") == 1
    assert {field: stored[field] for field in TEXT_FIELDS} == {
        field: event[field] for field in TEXT_FIELDS
    }
    assert stored["extra"] == {"custom": {payload: payload}}
