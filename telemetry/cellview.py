"""The cell views, read from the cell_runs summary (a row per student and cell), never from the
events: where the class is stuck, its progress through a notebook (students × cells), and one
cell as every student left it. Each reads only the token's courses and the team asked for.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from telemetry.classview import format_timestamp, in_course

if TYPE_CHECKING:
    from telemetry.storage import Storage

# The one-off rule, the only place it is written: a failing student (their latest run of the
# cell failed) is failing there *repeatedly* once they have failed that cell REPEATED_ERRORS
# times, ever. A cell whose only failing student failed it once is a one-off: a typo fixed at
# the next run, which the page folds away so the cells where students are stuck show.
REPEATED_ERRORS = 2
TOP_ERRORS = 5

# A cell_runs row `r` of a student of the team asked for (`:team`), if any.
IN_TEAM = """(CAST(:team AS TEXT) IS NULL
    OR r.student_id IN (SELECT student_id FROM students WHERE team = :team))"""
CELL_RUN_FILTERS = f"""{in_course("r.course_id")} AND {IN_TEAM}
    AND (CAST(:notebook_path AS TEXT) IS NULL OR r.notebook_path = :notebook_path)"""

# Per cell, over its students' run summaries (students × cells rows: thousands).
SELECT_CELL_TOTALS = f"""
SELECT r.notebook_path, r.cell_key, MAX(r.cell_id) AS cell_id, MAX(r.cell_index) AS cell_index,
       COUNT(*) AS students_ran, CAST(SUM(r.runs) AS BIGINT) AS runs,
       CAST(SUM(r.errors) AS BIGINT) AS errors
FROM cell_runs r WHERE {CELL_RUN_FILTERS}
GROUP BY r.notebook_path, r.cell_key"""

# The students whose latest run of a cell failed, per cell and error text, through the
# partial index cell_runs_failing_idx: the class view reads the failing, not every run.
SELECT_FAILING_GROUPS = f"""
SELECT r.notebook_path, r.cell_key, r.last_error, json_agg(r.student_id) AS students,
       SUM(CASE WHEN r.errors >= {REPEATED_ERRORS} THEN 1 ELSE 0 END) AS repeating
