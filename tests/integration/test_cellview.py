"""The cell views from the read API on both databases: stuck cells ranked by students failing
again and again, progress through a notebook, one cell for every student, the team filter."""

from __future__ import annotations

import pytest

from telemetry.forgetting import erase_student
from tests.errors import assert_error
from tests.integration.classes import auth, get_json, post

LAB = "week1/lists.ipynb"


def run(student: str, index: int, status: str, **more) -> dict:
    error = {"ename": "NameError", "evalue": f"name 'x{index}' is not defined"}
    return {
        "student_id": student,
        "event_type": "cell_executed",
        "notebook_path": LAB,
        "cell_id": f"c{index}",
        "cell_index": index,
        "status": status,
        "source": f"print(x{index})  # {student}",
        **({"error": error} if status == "error" else {}),
        **more,
    }


async def read(api, path: str, **params) -> dict:
    response = await api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


# Where the class is stuck


async def test_students_failing_again_and_again_outrank_one_off_failures(api) -> None:
    # Three students each failed cell 5 once; ada and bob fail cell 2 again and again.
    await post(api, *[run(student, 5, "error") for student in ("cy", "dee", "eve")])
    await post(api, run("ada", 2, "error"), run("ada", 2, "error"), run("bob", 2, "error"))
    await post(api, run("bob", 2, "error"), run("fay", 7, "error"), run("fay", 3, "ok"))
    cells = (await read(api, "/api/v1/cells"))["cells"]
    ranked = [(c["cell_key"], c["students_failing"], c["students_repeating"]) for c in cells]
    assert ranked[:3] == [("c2", 2, 2), ("c5", 3, 0), ("c7", 1, 0)]
    assert [c["one_off"] for c in cells[:3]] == [False, False, True]
    assert cells[3]["cell_key"] == "c3" and cells[3]["students_failing"] == 0


async def test_a_failure_after_a_fix_is_still_a_repeat_on_that_cell(api) -> None:
    await post(api, run("ada", 2, "error"), run("ada", 2, "ok"))
    [fixed] = (await read(api, "/api/v1/cells"))["cells"]
    assert (fixed["students_failing"], fixed["one_off"]) == (0, False)
    await post(api, run("ada", 2, "error"))
    [again] = (await read(api, "/api/v1/cells"))["cells"]
    assert (again["students_repeating"], again["one_off"]) == (1, False)


# Team filter


async def test_the_team_filter_narrows_cells_and_activity(api) -> None:
    await post(
        api, {**run("ada", 2, "error"), "team": "A"}, {**run("bob", 2, "error"), "team": "B"}
    )
    await post(
        api, {**run("bob", 3, "ok"), "team": "B"}, {"student_id": "ada", "event_type": "help"}
    )
    [cell] = (await read(api, "/api/v1/cells", team="A"))["cells"]
    assert (cell["cell_key"], cell["failing_student_ids"]) == ("c2", ["ada"])
    team_b = (await read(api, "/api/v1/cells", team="B"))["cells"]
    assert {c["cell_key"]: c["failing_student_ids"] for c in team_b} == {"c2": ["bob"], "c3": []}
    assert (await read(api, "/api/v1/cells", team="nobody"))["cells"] == []

    def totals(body: dict) -> list[int]:
        return [sum(m[name] for m in body["series"]) for name in ("executions", "errors", "help")]

    assert totals(await read(api, "/api/v1/activity", minutes=5)) == [3, 2, 1]
    assert totals(await read(api, "/api/v1/activity", minutes=5, team="A")) == [1, 1, 1]
    assert totals(await read(api, "/api/v1/activity", minutes=5, team="B")) == [2, 1, 0]


