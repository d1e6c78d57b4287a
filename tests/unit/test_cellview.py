"""The cell views' pure parts: names, the stuck ranking and the one-off rule, the grid."""

import pytest

from telemetry.cellview import cell_documents, cell_label, detail_groups, progress_grid


@pytest.mark.parametrize(
    ("path", "index", "label"),
    [
        ("course/week1/lists.ipynb", 4, "[4] lists.ipynb"),
        ("C:\\work\\lab.ipynb", 0, "[0] lab.ipynb"),
        ("lab.ipynb", None, "[?] lab.ipynb"),
        (None, 3, "[3] (no notebook)"),
    ],
)
def test_cells_are_labelled_by_index_and_notebook_name(path, index, label) -> None:
    assert cell_label(path, index) == label


def test_cell_documents_rank_errors_by_failing_students() -> None:
    totals = [
        {"notebook_path": "", "cell_key": "#1", "cell_id": None, "cell_index": 1,
         "students_ran": 5, "runs": 9, "errors": 5},
        {"notebook_path": "n", "cell_key": "c", "cell_id": "c", "cell_index": 0,
         "students_ran": 2, "runs": 2, "errors": 0},
    ]  # fmt: skip
    failing = [
        {
            "notebook_path": "",
            "cell_key": "#1",
            "last_error": None,
            "students": '["b"]',
            "repeating": 1,
        },
        {
            "notebook_path": "",
            "cell_key": "#1",
            "last_error": "B: x",
            "students": '["c", "a"]',
            "repeating": 0,
        },
        {
            "notebook_path": "",
            "cell_key": "#1",
            "last_error": "A: y",
            "students": '["d"]',
            "repeating": 0,
        },
    ]
    first, second = cell_documents(totals[::-1], failing)
    assert first["notebook_path"] is None and first["label"] == "[1] (no notebook)"
    assert first["failing_student_ids"] == ["a", "b", "c", "d"]
    assert (first["students_ran"], first["students_failing"]) == (5, 4)
    assert first["top_errors"] == [
        {"error": "B: x", "students": 2},
        {"error": "(no message)", "students": 1},
        {"error": "A: y", "students": 1},
    ]
    assert (second["label"], second["students_failing"], second["top_errors"]) == (
        "[0] n",
        0,
        [],
    )


def test_a_cell_whose_one_failing_student_failed_once_is_a_one_off() -> None:
    totals = [
        {"notebook_path": "n", "cell_key": key, "cell_id": key, "cell_index": index,
         "students_ran": 3, "runs": 3, "errors": errors}
        for key, index, errors in (("once", 1, 1), ("twice", 2, 2), ("two", 3, 2))
    ]  # fmt: skip
    failing = [
        {"notebook_path": "n", "cell_key": "once", "last_error": "E", "students": '["a"]',
         "repeating": 0},
        {"notebook_path": "n", "cell_key": "twice", "last_error": "E", "students": '["b"]',
         "repeating": 1},
        {"notebook_path": "n", "cell_key": "two", "last_error": "E", "students": '["c", "d"]',
         "repeating": 0},
    ]  # fmt: skip
    ranked = [(c["cell_key"], c["one_off"]) for c in cell_documents(totals, failing)]
    assert ranked == [("twice", False), ("two", False), ("once", True)]


def test_progress_grid_orders_cells_by_index_and_counts_who_is_past_each() -> None:
    cells = [
        {"cell_key": k, "cell_id": k, "cell_index": i, "first_student": first}
        for k, i, first in (("x", None, "b"), ("y2", 5, "c"), ("y", 3, "a"), ("z", 0, "a"),
                            ("w", 1, None))  # w: no one in the scope ran it
    ]  # fmt: skip
    # d's only cell was first run after the cells were read: it shows at the next answer.
    students = [
        {"student_id": s, "name": s.upper(), "team": None, "passed": passed, "failed": failed}
        for s, passed, failed in (("a", '["z"]', '["y"]'), ("b", '["x"]', '["z"]'),
                                  ("c", '["y", "y2"]', None),
                                  ("d", '["late"]', "[]"))
    ]  # fmt: skip
    cells, students = progress_grid("lab.ipynb", cells, students)
    assert [(c["cell_key"], c["label"], c["students_past"], c["students_failing"])
            for c in cells] == [
        ("z", "[0] lab.ipynb", 3, 1), ("y", "[3] lab.ipynb", 3, 1), ("y2", "[5] lab.ipynb", 2, 0),
        ("x", "[?] lab.ipynb", 1, 0),
    ]  # fmt: skip
    assert [(s["student_id"], s["statuses"], s["furthest"]) for s in students] == [
        ("b", ["error", None, None, "ok"], 3),
        ("c", [None, "ok", "ok", None], 2),
        ("a", ["ok", "error", None, None], 1),
        ("d", [None, None, None, None], -1),
    ]


def test_detail_groups_put_the_commonest_error_first_and_passing_runs_last() -> None:
    rows = [
        {"student_id": s, "name": None, "team": None, "runs": 1, "errors": 1, "source": "x",
         "ran_at": None, "last_status": status, "last_error": error}
        for s, status, error in (("a", "ok", None), ("b", "error", "B"), ("c", "error", "A"),
                                 ("d", "error", "B"), ("e", "error", None))
    ]  # fmt: skip
    groups = [(g["status"], g["error"], g["count"]) for g in detail_groups(rows)]
    assert groups == [("error", "B", 2), ("error", "(no message)", 1), ("error", "A", 1),
                      ("ok", None, 1)]  # fmt: skip
