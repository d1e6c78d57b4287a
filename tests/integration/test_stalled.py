"""Stalled students and the one status per student, from the read API, on both databases.
Time passes by moving stored receipt times into the past."""

import datetime as dt

import httpx
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.config import Settings
from tests.integration.classes import post, run, students


async def age(api, ids: list[int], minutes: float) -> None:
    """Move the events `ids` `minutes` into the past, and their students' last sighting to
    their latest event, as if nothing came since."""
    storage = api.service.storage
    then = storage.db_time(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes))
    for event_id in ids:
        await storage.database.execute(
            "UPDATE events SET received_at = :then WHERE id = :id", {"then": then, "id": event_id}
        )
    await storage.database.execute(
        "UPDATE students SET last_seen = (SELECT MAX(e.received_at) FROM events e "
        "WHERE e.student_id = students.student_id)"
    )


async def test_failing_on_one_cell_for_ten_minutes_while_active_is_stalled(api) -> None:
    first = await post(api, run("ada", "c1", "error"))
    await age(api, first, 11)
    await post(api, run("ada", "c2", "ok"), run("ada", "c1", "error"))
    ada = (await students(api))["ada"]
    assert (ada["stalled"], ada["stuck"], ada["status"]) == (True, False, "stalled")
    assert ada["stalled_since"] == ada["streak_started_at"] != ada["last_run_at"]


async def test_failing_for_less_than_ten_minutes_is_not_stalled(api) -> None:
    first = await post(api, run("ada", "c1", "error"))
    await age(api, first, 5)
    await post(api, run("ada", "c1", "error"))
    ada = (await students(api))["ada"]
    assert (ada["stalled"], ada["stalled_since"], ada["status"]) == (False, None, "active")


async def test_a_success_on_the_cell_starts_the_clock_again(api) -> None:
    old = await post(api, run("ada", "c1", "error"), run("ada", "c1", "ok"))
    await age(api, old, 11)
    await post(api, run("ada", "c1", "error"))
    assert (await students(api))["ada"]["stalled"] is False


async def test_an_error_on_another_cell_starts_the_clock_again(api) -> None:
    old = await post(api, run("ada", "c1", "error"))
    await age(api, old, 11)
    await post(api, run("ada", "c2", "error"))
    assert (await students(api))["ada"]["stalled"] is False


async def test_going_quiet_after_a_failure_is_stalled_until_away(api) -> None:
    failed = await post(api, run("ada", "c1", "error"))
    passed = await post(api, run("bob", "c1", "ok"))
    gone = await post(api, run("cy", "c1", "error"))
    await age(api, failed + passed, 3)
    await age(api, gone, 11)
    body = await students(api)
    ada, bob, cy = body["ada"], body["bob"], body["cy"]
    assert (ada["stalled"], ada["status"]) == (True, "stalled")
    assert ada["stalled_since"] == ada["last_run_at"] == ada["last_seen"]
    assert (bob["stalled"], bob["status"]) == (False, "idle")
    assert (cy["stalled"], cy["status"]) == (False, "away")


async def test_status_puts_a_raised_hand_then_stuck_before_stalled(api) -> None:
    old = await post(api, *[run(who, "c1", "error") for who in ("ada", "bob")])
    await age(api, old, 11)
    await post(api, run("ada", "c1", "error"), run("ada", "c1", "error"))
    await post(api, run("bob", "c1", "error"), {"student_id": "bob", "event_type": "help"})
    body = await students(api)
    assert (body["ada"]["stalled"], body["ada"]["stuck"], body["ada"]["status"]) == (
        True, True, "stuck",
    )  # fmt: skip
    assert (body["bob"]["stalled"], body["bob"]["status"]) == (True, "help")


async def test_the_page_reads_stalled_minutes_from_the_session(api) -> None:
    rules = (await api.get("/api/v1/session")).json()["rules"]
    assert rules["stalled_minutes"] == 10
    assert rules["active_seconds"] < rules["idle_seconds"]


async def test_stalled_minutes_is_a_setting_the_session_carries(database_url) -> None:
    app = create_app(Settings(database_url=database_url, stalled_minutes=3))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            api.service = app.state.service
            assert (await api.get("/api/v1/session")).json()["rules"]["stalled_minutes"] == 3
            first = await post(api, run("ada", "c1", "error"))
            await age(api, first, 4)
            await post(api, run("ada", "c1", "error"))
            assert (await students(api))["ada"]["status"] == "stalled"


async def test_students_csv_has_the_status(api) -> None:
    first = await post(api, run("ada", "c1", "error"))
    await age(api, first, 3)
    response = await api.get("/api/v1/students.csv")
    text = response.content.decode("utf-8-sig")
    assert text.splitlines()[0].endswith("stalled,status")
    assert text.splitlines()[1].endswith("true,stalled")


async def test_the_streak_start_survives_successes_on_other_cells(api) -> None:
    first = await post(api, run("ada", "c1", "error"))
    await age(api, first, 4)
    await post(api, run("ada", "c1", "error"), run("ada", "c2", "ok"))
    ada = (await students(api))["ada"]
    assert (ada["error_streak"], ada["last_status"], ada["stalled"]) == (2, "ok", False)
    assert ada["streak_started_at"] < ada["last_run_at"]
