"""Course-scoped dashboard tokens through the read API, the CSV exports and the hand actions,
in process, on both databases; the access log they leave."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from telemetry.application import create_app
from telemetry.bus import encode_batch
from telemetry.config import Settings, load_settings
from telemetry.hub import Hub, StreamFilter, deliver_message
from telemetry.ingest import normalise_batch
from tests.errors import assert_error
from tests.integration.classes import CLASS, COURSES_OF, SECRETS, STUDENTS_OF, auth, get_json
from tests.integration.conftest import ApiClient


def csv_students(response: httpx.Response, column: str) -> set[str]:
    assert response.status_code == 200, response.text
    return {
        row[column] for row in csv.DictReader(io.StringIO(response.content.decode("utf-8-sig")))
    }


@pytest.mark.parametrize("who", ["cs", "both", "all"])
async def test_each_token_reads_its_courses_students_only_everywhere(scoped_api, who) -> None:
    expected = STUDENTS_OF[who]
    events = await get_json(scoped_api, who, "/api/v1/events", limit="1000")
    assert {event["student_id"] for event in events["events"]} == expected
    students = await get_json(scoped_api, who, "/api/v1/students")
    assert {student["student_id"] for student in students["students"]} == expected
    help_answer = await get_json(scoped_api, who, "/api/v1/help")
    assert {hand["student_id"] for hand in help_answer["queue"]} == expected
    cells = await get_json(scoped_api, who, "/api/v1/cells")
    assert {s for cell in cells["cells"] for s in cell["failing_student_ids"]} == expected
    activity = await get_json(scoped_api, who, "/api/v1/activity", minutes="5")
    assert sum(minute["errors"] for minute in activity["series"]) == len(expected)
    assert sum(minute["help"] for minute in activity["series"]) == len(expected)
    for path in ("/api/v1/events.csv", "/api/v1/students.csv"):
        response = await scoped_api.get(path, headers=auth(who))
        assert csv_students(response, "student_id") == expected


@pytest.mark.parametrize("who", ["cs", "both"])
async def test_a_scoped_token_never_sees_events_without_a_course(scoped_api, who) -> None:
    events = await get_json(scoped_api, who, "/api/v1/events", limit="1000")
    assert {event["course_id"] for event in events["events"]} == COURSES_OF[who]
    everything = await get_json(scoped_api, "all", "/api/v1/events", limit="1000")
    assert None in {event["course_id"] for event in everything["events"]}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/events", {"course_id": "ds200"}),
        ("/api/v1/students", {"course_id": "ds200"}),
        ("/api/v1/help", {"course_id": "ds200"}),
        ("/api/v1/cells", {"course_id": "ds200"}),
        ("/api/v1/activity", {"course_id": "ds200"}),
        ("/api/v1/events.csv", {"course_id": "ds200"}),
        ("/api/v1/students.csv", {"course_id": "ds200"}),
        ("/api/v1/stream", {"course_id": "ds200"}),
        ("/api/v1/events", {"course_id": "nowhere"}),
    ],
)
async def test_asking_for_another_course_is_a_403_naming_it(scoped_api, path, params) -> None:
    response = await scoped_api.get(path, params=params, headers=auth("cs"))
    error = assert_error(response, 403, "out_of_scope")
    assert params["course_id"] in error["message"] and "lee" in error["message"]
    assert error["details"] == [
        {"field": "course_id", "problem": "is outside this token's courses (cs101)"}
    ]


@pytest.mark.parametrize("student", ["bo", "ned", "eve", "nobody-yet"])
@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/events.csv", "/api/v1/stream"])
async def test_asking_for_a_student_of_another_course_is_a_403(scoped_api, path, student) -> None:
    response = await scoped_api.get(path, params={"student_id": student}, headers=auth("cs"))
    error = assert_error(response, 403, "out_of_scope")
    assert error["details"][0]["field"] == "student_id" and student in error["message"]


async def test_a_student_of_the_tokens_course_is_read_in_full(scoped_api) -> None:
    timeline = await get_json(scoped_api, "cs", "/api/v1/events", student_id="ada")
    assert {event["event_type"] for event in timeline["events"]} == {"cell_executed", "help"}
    own = await get_json(scoped_api, "both", "/api/v1/students", course_id="ds200")
    assert [student["student_id"] for student in own["students"]] == ["bo"]


@pytest.mark.parametrize("action", ["on-my-way", "dismiss"])
async def test_hand_actions_across_courses_are_refused_and_store_nothing(
    scoped_api, action
) -> None:
    before = await get_json(scoped_api, "all", "/api/v1/events", limit="1")
    refused = await scoped_api.post(f"/api/v1/help/bo/{action}", headers=auth("cs"))
    assert_error(refused, 403, "out_of_scope")
    after = await get_json(scoped_api, "all", "/api/v1/events", limit="1")
    assert after["latest_id"] == before["latest_id"]
    allowed = await scoped_api.post(f"/api/v1/help/ada/{action}", headers=auth("cs"))
    assert allowed.status_code == 201, allowed.text


async def test_the_session_cookie_carries_the_scope_of_its_token(scoped_api) -> None:
    session = await scoped_api.post("/api/v1/session", headers=auth("cs"))
    assert session.json()["courses"] == ["cs101"]
    assert session.json()["rules"]["stuck_error_streak"] == 3
    assert session.json()["ingest_token_required"] is False  # no INGEST_TOKENS here
    cookie = session.cookies["telemetry_token"]
    scoped_api.cookies.set("telemetry_token", cookie)
    try:
        shown = await scoped_api.get("/api/v1/session")
        assert shown.json()["courses"] == ["cs101"]
        students = await scoped_api.get("/api/v1/students")
        assert {s["student_id"] for s in students.json()["students"]} == STUDENTS_OF["cs"]
        other = await scoped_api.get("/api/v1/events", params={"course_id": "ds200"})
        assert_error(other, 403, "out_of_scope")
    finally:
        scoped_api.cookies.clear()


async def test_a_wrong_token_is_still_401(scoped_api) -> None:
    for headers in ({}, {"Authorization": "Bearer cs-secret-"}):
        response = await scoped_api.get("/api/v1/events", headers=headers)
        assert_error(response, 401, "unauthorized")
    assert_error(await scoped_api.get("/api/v1/session"), 401, "unauthorized")


async def test_every_read_leaves_one_access_line_with_the_name_never_the_secret(
    scoped_api, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="telemetry.access"):
        await get_json(scoped_api, "cs", "/api/v1/events", student_id="ada", limit="5")
        await scoped_api.get("/api/v1/students.csv", headers=auth("both"))
        await scoped_api.get("/api/v1/events", params={"course_id": "ds200"}, headers=auth("cs"))
        await scoped_api.get("/api/v1/cells", params={"token": SECRETS["all"]})
    records = [r for r in caplog.records if r.name == "telemetry.access"]
    lines = [json.loads(record.getMessage()) for record in records]
    assert [(line["token"], line["outcome"]) for line in lines] == [
        ("lee", "allowed"),
        ("duo", "allowed"),
        ("lee", "refused"),
        (next(g.name for g in scoped_api.service.settings.dashboard_tokens if g.courses is None),
         "allowed"),
    ]  # fmt: skip
    assert lines[0]["endpoint"] == "GET /api/v1/events"
    assert lines[0]["params"] == {"student_id": "ada", "limit": "5"}
    assert lines[0]["courses"] == ["cs101"] and lines[1]["courses"] == ["cs101", "ds200"]
    assert lines[2]["params"] == {"course_id": "ds200"}
    assert lines[3]["courses"] == "all" and lines[3]["params"] == {}
    text = "\n".join(record.getMessage() for record in records)
    assert not any(secret in text for secret in SECRETS.values())


async def test_the_gap_fill_from_the_database_keeps_to_the_clients_courses(storage) -> None:
    hub = Hub(queue_limit=100)
    with (
        hub.subscribe(StreamFilter(courses=frozenset({"cs101"}))) as lee,
        hub.subscribe(StreamFilter()) as root,
    ):
        now = dt.datetime.now(dt.UTC)
        lost, published = [
            await storage.store([{**event, "received_at": now} for event in normalise_batch(
                [{**student, "event_type": "x"} for student in CLASS], now, Settings()
            )])
            for _ in range(2)
        ]  # fmt: skip
        # The first batch was never published: the second's message makes the hub read it.
        await deliver_message(hub, storage, encode_batch(published))
        documents = [item.document for batch in (lost, published) for item in batch.results]
        assert [frame.id for frame in root.frames] == [document["id"] for document in documents]
        assert [frame.id for frame in lee.frames] == [
            document["id"] for document in documents if document["course_id"] == "cs101"
        ]


async def test_a_student_of_two_courses_shows_each_token_only_its_courses_part(scoped_api) -> None:
    """mo ran and failed a notebook and raised a hand in ma300, then moved to cs101: lee
    (cs101) sees mo, but nothing of what mo did in ma300."""
    ma300 = {"student_id": "mo", "course_id": "ma300"}
    run = {"event_type": "cell_executed", "notebook_path": "ma-private.ipynb", "cell_id": "m9"}
    events = [{**ma300, **run, "status": "error"}] * 3 + [{**ma300, "event_type": "help"}]
    events.append({"student_id": "mo", "course_id": "cs101", "event_type": "opened"})
    response = await scoped_api.post("/api/v1/events", json=events)
    assert response.status_code == 201, response.text

    students = await get_json(scoped_api, "cs", "/api/v1/students")
    mo = next(student for student in students["students"] if student["student_id"] == "mo")
    assert mo["course_id"] == "cs101" and mo["last_event_type"] == "opened"
    assert (mo["last_notebook_path"], mo["last_cell_id"], mo["recent_statuses"]) == (None, None, [])
    assert not mo["stuck"] and not mo["hand_raised"]
    queue = await get_json(scoped_api, "cs", "/api/v1/help")
    assert "mo" not in {hand["student_id"] for hand in queue["queue"]}
    exported = await scoped_api.get("/api/v1/students.csv", headers=auth("cs"))
    assert "mo" in csv_students(exported, "student_id") and "ma-private" not in exported.text

    everything = await get_json(scoped_api, "all", "/api/v1/students")
    mo = next(student for student in everything["students"] if student["student_id"] == "mo")
    assert mo["last_notebook_path"] == "ma-private.ipynb"
    assert (mo["event_count"], mo["error_count"]) == (5, 3)
    assert mo["stuck"] and mo["hand_raised"]
    queue = await get_json(scoped_api, "all", "/api/v1/help")
    assert "mo" in {hand["student_id"] for hand in queue["queue"]}


@pytest.fixture
async def course_ingest_api(database_url: str) -> AsyncIterator[ApiClient]:
    """The app whose ingest token `lab` carries the course cs101, and `any` none."""
    tokens = load_settings({"INGEST_TOKENS": "lab=lab-secret:cs101,any=any-secret"})
    app = create_app(Settings(database_url=database_url, ingest_tokens=tokens.ingest_tokens))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with ApiClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_events_posted_with_a_course_token_belong_to_its_course(course_ingest_api) -> None:
    api = course_ingest_api
    camel = [{"eventType": "cell_executed", "emailAddress": "ada@uni.edu", "cellIndex": 1}]
    for token, body in (("lab-secret", camel), ("lab-secret", {"student_id": "bo",
                        "event_type": "run", "course_id": "ds200"}),  # names its own
                        ("any-secret", {"student_id": "cy", "event_type": "run"})):  # fmt: skip
        response = await api.post("/api/v1/events", params={"token": token}, json=body)
        assert response.status_code == 201, response.text
    students = (await api.get("/api/v1/students")).json()["students"]
    courses = {student["student_id"]: student["course_id"] for student in students}
    assert courses == {"ada@uni.edu": "cs101", "bo": "ds200", "cy": None}


async def test_an_unknown_query_parameter_on_ingest_is_a_422_naming_it(api) -> None:
    body = {"student_id": "ada", "event_type": "run"}
    response = await api.post("/api/v1/events?course_id=cs101&tokn=x", json=body)
    error = assert_error(response, 422, "invalid_query")
    assert {detail["field"] for detail in error["details"]} == {"course_id", "tokn"}
    assert (await api.get("/api/v1/students")).json()["students"] == []
    response = await api.post("/api/v1/events?token=anything", json=body)
    assert response.status_code == 201, response.text  # open ingest: a token is never unknown
