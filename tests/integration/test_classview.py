"""Running a class from the read API: hands, stuck cells, activity, CSV, on both databases."""

import csv
import datetime as dt
import io

import httpx
import pytest

from telemetry.hub import StreamFilter
from tests.integration.classes import age_hands, help_event, help_queue, post, run, students


def assert_422(response: httpx.Response, *fields: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (422, error["code"]) and error["message"]
    assert [detail["field"] for detail in error["details"]] == list(fields)


# Students


async def test_students_show_team_current_cell_hand_and_struggling(api) -> None:
    await post(api, {**run("ada", "c1", "ok"), "team": "A", "course_id": "cs101"})
    await post(api, *[run("ada", f"c{1 + i % 3}", "error") for i in range(6)])
    await post(api, run("bob", "c1", "ok"), help_event("bob"))
    body = await students(api)
    ada, bob = body["ada"], body["bob"]
    assert ada["team"] == "A" and (ada["last_cell_id"], ada["last_cell_index"]) == ("c3", 3)
    assert ada["last_status"] == "error" and ada["recent_statuses"] == ["ok"] + ["error"] * 6
    # Errors move from cell to cell: never stuck, but struggling.
    assert (ada["stuck"], ada["struggling"]) == (False, True)
    assert ada["hand_raised"] is False and ada["hand_raised_at"] is None
    assert bob["hand_raised"] is True and bob["hand_on_my_way"] is None
    assert bob["hand_raised_at"] == bob["hand_last_beat_at"]
    assert bob["struggling"] is False


async def test_a_students_place_survives_events_without_a_cell(api) -> None:
    await post(api, run("ada", "c3", "error"))
    await post(api, help_event("ada"), help_event("ada", "notebook_saved"))
    ada = (await students(api))["ada"]
    [hand] = (await help_queue(api))["queue"]
    assert (ada["last_cell_index"], ada["last_notebook_path"]) == (3, "week1/lists.ipynb")
    assert (hand["cell_id"], hand["cell_index"]) == ("c3", 3)
    assert ada["last_event_type"] == "notebook_saved"


async def test_students_answer_carries_the_server_clock(api) -> None:
    response = await api.get("/api/v1/students")
    now = dt.datetime.fromisoformat(response.json()["now"])
    assert abs((now - dt.datetime.now(dt.UTC)).total_seconds()) < 60


# Hands


async def test_queue_is_first_come_first_served_and_beats_do_not_reorder_it(api) -> None:
    await post(api, help_event("zoe"))
    await post(api, help_event("abe"))
    await post(api, help_event("zoe"), help_event("zoe"))  # beats
    body = await help_queue(api)
    assert [hand["student_id"] for hand in body["queue"]] == ["zoe", "abe"]
    zoe = body["queue"][0]
    assert zoe["raised_at"] < zoe["last_beat_at"] and zoe["state"] == "up"
    assert zoe["notebook_path"] == "week1/lists.ipynb"


async def test_help_stop_lowers_the_hand_and_the_next_help_raises_it_anew(api) -> None:
    await post(api, help_event("ada"))
    first = (await help_queue(api))["queue"][0]["raised_at"]
    await post(api, help_event("ada", "help_stop"))
    assert (await help_queue(api))["queue"] == []
    assert (await students(api))["ada"]["hand_raised"] is False
    await post(api, help_event("ada"))
    [again] = (await help_queue(api))["queue"]
    assert again["raised_at"] > first


async def test_a_hand_without_a_beat_for_30_seconds_is_down(api) -> None:
    await post(api, help_event("ada"))
    await age_hands(api, 29)
    assert [hand["student_id"] for hand in (await help_queue(api))["queue"]] == ["ada"]
    await age_hands(api, 31)
    assert (await help_queue(api)) | {"now": None} == {"now": None, "queue": [], "hands": []}
    assert (await students(api))["ada"]["hand_raised"] is False
    await post(api, help_event("ada"))  # the older release's beat after a lapse: a new hand
    assert len((await help_queue(api))["queue"]) == 1


async def test_on_my_way_is_recorded_with_who_and_shown_everywhere(api) -> None:
    await post(api, help_event("ada", course_id="cs101"))
    with api.service.hub.subscribe(StreamFilter()) as listener:
        response = await api.post("/api/v1/help/ada/on-my-way", json={"by": "Ms Lee"})
        assert response.status_code == 201, response.text
        [frame] = await listener.next_frames()
    body = response.json()
    assert body["event_type"] == "help_on_my_way" and body["hand"]["state"] == "up"
    assert body["hand"]["on_my_way"]["by"] == "Ms Lee"
    assert frame.document["event_type"] == "help_on_my_way"
    assert frame.document["extra"] == {"by": "Ms Lee"}
    assert frame.document["course_id"] == "cs101" and frame.id == body["id"]
    [hand] = (await help_queue(api))["queue"]
    assert hand["on_my_way"] == body["hand"]["on_my_way"]
    assert (await students(api))["ada"]["hand_on_my_way"]["by"] == "Ms Lee"


async def test_dismissed_hand_stays_down_while_the_extension_keeps_beating(api) -> None:
    await post(api, help_event("ada"))
    response = await api.post("/api/v1/help/ada/dismiss")
    assert response.status_code == 201 and response.json()["hand"]["state"] == "dismissed"
    await post(api, help_event("ada"))  # the student has not lowered it yet
    body = await help_queue(api)
    assert body["queue"] == []
    assert [(hand["student_id"], hand["state"]) for hand in body["hands"]] == [("ada", "dismissed")]
    again = await api.post("/api/v1/help/ada/dismiss")
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_raised_hand"
    await post(api, help_event("ada", "help_stop"), help_event("ada"))
    assert [hand["student_id"] for hand in (await help_queue(api))["queue"]] == ["ada"]


async def test_a_dismissal_survives_a_reload(api) -> None:
    await post(api, help_event("ada"))
    await api.post("/api/v1/help/ada/dismiss", json={"by": None})
    page = await api.get("/api/v1/events", params={"student_id": "ada"})
    assert [event["event_type"] for event in page.json()["events"]] == ["help_dismissed", "help"]
    assert (await students(api))["ada"]["hand_raised"] is False


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/api/v1/help/nobody/dismiss", {}, 404, "no_such_student"),
        ("/api/v1/help/bob/dismiss", {}, 409, "no_raised_hand"),
        ("/api/v1/help/ada/wave", {}, 404, "not_found"),
        ("/api/v1/help/ada/dismiss", {"json": {"by": 7}}, 422, "invalid_body"),
        ("/api/v1/help/ada/dismiss", {"json": {"who": "x"}}, 422, "invalid_body"),
        ("/api/v1/help/ada/dismiss", {"json": ["x"]}, 422, "invalid_body"),
        ("/api/v1/help/ada/dismiss", {"content": b"{"}, 415, "unsupported_media_type"),
    ],
)
async def test_hand_actions_refuse_in_the_error_shape(api, path, kwargs, status, code) -> None:
    await post(api, help_event("ada"), run("bob", "c1", "ok"))
    response = await api.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert [hand["student_id"] for hand in (await help_queue(api))["queue"]] == ["ada"]


