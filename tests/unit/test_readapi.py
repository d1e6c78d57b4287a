"""The read API's pure parts: query parameters and the stuck rule."""

import pytest

from telemetry.classview import error_streak
from telemetry.errors import ApiError
from telemetry.events import INT64_MAX
from telemetry.readapi import PAGE_LIMIT_DEFAULT, parse_events_query, parse_students_query


def test_events_query_defaults_select_the_newest_page() -> None:
    assert parse_events_query({}) == {
        "student_id": None,
        "course_id": None,
        "team": None,
        "event_type": None,
        "notebook_path": None,
        "since_id": 0,
        "before_id": INT64_MAX,
        "limit": PAGE_LIMIT_DEFAULT,
        "collapse_beats": False,
    }


def test_events_query_keeps_filters_and_bounds() -> None:
    query = {"student_id": "s", "notebook_path": "a b.ipynb", "since_id": "3", "limit": " 7 "}
    params = parse_events_query(query)
    assert (params["student_id"], params["notebook_path"]) == ("s", "a b.ipynb")
    assert (params["since_id"], params["limit"]) == (3, 7)


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "1e3"}, {"before_id": "0"}, {"since_id": "-1"}, {"limit": "١٢"}],
)
def test_events_query_rejects_bad_numbers(query) -> None:
    with pytest.raises(ApiError) as raised:
        parse_events_query(query)
    assert raised.value.status == 422
    assert [detail["field"] for detail in raised.value.details] == list(query)


def test_students_query_starts_before_every_student_id() -> None:
    assert parse_students_query({"course_id": ""}) == {
        "course_id": None,
        "team": None,
        "after": "",
        "limit": PAGE_LIMIT_DEFAULT,
    }


ERR, OK = "error", "ok"


@pytest.mark.parametrize(
    ("executions", "expected"),
    [
        ([], (None, 0)),
        ([("a", ERR), ("a", ERR), ("a", ERR)], ("a", 3)),
        ([("a", ERR), ("a", ERR), ("a", OK)], (None, 0)),
        ([("a", ERR), ("b", OK), ("a", ERR)], ("a", 2)),  # fixing an earlier cell
        ([("a", ERR), ("b", ERR), ("b", ERR)], ("b", 2)),
        ([("a", OK), ("a", ERR)], ("a", 1)),
        ([(None, ERR), (None, ERR)], (None, 2)),  # clients without cell ids
    ],
)
def test_error_streak_counts_errors_in_a_row_on_one_cell(executions, expected) -> None:
    assert error_streak(executions) == expected