async def test_erasing_a_student_takes_them_out_of_their_teams_activity(api) -> None:
    await post(api, {**run("ada", 2, "error"), "team": "A"}, {**run("bob", 2, "ok"), "team": "A"})
    deleted = await erase_student(api.service.storage, "ada")
    assert deleted["activity_teams"] == 0  # bob's run keeps the row
    body = await read(api, "/api/v1/activity", minutes=5, team="A")
    assert [sum(m[k] for m in body["series"]) for k in ("executions", "errors")] == [1, 0]
    assert (await erase_student(api.service.storage, "bob"))["activity_teams"] == 1
    body = await read(api, "/api/v1/activity", minutes=5, team="A")
    assert sum(m["executions"] for m in body["series"]) == 0


# Progress


async def test_progress_shows_each_students_latest_status_per_cell(api) -> None:
    await post(api, run("ada", 1, "ok"), run("ada", 2, "error"), run("ada", 3, "ok"))
    await post(api, run("bob", 1, "ok"), run("bob", 2, "error"))
    await post(api, run("cy", 1, "error"), {**run("cy", 0, "ok"), "notebook_path": "other.ipynb"})
    body = await read(api, "/api/v1/progress")
    # cy's latest run is in other.ipynb, ada's and bob's in the lab: the lab comes first.
    assert body["notebook_path"] == LAB and body["notebook_name"] == "lists.ipynb"
    assert [(n["notebook_name"], n["students_here"]) for n in body["notebooks"]] == [
        ("lists.ipynb", 2),
        ("other.ipynb", 1),
    ]
    assert [(c["label"], c["students_past"], c["students_failing"]) for c in body["cells"]] == [
        ("[1] lists.ipynb", 3, 1),
        ("[2] lists.ipynb", 2, 2),
        ("[3] lists.ipynb", 1, 0),
    ]
    grid = {s["student_id"]: (s["statuses"], s["furthest"]) for s in body["students"]}
    assert grid == {
        "ada": (["ok", "error", "ok"], 2),
        "bob": (["ok", "error", None], 1),
        "cy": (["error", None, None], 0),
    }
    assert [s["student_id"] for s in body["students"]] == ["ada", "bob", "cy"]


async def test_progress_of_a_chosen_notebook_and_team(api) -> None:
    await post(api, {**run("ada", 1, "ok"), "team": "A"}, {**run("bob", 2, "ok"), "team": "B"})
    await post(api, {**run("bob", 0, "error"), "notebook_path": "other.ipynb"})
    other = await read(api, "/api/v1/progress", notebook_path="other.ipynb")
    assert [s["student_id"] for s in other["students"]] == ["bob"]
    team_a = await read(api, "/api/v1/progress", notebook_path=LAB, team="A")
    assert [c["cell_key"] for c in team_a["cells"]] == ["c1"]
    assert [s["student_id"] for s in team_a["students"]] == ["ada"]
    nowhere = await read(api, "/api/v1/progress", notebook_path="nowhere.ipynb")
    assert (nowhere["cells"], nowhere["students"]) == ([], [])
    empty = await read(api, "/api/v1/progress", team="Z")
    assert (empty["notebook_path"], empty["notebooks"], empty["students"]) == (None, [], [])


async def test_the_chooser_lists_notebooks_nobody_is_in_now_and_only_the_course_asked(api) -> None:
    await post(api, run("ada", 1, "ok", course_id="cs1"), run("bob", 1, "ok", course_id="cs1"))
    await post(api, {**run("ada", 0, "ok", course_id="cs1"), "notebook_path": "next.ipynb"})
    await post(api, {**run("bob", 0, "ok", course_id="cs1"), "notebook_path": "next.ipynb"})
    await post(api, {**run("cy", 0, "ok", course_id="cs2"), "notebook_path": "other.ipynb"})
    body = await read(api, "/api/v1/progress", course_id="cs1")
    assert body["notebook_path"] == "next.ipynb"
    assert [(n["notebook_path"], n["students_here"]) for n in body["notebooks"]] == [
        ("next.ipynb", 2),
        (LAB, 0),
    ]


# One cell, every student