FROM cell_runs r WHERE r.last_status = 'error' AND {CELL_RUN_FILTERS}
GROUP BY r.notebook_path, r.cell_key, r.last_error"""


def notebook_name(path: str | None) -> str | None:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else None


def cell_label(path: str | None, index: int | None) -> str:
    """How the dashboard names a cell: `[4] lists.ipynb`, never by its id."""
    return f"[{'?' if index is None else index}] {notebook_name(path) or '(no notebook)'}"


def stuck_rank(document: Mapping[str, Any]) -> tuple:
    """Students failing there again and again first, then students failing there now."""
    index = -1 if document["cell_index"] is None else document["cell_index"]
    failing = (document["students_repeating"], document["students_failing"], document["errors"])
    return (*(-count for count in failing), document["notebook_path"] or "", index)


def cell_documents(
    totals: Iterable[Mapping[str, Any]], failing: Iterable[Mapping[str, Any]]
) -> list[dict]:
    """SELECT_CELL_TOTALS rows with their SELECT_FAILING_GROUPS rows (one per cell and error
    text), ranked by stuck_rank."""
    students: dict[tuple[str, str], list[str]] = {}
    texts: dict[tuple[str, str], Counter[str]] = {}
    repeating: Counter[tuple[str, str]] = Counter()
    for row in failing:
        key = (row["notebook_path"], row["cell_key"])
        ids = orjson.loads(row["students"])
        students.setdefault(key, []).extend(ids)
        texts.setdefault(key, Counter())[row["last_error"] or "(no message)"] += len(ids)
        repeating[key] += int(row["repeating"] or 0)
    documents = []
    for row in totals:
        key = (row["notebook_path"], row["cell_key"])
        failing_ids = students.get(key, [])
        document = cell_document(row, failing_ids, texts.get(key, Counter()))
        document["students_repeating"] = repeating[key]
        document["one_off"] = len(failing_ids) == 1 and repeating[key] == 0
        documents.append(document)
    return sorted(documents, key=stuck_rank)


def cell_fields(row: Mapping[str, Any]) -> dict:
    """Where a cell is and how the dashboard names it."""
    path = row["notebook_path"] or None
    return {
        "notebook_path": path,
        "notebook_name": notebook_name(path),
        "cell_key": row["cell_key"],
        "cell_id": row["cell_id"],
        "cell_index": row["cell_index"],
        "label": cell_label(path, row["cell_index"]),
    }


def cell_document(row: Mapping[str, Any], failing: list[str], texts: Counter[str]) -> dict:
    ranked = sorted(texts.items(), key=lambda item: (-item[1], item[0]))
    return {
        **cell_fields(row),
        "students_ran": row["students_ran"],
        "runs": row["runs"],
        "errors": row["errors"],
        "students_failing": len(failing),
        "failing_student_ids": sorted(failing),
        "top_errors": [{"error": text, "students": count} for text, count in ranked[:TOP_ERRORS]],
    }


def with_team(params: Mapping[str, Any]) -> dict:
    return {"team": None, "notebook_path": None, **params}


async def cells(storage: Storage, params: Mapping[str, Any]) -> list[dict]:
    """Per notebook and cell, who ran it and who is failing there now (see cell_documents)."""
    totals = await storage.rows(SELECT_CELL_TOTALS, with_team(params))
    failing = await storage.rows(SELECT_FAILING_GROUPS, with_team(params))
    return cell_documents(totals, failing)[: params["limit"]]


# A student `s` of the team asked for, if any: the progress queries start from students.
STUDENT_IN_TEAM = "(CAST(:team AS TEXT) IS NULL OR s.team = :team)"

# Every notebook with its first run in the scope, if any: a skip scan of cell_runs_place_idx
# (one probe per notebook), then the notebook's rows in the index's order until one is in the
# scope. Counting each notebook's students probed every student for every notebook, and an
# EXISTS here is planned as a join that reads all of cell_runs.
SELECT_NOTEBOOKS = f"""
WITH RECURSIVE notebooks (path) AS (
    SELECT MIN(notebook_path) FROM cell_runs WHERE notebook_path > ''
    UNION ALL
    SELECT (SELECT MIN(r.notebook_path) FROM cell_runs r WHERE r.notebook_path > n.path)
    FROM notebooks n WHERE n.path IS NOT NULL)
SELECT n.path AS notebook_path,
       (SELECT r.student_id FROM cell_runs r
        WHERE r.notebook_path = n.path AND {in_course("r.course_id")} AND {IN_TEAM}
        ORDER BY r.cell_key LIMIT 1) AS first_student
FROM notebooks n WHERE n.path IS NOT NULL"""

# Per notebook, the students whose latest run is in it: one backward probe of
# cell_runs_latest_idx per student (those with no run make a group of None).
SELECT_STUDENTS_HERE = f"""
SELECT here AS notebook_path, COUNT(*) AS students_here
FROM (SELECT (SELECT r.notebook_path FROM cell_runs r
              WHERE r.student_id = s.student_id AND {in_course("r.course_id")}
              ORDER BY r.last_event_id DESC LIMIT 1) AS here
      FROM students s WHERE {STUDENT_IN_TEAM}) latest
