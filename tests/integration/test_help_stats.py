"""What help took, from GET /api/v1/help/stats and its CSV, on both databases: a scripted
class of raises answered, dismissed, lowered and left to time out."""

import csv
import datetime as dt
import io

import pytest

from telemetry.classview import format_timestamp
from telemetry.forgetting import erase_student
from tests.errors import assert_error
from tests.integration.classes import help_event, post


async def backdate_raise(api, student: str, seconds: float, beat_too: bool = False) -> None:
    """Move a student's raise `seconds` into the past (and its last beat, if `beat_too`)."""
    storage = api.service.storage
    then = storage.db_time(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds))
    beat = ", last_beat_at = :then" if beat_too else ""
    await storage.database.execute(
        f"UPDATE hand_raises SET raised_at = :then{beat} WHERE student_id = :student",
        {"then": then, "student": student},
    )


async def answer(api, student: str, action: str, by: str) -> None:
    response = await api.post(f"/api/v1/help/{student}/{action}", json={"by": by})
    assert response.status_code == 201, response.text


async def stats(api, **params) -> dict:
    response = await api.get("/api/v1/help/stats", params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
async def class_helped(api):
    """Ada waits 120 s for Lee, who then dismisses her; Bob is dismissed by Kim after 60 s;
    Cy lowers his own hand; Dee's hand stops beating 40 s ago."""
    await post(api, *[{**help_event(who), "course_id": "cs101"} for who in ("ada", "bob", "cy")])
    await post(api, {**help_event("dee"), "course_id": "cs202"})
    await backdate_raise(api, "ada", 120)
    await backdate_raise(api, "bob", 60)
    await backdate_raise(api, "dee", 40, beat_too=True)
    await answer(api, "ada", "on-my-way", "Lee")
    await answer(api, "ada", "dismiss", "Lee")
    await answer(api, "bob", "dismiss", "Kim")
    await post(api, help_event("cy", "help_stop"), help_event("ada", "help_stop"))
    return api


async def test_each_raise_shows_its_wait_how_it_ended_and_how_long_it_was_up(class_helped):
    body = await stats(class_helped)
    raises = {document["student_id"]: document for document in body["raises"]}
    ada, bob, cy, dee = (raises[who] for who in ("ada", "bob", "cy", "dee"))
    assert (ada["answered_by"], ada["ended_how"], ada["ended_by"]) == ("Lee", "dismissed", "Lee")
    assert 120 <= ada["wait_seconds"] <= ada["up_seconds"] < 180
    assert (bob["answered_by"], bob["ended_how"], bob["on_my_way_at"]) == ("Kim", "dismissed", None)
    assert 60 <= bob["wait_seconds"] == bob["up_seconds"] < 120
    assert (cy["answered"], cy["wait_seconds"], cy["ended_how"]) == (False, None, "stopped")
    assert 0 <= cy["up_seconds"] < 60
    # A raise without a beat for 30 s ended at its last beat.
    assert (dee["ended_how"], dee["up_seconds"], dee["answered"]) == ("timeout", 0, False)


async def test_figures_per_helper_and_per_student(class_helped):
    body = await stats(class_helped)
    summary = body["summary"]
    assert (summary["raises"], summary["answered"]) == (4, 2)
    assert 90 <= summary["median_wait_seconds"] < 150
    helpers = {helper["helper"]: helper for helper in body["helpers"]}
    assert set(helpers) == {"Lee", "Kim"}
    assert helpers["Lee"]["raises_answered"] == 1 and helpers["Lee"]["median_wait_seconds"] >= 120
    assert 60 <= helpers["Kim"]["median_wait_seconds"] < 120
    per_student = {student["student_id"]: student for student in body["students"]}
    assert (per_student["cy"]["raises"], per_student["cy"]["median_wait_seconds"]) == (1, None)
    assert per_student["ada"]["median_up_seconds"] >= 120


async def test_a_raise_still_up_has_no_end_yet(api):
    await post(api, help_event("ada"))
    [raised] = (await stats(api))["raises"]
    assert (raised["ended_at"], raised["ended_how"], raised["up_seconds"]) == (None, None, None)


async def test_stats_read_from_since_and_the_course_asked_for(class_helped):
    later = format_timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert (await stats(class_helped, since=later))["summary"]["raises"] == 0
    cs202 = await stats(class_helped, course_id="cs202")
    assert [document["student_id"] for document in cs202["raises"]] == ["dee"]
    tokyo_midnight = dt.datetime.now(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=9)))
    since = tokyo_midnight.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
    assert (await stats(class_helped, since=since))["summary"]["raises"] == 4


async def test_raises_come_newest_first_a_page_at_a_time(class_helped):
    first = await stats(class_helped, limit=3)
    assert [document["student_id"] for document in first["raises"]] == ["dee", "cy", "bob"]
    assert first["summary"]["raises"] == 4  # the figures are over every raise, not the page
    rest = await stats(class_helped, limit=3, before_id=first["next_before_id"])
    assert ([document["student_id"] for document in rest["raises"]], rest["next_before_id"]) == (
        ["ada"], None,
    )  # fmt: skip


async def test_limit_0_gives_the_figures_without_raises(class_helped):
    body = await stats(class_helped, limit=0)
    assert (body["raises"], body["next_before_id"]) == ([], None)
    assert (body["summary"]["raises"], len(body["students"]), len(body["helpers"])) == (4, 4, 2)


@pytest.mark.parametrize(
    ("params", "fields"),
    [({"limit": "1001"}, ["limit"]), ({"limit": "-1", "before_id": "0"}, ["limit", "before_id"]),
     ({"before_id": "later"}, ["before_id"])],
)  # fmt: skip
async def test_a_bad_limit_or_before_id_is_422(api, params, fields):
    error = assert_error(await api.get("/api/v1/help/stats", params=params), 422, "invalid_query")
    assert [detail["field"] for detail in error["details"]] == fields


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01", "99999-01-01"])
async def test_a_bad_since_is_422(api, since):
    error = assert_error(await api.get("/api/v1/help/stats", params={"since": since}), 422,
                         "invalid_query")  # fmt: skip
    assert [detail["field"] for detail in error["details"]] == ["since"]


async def test_the_csv_has_a_row_per_raise_with_local_times(class_helped):
    response = await class_helped.get(
        "/api/v1/help/stats.csv", params={"course_id": "cs101", "tz": "Asia/Tokyo"}
    )
    assert response.status_code == 200 and response.content.startswith(b"\xef\xbb\xbf")
    assert 'filename="cs101-help-' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert [row["student_id"] for row in rows] == ["ada", "bob", "cy"]
    raised = dt.datetime.fromisoformat(rows[0]["raised_at"])
    local = raised.astimezone(dt.timezone(dt.timedelta(hours=9))).strftime("%Y-%m-%d %H:%M:%S")
    assert rows[0]["raised_at_local"] == local
    assert (rows[0]["answered_by"], rows[2]["ended_how"], rows[2]["wait_seconds"]) == (
        "Lee", "stopped", "",
    )  # fmt: skip


async def test_erasing_a_student_forgets_their_help_figures(class_helped):
    deleted = await erase_student(class_helped.service.storage, "ada")
    assert deleted["hand_endings"] == 1
    body = await stats(class_helped)
    assert "ada" not in {document["student_id"] for document in body["raises"]}
    assert "Lee" not in {helper["helper"] for helper in body["helpers"]}
