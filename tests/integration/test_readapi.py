"""The read API (GET /api/v1/events, GET /api/v1/students) on PostgreSQL and SQLite."""

import pytest

from telemetry.hub import StreamFilter
from tests.errors import assert_error

# Six events: two courses, three students, two notebooks, help raised and lowered.
EVENTS = [
    {"student_id": "ada", "student_name": "Ada", "course_id": "c1", "event_type": "cell_executed",
     "notebook_path": "lab1.ipynb", "cell_id": "A", "status": "error"},
    {"student_id": "ada", "event_type": "cell_executed", "notebook_path": "lab1.ipynb",
     "cell_id": "A", "status": "error"},
    {"student_id": "bob", "student_name": "Bob", "course_id": "c2", "event_type": "help"},
    {"student_id": "ada", "event_type": "cell_executed", "notebook_path": "lab2.ipynb",
     "cell_id": "B", "status": "ok"},
    {"student_id": "cy", "course_id": "c1", "event_type": "help"},
    {"student_id": "cy", "event_type": "help_stop", "notebook_path": "lab2.ipynb"},
]  # fmt: skip


@pytest.fixture
async def client(api_client, database_url: str):
    async with api_client(database_url) as client:
        client.ids = []
        for batch in (EVENTS[:3], EVENTS[3:]):  # api_client takes at most 5 per batch
            response = await client.post("/api/v1/events", json=batch)
            assert response.status_code == 201
            client.ids += [receipt["id"] for receipt in response.json()["events"]]
        yield client


async def event_ids(client, **params) -> list[int]:
    response = await client.get("/api/v1/events", params=params)
    assert response.status_code == 200, response.text
    return [event["id"] for event in response.json()["events"]]


@pytest.mark.parametrize(
    ("params", "positions"),
    [
        ({}, [5, 4, 3, 2, 1, 0]),
        ({"student_id": "ada"}, [3, 1, 0]),
        ({"course_id": "c1"}, [5, 4, 3, 1, 0]),  # the student's course when the event has none
        ({"event_type": "help"}, [4, 2]),
        ({"notebook_path": "lab2.ipynb"}, [5, 3]),
        ({"student_id": "ada", "notebook_path": "lab1.ipynb"}, [1, 0]),
        ({"course_id": "c2", "event_type": "cell_executed"}, []),
        ({"student_id": ""}, [5, 4, 3, 2, 1, 0]),  # empty means absent, as forms send it
    ],
)
async def test_event_filters_select_matching_events_newest_first(client, params, positions):
    assert await event_ids(client, **params) == [client.ids[i] for i in positions]


async def test_before_id_pages_walk_the_whole_history_once(client) -> None:
    seen, before_id = [], None
    while True:
        params = {"limit": 4, "course_id": "c1"} | ({"before_id": before_id} if before_id else {})
        body = (await client.get("/api/v1/events", params=params)).json()
        seen += [event["id"] for event in body["events"]]
        before_id = body["next_before_id"]
        if before_id is None:
            break
    assert seen == [client.ids[i] for i in (5, 4, 3, 1, 0)]


async def test_since_id_and_before_id_select_a_window(client) -> None:
    ids = client.ids
    assert await event_ids(client, since_id=ids[3]) == [ids[5], ids[4]]
    assert await event_ids(client, since_id=ids[0], before_id=ids[3]) == [ids[2], ids[1]]
    body = (await client.get("/api/v1/events", params={"since_id": ids[5]})).json()
    assert body == {"events": [], "next_before_id": None, "latest_id": ids[5]}


async def test_read_api_returns_the_documents_the_stream_sends(client) -> None:
    with client.service.hub.subscribe(StreamFilter()) as listener:
        more = [{**EVENTS[0], "source": "1/0", "error": "boom", "outputs": [{"x": 1}], "seq": 7},
                {**EVENTS[1], "custom_field": {"nested": True}}]  # fmt: skip
        assert (await client.post("/api/v1/events", json=more)).status_code == 201
        streamed = [frame.document for frame in await listener.next_frames()]
    body = (await client.get("/api/v1/events", params={"limit": 2})).json()
    assert body["events"] == streamed[::-1]
    assert body["latest_id"] == streamed[-1]["id"]


@pytest.mark.parametrize(
    ("path", "params", "fields"),
    [
        ("/api/v1/events", {"limit": "0"}, ["limit"]),
        ("/api/v1/events", {"limit": "1001"}, ["limit"]),
        ("/api/v1/events", {"limit": "ten", "before_id": "-1"}, ["before_id", "limit"]),
        ("/api/v1/events", {"since_id": "1.5"}, ["since_id"]),
        ("/api/v1/events", {"before_id": str(2**63)}, ["before_id"]),
        ("/api/v1/events", {"student_id": "x" * 257}, ["student_id"]),
        ("/api/v1/students", {"limit": "-3"}, ["limit"]),
        ("/api/v1/students", {"after": "x" * 257}, ["after"]),
    ],
)
async def test_bad_query_parameters_get_a_422_naming_each(client, path, params, fields) -> None:
    error = assert_error(await client.get(path, params=params), 422, "invalid_query")
    assert sorted(detail["field"] for detail in error["details"]) == fields


async def test_students_have_counts_last_event_help_and_stuck_state(client) -> None:
    more = [{"student_id": "ada", "event_type": "cell_executed", "cell_id": "A", "status": "error"}]
    await client.post("/api/v1/events", json=more)
    body = (await client.get("/api/v1/students")).json()
    assert body["next_after"] is None
    students = {student["student_id"]: student for student in body["students"]}
    assert list(students) == ["ada", "bob", "cy"]
    ada, bob, cy = students["ada"], students["bob"], students["cy"]
    assert (ada["name"], ada["course_id"]) == ("Ada", "c1")
    assert (ada["event_count"], ada["execution_count"], ada["error_count"]) == (4, 4, 3)
    assert ada["last_event_type"] == "cell_executed" and ada["last_notebook_path"] == "lab2.ipynb"
    # An ok run of cell B leaves cell A's streak alone: three errors there in a row.
    assert (ada["error_streak"], ada["streak_cell_id"], ada["stuck"]) == (3, "A", True)
    assert (bob["hand_raised"], cy["hand_raised"]) == (True, False)
    assert bob["last_event_id"] == client.ids[2] and bob["error_count"] == 0
    assert ada["first_seen"] <= ada["last_seen"] and ada["last_seen"].endswith("Z")


async def test_students_filter_by_course_and_page_by_student_id(client) -> None:
    body = (await client.get("/api/v1/students", params={"course_id": "c1"})).json()
    assert [student["student_id"] for student in body["students"]] == ["ada", "cy"]
    seen, after = [], None
    while True:
        params = {"limit": 1} | ({"after": after} if after else {})
        body = (await client.get("/api/v1/students", params=params)).json()
        seen += [student["student_id"] for student in body["students"]]
        after = body["next_after"]
        if after is None:
            break
    assert seen == ["ada", "bob", "cy"]