GROUP BY here"""

NOTEBOOK_RUN_FILTERS = f"""r.notebook_path = :notebook_path AND {in_course("r.course_id")}
    AND {IN_TEAM}"""
ONE_CELL_RUN = f"FROM cell_runs r WHERE {NOTEBOOK_RUN_FILTERS} AND r.cell_key = c.cell_key"

# One notebook's cells, each with its first run in the scope (if any), its id and its highest
# index: a skip scan of cell_runs_place_idx, then a few probes of it per cell. Grouping the
# notebook's runs by cell read every student's row of every cell.
SELECT_NOTEBOOK_CELLS = f"""
WITH RECURSIVE cells (cell_key) AS (
    SELECT MIN(r.cell_key) FROM cell_runs r WHERE r.notebook_path = :notebook_path
    UNION ALL
    SELECT (SELECT MIN(r.cell_key) FROM cell_runs r
            WHERE r.notebook_path = :notebook_path AND r.cell_key > c.cell_key)
    FROM cells c WHERE c.cell_key IS NOT NULL)
SELECT c.cell_key,
       (SELECT r.student_id {ONE_CELL_RUN} ORDER BY r.cell_index LIMIT 1) AS first_student,
       (SELECT r.cell_id {ONE_CELL_RUN} ORDER BY r.cell_index LIMIT 1) AS cell_id,
       (SELECT r.cell_index {ONE_CELL_RUN} AND r.cell_index IS NOT NULL
        ORDER BY r.cell_index DESC LIMIT 1) AS cell_index
FROM cells c WHERE c.cell_key IS NOT NULL"""

# One notebook's students, each with the keys of the cells whose latest run passed and failed:
# a row per student, not per student and cell, as Python reads rows far slower than SQL.
SELECT_NOTEBOOK_STUDENTS = f"""
SELECT s.student_id, s.name, s.team, squares.passed, squares.failed
FROM (SELECT r.student_id,
             json_agg(r.cell_key) FILTER (WHERE r.last_status = 'ok') AS passed,
             json_agg(r.cell_key) FILTER (WHERE r.last_status = 'error') AS failed
      FROM cell_runs r WHERE {NOTEBOOK_RUN_FILTERS}
      GROUP BY r.student_id) squares