async def test_collapse_beats_shows_one_help_per_raise(api) -> None:
    ids = await post(api, help_event("ada"), help_event("ada"), help_event("ada"))
    ids += await post(api, run("ada", "c1", "ok"), help_event("ada", "help_stop"))
    ids += await post(api, help_event("ada"), help_event("ada"))
    response = await api.get("/api/v1/events", params={"collapse_beats": "true"})
    assert [event["id"] for event in response.json()["events"]] == [
        ids[5], ids[4], ids[3], ids[0]
    ]  # fmt: skip
    everything = await api.get("/api/v1/events", params={"collapse_beats": "false"})
    assert len(everything.json()["events"]) == 7


# Cells


async def test_cells_show_who_ran_who_fails_now_and_the_commonest_errors(api) -> None:
    name_error = {"ename": "NameError", "evalue": "\x1b[0;31mname 'x' is not defined\x1b[0m"}
    await post(
        api,
        run("ada", "c2", "error", error=name_error),
        run("bob", "c2", "error", error=name_error),
        run("cy", "c2", "error", error={"ename": "TypeError", "evalue": "bad"}),
        run("dee", "c2", "error", error=name_error),
    )
    await post(api, run("dee", "c2", "ok"), run("ada", "c1", "ok"))
    response = await api.get("/api/v1/cells")
    assert response.status_code == 200
    c2, c1 = response.json()["cells"]
    assert c2 == {
        "notebook_path": "week1/lists.ipynb",
        "notebook_name": "lists.ipynb",
        "cell_key": "c2",
        "cell_id": "c2",
        "cell_index": 2,
        "label": "[2] lists.ipynb",
        "students_ran": 4,
        "runs": 5,
        "errors": 4,
        "students_failing": 3,
        "failing_student_ids": ["ada", "bob", "cy"],
        "students_repeating": 0,
        "one_off": False,
        "top_errors": [
            {"error": "NameError: name 'x' is not defined", "students": 2},
            {"error": "TypeError: bad", "students": 1},
        ],
    }
    assert (c1["label"], c1["students_ran"], c1["students_failing"]) == ("[1] lists.ipynb", 1, 0)