async def test_one_cell_groups_students_latest_code_by_error(api) -> None:
    other = {"ename": "TypeError", "evalue": "bad operand"}
    await post(
        api, run("ada", 2, "error"), run("bob", 2, "error"), run("cy", 2, "error", error=other)
    )
    await post(
        api,
        run("dee", 2, "error"),
        run("dee", 2, "ok"),
        {**run("eve", 2, "ok"), "student_name": "Eve"},
    )
    body = await read(api, "/api/v1/cells/detail", notebook_path=LAB, cell_key="c2")
    assert (body["label"], body["cell_index"], body["students_ran"]) == ("[2] lists.ipynb", 2, 5)
    assert body["students_failing"] == 3
    groups = [(g["status"], g["error"], g["count"]) for g in body["groups"]]
    assert groups == [
        ("error", "NameError: name 'x2' is not defined", 2),
        ("error", "TypeError: bad operand", 1),
        ("ok", None, 2),
    ]
    ada = body["groups"][0]["students"][0]
    assert (ada["student_id"], ada["source"], ada["runs"], ada["errors"]) == (
        "ada", "print(x2)  # ada", 1, 1,
    )  # fmt: skip
    assert ada["ran_at"].endswith("Z")
    assert [s["name"] for s in body["groups"][2]["students"]] == [None, "Eve"]


async def test_one_cell_of_one_team(api) -> None:
    await post(
        api, {**run("ada", 2, "error"), "team": "A"}, {**run("bob", 2, "error"), "team": "B"}
    )
    body = await read(api, "/api/v1/cells/detail", notebook_path=LAB, cell_key="c2", team="B")
    assert [s["student_id"] for g in body["groups"] for s in g["students"]] == ["bob"]
    unknown = await read(api, "/api/v1/cells/detail", notebook_path=LAB, cell_key="c9")
    assert (unknown["students_ran"], unknown["groups"]) == (0, [])


# Scope and bad parameters


@pytest.mark.parametrize("who", ["cs", "both", "all"])
async def test_a_course_token_sees_only_its_course_in_the_cell_views(scoped_api, who) -> None:
    expected = {"cs": {"ada", "cy"}, "both": {"ada", "cy", "bo"}}.get(who)
    grid = await get_json(scoped_api, who, "/api/v1/progress")
    detail = await get_json(scoped_api, who, "/api/v1/cells/detail", notebook_path="w1.ipynb",
                            cell_key="c1")  # fmt: skip
    in_grid = {s["student_id"] for s in grid["students"]}
    in_detail = {s["student_id"] for g in detail["groups"] for s in g["students"]}
    everyone = {"ada", "cy", "bo", "eve", "ned"}
    assert in_grid == in_detail == (expected or everyone)


async def test_asking_the_cell_views_for_another_course_is_a_403(scoped_api) -> None:
    for path in ("/api/v1/progress", "/api/v1/cells/detail"):
        params = (
            {"course_id": "ds200", "cell_key": "c1"} if "detail" in path else {"course_id": "ds200"}
        )
        response = await scoped_api.get(path, params=params, headers=auth("cs"))
        assert_error(response, 403, "out_of_scope")


@pytest.mark.parametrize(
    ("path", "params", "fields"),
    [
        ("/api/v1/progress", {"notebook": "x", "teams": "A"}, ["notebook", "teams"]),
        ("/api/v1/progress", {"team": "x" * 5000}, ["team"]),
        ("/api/v1/cells/detail", {"notebook_path": LAB}, ["cell_key"]),
        ("/api/v1/cells/detail", {"cell_key": "c1", "cell_id": "c1"}, ["cell_id"]),
        ("/api/v1/cells", {"team": "x" * 5000}, ["team"]),
        ("/api/v1/activity", {"teams": "A"}, ["teams"]),
    ],
)
async def test_bad_or_unknown_cell_view_parameters_are_422(api, path, params, fields) -> None:
    response = await api.get(path, params=params)
    error = assert_error(response, 422, "invalid_query")
    assert [detail["field"] for detail in error["details"]] == fields