JOIN students s ON s.student_id = squares.student_id"""


def notebook_documents(
    ran: Iterable[Mapping[str, Any]], here: Iterable[Mapping[str, Any]]
) -> list[dict]:
    """The notebooks someone in the scope ran (SELECT_NOTEBOOKS rows, with SELECT_STUDENTS_HERE's),
    the one most students are in now first."""
    students_here = {row["notebook_path"]: row["students_here"] for row in here}
    paths = [row["notebook_path"] for row in ran if row["first_student"] is not None]
    documents = [{"notebook_path": path, "notebook_name": notebook_name(path),
                  "students_here": students_here.get(path, 0)} for path in paths]  # fmt: skip
    return sorted(documents, key=lambda d: (-d["students_here"], d["notebook_path"]))


def progress_grid(
    path: str, cell_rows: Iterable[Mapping[str, Any]], student_rows: Iterable[Mapping[str, Any]]
) -> tuple[list[dict], list[dict]]:
    """The notebook's cells by cell_index (SELECT_NOTEBOOK_CELLS rows), and its students
    (SELECT_NOTEBOOK_STUDENTS rows), each with their latest status on each cell (ok, error,
    None: not run) and `furthest`: the position of the last cell they ran. A student is past
    cell k when they ran k or any later cell."""
    ran = [row for row in cell_rows if row["first_student"] is not None]
    cells = [cell_fields({**row, "notebook_path": path}) for row in ran]
    cells.sort(key=lambda c: (c["cell_index"] is None, c["cell_index"] or 0, c["cell_key"]))
    position = {cell["cell_key"]: n for n, cell in enumerate(cells)}
    failing = [0] * len(cells)
    students = []
    for row in student_rows:
        # A cell first run between the two reads is not in `position`: the next answer has it.
        passed, failed = ([position[key] for key in orjson.loads(keys or "[]") if key in position]
                          for keys in (row["passed"], row["failed"]))  # fmt: skip
        statuses: list[str | None] = [None] * len(cells)
        for at in passed:
            statuses[at] = "ok"
        for at in failed:
            statuses[at] = "error"
            failing[at] += 1
        furthest = max(passed + failed, default=-1)
        student = {key: row[key] for key in ("student_id", "name", "team")}
        students.append({**student, "statuses": statuses, "furthest": furthest})
    furthest = sorted(student["furthest"] for student in students)
    for n, cell in enumerate(cells):
        cell["students_past"] = len(furthest) - bisect.bisect_left(furthest, n)
        cell["students_failing"] = failing[n]
    students.sort(key=lambda s: (-s["furthest"], s["name"] or "", s["student_id"]))
    return cells, students


async def progress(storage: Storage, params: Mapping[str, Any]) -> dict:
    """Students × cells of one notebook (the one most students are in, unless asked)."""
    # Each pair of reads runs at once, on two of the pool's connections.
    scope = with_team(params)
    ran, here = await asyncio.gather(
        storage.rows(SELECT_NOTEBOOKS, scope), storage.rows(SELECT_STUDENTS_HERE, scope)
    )
    notebooks = notebook_documents(ran, here)
    path = params["notebook_path"] or (notebooks[0]["notebook_path"] if notebooks else None)
    cell_rows, student_rows = [], []
    if path is not None:
        asked = {**scope, "notebook_path": path}
        cell_rows, student_rows = await asyncio.gather(
            storage.rows(SELECT_NOTEBOOK_CELLS, asked),
            storage.rows(SELECT_NOTEBOOK_STUDENTS, asked),
        )
    cells, students = progress_grid(path or "", cell_rows, student_rows)
    return {"notebook_path": path, "notebook_name": notebook_name(path), "notebooks": notebooks,
            "cells": cells, "students": students}  # fmt: skip


# One cell as each student left it: their latest run's code, status and error text.
SELECT_CELL_DETAIL = f"""
SELECT r.student_id, s.name, s.team, r.cell_id, r.cell_index, r.runs, r.errors, r.last_status,
       r.last_error, e.source, e.occurred_at AS ran_at
FROM cell_runs r JOIN students s ON s.student_id = r.student_id
LEFT JOIN events e ON e.id = r.last_event_id
WHERE r.notebook_path = :notebook_path AND r.cell_key = :cell_key
  AND {in_course("r.course_id")} AND {IN_TEAM}"""


def detail_groups(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Students grouped by their latest run's error (None for a run that passed): the errors
    with most students first, then those whose run passed."""
    groups: dict[tuple[str, str | None], list[dict]] = {}
    for row in rows:
        error = (row["last_error"] or "(no message)") if row["last_status"] == "error" else None
        groups.setdefault((row["last_status"], error), []).append({
            "student_id": row["student_id"], "name": row["name"], "team": row["team"],
            "runs": row["runs"], "errors": row["errors"], "source": row["source"],
            "ran_at": format_timestamp(row["ran_at"]) if row["ran_at"] else None})  # fmt: skip
    documents = [
        {"status": status, "error": error, "count": len(students),
         "students": sorted(students, key=lambda s: (s["name"] or "", s["student_id"]))}
        for (status, error), students in groups.items()
    ]  # fmt: skip
    return sorted(documents, key=lambda g: (g["status"] != "error", -g["count"], g["error"] or ""))


async def cell_detail(storage: Storage, params: Mapping[str, Any]) -> dict:
    """Every student's latest code and error on one cell, grouped by error."""
    rows = await storage.rows(SELECT_CELL_DETAIL, with_team(params))
    indexes = [row["cell_index"] for row in rows if row["cell_index"] is not None]
    cell = {"notebook_path": params["notebook_path"], "cell_key": params["cell_key"],
            "cell_id": max((row["cell_id"] for row in rows if row["cell_id"]), default=None),
            "cell_index": max(indexes, default=None)}  # fmt: skip
    groups = detail_groups(rows)
    failing = sum(group["count"] for group in groups if group["status"] == "error")
    return {**cell_fields(cell), "students_ran": len(rows), "students_failing": failing,
            "groups": groups}  # fmt: skip
