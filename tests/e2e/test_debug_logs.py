"""What the real process logs at LOG_LEVEL=DEBUG in pseudonymous mode: no student's raw id and
no event's content, not even in the query logs of `databases` and aiosqlite, which print every
query's arguments at DEBUG."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from telemetry.events import pseudonym
from tests.conftest import fresh_postgres_database
from tests.pseudonym_samples import SALT

ADMIN = "dpo-secret-e2e-1"
RAW_ID = "ada.debug-log@uni.edu"
CODE = "print('debug-log-secret-code')"


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
    else:
        async with fresh_postgres_database() as url:
            yield {"DATABASE_URL": url}


async def test_debug_logs_hold_no_raw_id_and_no_event_content(backend, start_server) -> None:
    server = start_server(
        LOG_LEVEL="DEBUG", PSEUDONYMIZE_SALT=SALT, ADMIN_TOKENS=f"dpo={ADMIN}", **backend
    )
    event = {"student_id": RAW_ID, "event_type": "cell_executed", "source": CODE}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        posted = await client.post("/api/v1/events", json=event)
        assert posted.status_code == 201, posted.text
        erased = await client.delete(
            f"/api/v1/students/{RAW_ID}", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert erased.status_code == 200, erased.text
        assert erased.json()["deleted"]["events"] == 1
    server.stop()
    logs = server.logs()
    assert pseudonym(SALT, RAW_ID) in logs  # the erasure's access line: the search looks
    assert RAW_ID not in logs and "debug-log-secret-code" not in logs
