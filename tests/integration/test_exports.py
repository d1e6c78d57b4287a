"""CSV exports a spreadsheet opens as they are: a BOM, a name by course and date, local
times; and a cell over the source limit stored cut and flagged. On both databases."""

import csv
import datetime as dt
import io
from zoneinfo import ZoneInfo

import pytest

from telemetry.events import SOURCE_MAX_CHARS
from tests.errors import assert_error
from tests.integration.classes import post, run

BOM = b"\xef\xbb\xbf"


def rows_of(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))


@pytest.mark.parametrize("path", ["/api/v1/events.csv", "/api/v1/students.csv"])
async def test_csvs_start_with_a_bom_so_japanese_names_open_as_written(api, path) -> None:
    await post(api, {**run("ada", "c1", "ok"), "student_name": "田中太郎"})
    response = await api.get(path)
    assert response.content.startswith(BOM + b"id," if "events" in path else BOM + b"student_id,")
    assert "田中太郎".encode() in response.content


@pytest.mark.parametrize(
    ("params", "name"),
    [({"course_id": "cs101"}, "cs101-events"), ({}, "all-courses-events")],
)
async def test_a_csv_is_named_by_course_and_local_date(api, params, name) -> None:
    await post(api, {**run("ada", "c1", "ok"), "course_id": "cs101"})
    response = await api.get("/api/v1/events.csv", params={**params, "tz": "Asia/Tokyo"})
    today = dt.datetime.now(ZoneInfo("Asia/Tokyo")).date().isoformat()
    assert f'filename="{name}-{today}.csv"' in response.headers["content-disposition"]


async def test_a_course_name_outside_ascii_keeps_its_utf8_filename(api) -> None:
    await post(api, {**run("ada", "c1", "ok"), "course_id": "情報基礎"})
    response = await api.get("/api/v1/students.csv", params={"course_id": "情報基礎"})
    disposition = response.headers["content-disposition"]
    assert "filename*=UTF-8''%E6%83%85%E5%A0%B1%E5%9F%BA%E7%A4%8E-students-" in disposition
    assert disposition.isascii()


async def test_local_time_columns_follow_the_tz_parameter(api) -> None:
    await post(api, {**run("ada", "c1", "ok"), "team": "A"}, run("bob", "c1", "ok"))
    [event] = rows_of(await api.get("/api/v1/events.csv", params={"tz": "Asia/Tokyo",
                                                                   "team": "A"}))  # fmt: skip
    received = dt.datetime.fromisoformat(event["received_at"])
    local = received.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S")
    assert (event["student_id"], event["received_at_local"]) == ("ada", local)
    [student] = rows_of(await api.get("/api/v1/students.csv", params={"team": "A"}))
    assert student["last_seen_local"] == received.strftime("%Y-%m-%d %H:%M:%S")  # UTC unless asked


@pytest.mark.parametrize("path", ["/api/v1/events.csv", "/api/v1/students.csv",
                                  "/api/v1/help/stats.csv"])  # fmt: skip
@pytest.mark.parametrize("tz", ["Mars/Olympus", "../../etc/passwd", "x" * 5000])
async def test_an_unknown_time_zone_is_422(api, path, tz) -> None:
    error = assert_error(await api.get(path, params={"tz": tz}), 422, "invalid_query")
    assert [detail["field"] for detail in error["details"]] == ["tz"]


def cell_monitor_run(code: str, **more) -> dict:
    """A run as cell-monitor-extension posts it: camelCase, `code` for the source."""
    return {"eventType": "cell_executed", "emailAddress": "ada@uni.edu", "notebookPath": "a.ipynb",
            "cellId": "c1", "code": code, "hasError": False, **more}  # fmt: skip


async def test_a_cell_over_the_source_limit_is_stored_cut_and_flagged(api) -> None:
    response = await api.post("/api/v1/events", json=[cell_monitor_run("x" * 300_000)])
    assert response.status_code == 201, response.text
    short = await api.post("/api/v1/events", json=[cell_monitor_run("1", source_truncated=True)])
    assert short.status_code == 201, short.text
    cut, whole = (await api.get("/api/v1/events")).json()["events"][::-1]
    assert (len(cut["source"]), cut["source_truncated"]) == (SOURCE_MAX_CHARS, True)
    assert (whole["source"], whole["source_truncated"]) == ("1", False)
    assert "source_truncated" not in cut["extra"] and "source_truncated" not in whole["extra"]
    lines = (await api.get("/api/v1/events.csv")).content.decode("utf-8-sig").splitlines()
    assert lines[0].endswith(",source,source_truncated")
    assert lines[1].endswith("x,true") and lines[2].endswith(",1,false")