async def test_cells_filter_by_course_and_notebook(api) -> None:
    await post(
        api,
        {**run("ada", "c1", "error"), "course_id": "cs101"},
        {**run("bob", "c1", "error"), "course_id": "cs202"},
        {**run("bob", "c3", "ok"), "notebook_path": "week2.ipynb", "course_id": "cs202"},
    )
    # cy's runs name no course: they count in the course cy's student row has.
    await post(api, {"student_id": "cy", "event_type": "session_started", "course_id": "cs101"})
    await post(api, run("cy", "c1", "error"))
    one = (await api.get("/api/v1/cells", params={"course_id": "cs101"})).json()["cells"]
    assert [(cell["label"], cell["failing_student_ids"]) for cell in one] == [
        ("[1] lists.ipynb", ["ada", "cy"])
    ]
    assert one[0]["students_ran"] == 2
    week2 = await api.get("/api/v1/cells", params={"notebook_path": "week2.ipynb"})
    assert [cell["label"] for cell in week2.json()["cells"]] == ["[3] week2.ipynb"]


async def test_camel_case_error_message_is_shown_without_colour_codes(api) -> None:
    camel = {
        "eventType": "cell_executed",
        "emailAddress": "ada@uni.edu",
        "notebookPath": "lab.ipynb",
        "cellId": "x1",
        "cellIndex": 0,
        "hasError": True,
        "errorMessage": "ZeroDivisionError: \x1b[0;31mdivision by zero[0m",
    }
    await post(api, camel)
    [cell] = (await api.get("/api/v1/cells")).json()["cells"]
    assert cell["top_errors"] == [{"error": "ZeroDivisionError: division by zero", "students": 1}]


async def test_one_error_sent_as_whole_tracebacks_is_one_group(api) -> None:
    red, reset = "\x1b[0;31m", "\x1b[0m"

    def traceback(count: int) -> str:
        return (
            f"{red}{'-' * 75}{reset}\n{red}KeyError{reset}   Traceback (most recent call last)\n"
            f"Cell In[{count}], line 1\n----> 1 df['price']\n\n{red}KeyError{reset}: 'price'"
        )

    await post(api, run("ada", "c2", "error", error=traceback(11)))
    await post(api, run("bob", "c2", "error", error=traceback(14)))
    [cell] = (await api.get("/api/v1/cells")).json()["cells"]
    assert cell["top_errors"] == [{"error": "KeyError: 'price'", "students": 2}]
    [story] = (await api.get("/api/v1/events", params={"student_id": "ada"})).json()["events"]
    assert story["error_text"] == "KeyError: 'price'"


# Activity


