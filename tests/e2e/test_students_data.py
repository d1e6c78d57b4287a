"""Pseudonymous mode and retention in a deployed service: a real uvicorn, its own logs."""

from __future__ import annotations

import time

import httpx

from tests.pseudonym_samples import CAMEL, OURS, PIONEER, SALT, leaks


def wait_for_line(server, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in server.logs().splitlines() if text in line]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the log within {timeout} s:\n{server.logs()}")


def test_no_raw_id_or_name_in_the_services_logs_and_retention_runs_then_stops_cleanly(
    start_server, postgres_database_url
) -> None:
    server = start_server(
        DATABASE_URL=postgres_database_url,
        PSEUDONYMIZE_SALT=SALT,
        RETENTION_DAYS="1",
        LOG_LEVEL="DEBUG",
    )
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for body in (OURS, CAMEL, PIONEER):
            assert client.post("/api/v1/events", json=body).status_code == 201
        refused = client.post("/api/v1/events", json={**OURS, "status": "maybe"})
        assert refused.status_code == 422 and leaks(refused.text) == []
        answer = client.get("/api/v1/events", params={"limit": 10})
        assert len(answer.json()["events"]) == 3 and leaks(answer.text) == []
    line = wait_for_line(server, "retention: deleted")
    assert "0 events" in line and "in 1 batches" in line
    server.stop()
    logs = server.logs()
    assert "POST /api/v1/events" in logs  # the access log was on, and is clean too
    assert leaks(logs) == []
    assert "Traceback" not in logs and "CancelledError" not in logs