async def test_activity_counts_executions_errors_and_raised_hands_per_minute(api) -> None:
    await post(api, run("ada", "c1", "ok"), run("ada", "c1", "error"), help_event("ada"))
    await post(
        api, help_event("ada"), help_event("bob"), {**run("cy", "c1", "ok"), "course_id": "x"}
    )
    response = await api.get("/api/v1/activity", params={"minutes": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["minutes"] == 5 and len(body["series"]) == 5
    assert body["series"][-1]["minute"] == body["now"][:16] + ":00Z"
    minutes = [entry["minute"] for entry in body["series"]]
    assert minutes == sorted(set(minutes))
    # Summed: the minute may turn between the posts and the read.
    totals = [
        sum(entry[name] for entry in body["series"]) for name in ("executions", "errors", "help")
    ]
    assert totals == [3, 1, 2]
    course = await api.get("/api/v1/activity", params={"course_id": "x", "minutes": 1})
    [only] = course.json()["series"]
    assert (only["executions"], only["errors"], only["help"]) == (1, 0, 0)


async def test_activity_counts_each_active_student_once_per_minute_across_batches(api) -> None:
    await post(api, run("ada", "c1", "ok"), run("ada", "c1", "error"))
    await post(api, run("ada", "c2", "ok"), help_event("bob"))
    await post(api, {**run("cy", "c1", "ok"), "course_id": "x"})
    body = (await api.get("/api/v1/activity", params={"minutes": 2})).json()
    # The minute may turn between the posts: each student is active in one or both.
    assert 3 <= sum(entry["active"] for entry in body["series"]) <= 6
    assert max(entry["active"] for entry in body["series"]) >= 2
    course = (await api.get("/api/v1/activity", params={"course_id": "x", "minutes": 2})).json()
    assert sum(entry["active"] for entry in course["series"]) == 1


# CSV


def read_csv(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.content.startswith(b"\xef\xbb\xbf")  # the BOM spreadsheets need
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))


async def test_events_csv_streams_a_course_oldest_first_with_formulas_defused(api) -> None:
    ids = await post(
        api,
        {**run("ada", "c1", "error"), "course_id": "cs101", "source": "=HYPERLINK(1)",
         "error": {"ename": "ValueError", "evalue": "\x1b[31mno\x1b[0m"}},
        {**run("bob", "c1", "ok"), "course_id": "cs202"},
        {**run("ada", "c2", "ok"), "student_name": "Ada, L."},
    )  # fmt: skip
    rows = read_csv(await api.get("/api/v1/events.csv", params={"course_id": "cs101"}))
    assert [int(row["id"]) for row in rows] == [ids[0], ids[2]]
    assert rows[0]["source"] == "'=HYPERLINK(1)" and rows[0]["error"] == "ValueError: no"
    assert rows[1]["student_name"] == "Ada, L." and rows[1]["cell_index"] == "2"
    one = read_csv(await api.get("/api/v1/events.csv", params={"student_id": "bob"}))
    assert [int(row["id"]) for row in one] == [ids[1]]


async def test_events_csv_walks_every_page(api) -> None:
    for start in range(0, 2_100, 500):
        await post(api, *[run(f"s{n}", "c1", "ok") for n in range(start, min(start + 500, 2_100))])
    rows = read_csv(await api.get("/api/v1/events.csv"))
    assert len(rows) == 2_100 and len({row["id"] for row in rows}) == 2_100


async def test_students_csv_has_one_row_per_student(api) -> None:
    await post(api, {**run("ada", "c1", "error"), "team": "A"}, help_event("bob"))
    rows = read_csv(await api.get("/api/v1/students.csv"))
    assert [(row["student_id"], row["team"], row["hand_raised"]) for row in rows] == [
        ("ada", "A", "false"),
        ("bob", "", "true"),
    ]
    assert read_csv(await api.get("/api/v1/students.csv", params={"course_id": "none"})) == []


# Parameters


@pytest.mark.parametrize(
    ("path", "params", "fields"),
    [
        ("/api/v1/events", {"course": "cs101"}, ["course"]),
        ("/api/v1/events", {"collapse_beats": "yes"}, ["collapse_beats"]),
        ("/api/v1/students", {"course": "cs101"}, ["course"]),
        ("/api/v1/help", {"student_id": "ada"}, ["student_id"]),
        ("/api/v1/cells", {"limit": "0", "cell": "x"}, ["limit", "cell"]),
        ("/api/v1/activity", {"minutes": "1441"}, ["minutes"]),
        ("/api/v1/activity", {"minutes": "-5"}, ["minutes"]),
        ("/api/v1/events.csv", {"limit": "10"}, ["limit"]),
        ("/api/v1/students.csv", {"after": "x"}, ["after"]),
    ],
)
async def test_bad_or_unknown_parameters_are_422(api, path, params, fields) -> None:
    assert_422(await api.get(path, params=params), *fields)


async def test_a_token_parameter_is_never_unknown(api) -> None:
    response = await api.get("/api/v1/cells", params={"token": "anything"})
    assert response.status_code == 200


# Validation in the camelCase shape


async def test_camel_case_problems_name_the_clients_own_keys(api) -> None:
    response = await api.post(
        "/api/v1/events",
        json=[
            {"eventType": "cell_executed", "userName": "Ada"},
            {"eventType": "cell_executed", "emailAddress": "a@x", "hasError": "true"},
            {"eventType": "cell_executed", "emailAddress": "a@x", "cellIndex": -1},
        ],
    )
    assert_422(response, "events[0].emailAddress", "events[1].hasError", "events[2].cellIndex")
    assert response.json()["error"]["details"][1]["problem"] == "must be true or false"
    assert (await api.get("/api/v1/events")).json()["events"] == []
