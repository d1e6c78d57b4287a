"""A class posted and read back through the API in process: the events the tests post, the
course tokens they read with, and the reads they share."""

from __future__ import annotations

import datetime as dt

import httpx

SECRETS = {"cs": "cs-secret-1", "both": "both-secret-2", "all": "all-secret-3"}
TOKENS = f"lee={SECRETS['cs']}:cs101,duo={SECRETS['both']}:cs101+ds200,{SECRETS['all']}"
# ada and cy are in cs101, bo in ds200, eve in ma300, nobody names a course for ned.
CLASS = [
    {"student_id": "ada", "course_id": "cs101"},
    {"student_id": "cy", "course_id": "cs101"},
    {"student_id": "bo", "course_id": "ds200"},
    {"student_id": "eve", "course_id": "ma300"},
    {"student_id": "ned"},
]
STUDENTS_OF = {
    "cs": {"ada", "cy"},
    "both": {"ada", "cy", "bo"},
    "all": {"ada", "cy", "bo", "eve", "ned"},
}
COURSES_OF = {"cs": {"cs101"}, "both": {"cs101", "ds200"}}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[who]}"}


async def get_json(api: httpx.AsyncClient, who: str, path: str, **params: str) -> dict:
    response = await api.get(path, params=params, headers=auth(who))
    assert response.status_code == 200, response.text
    return response.json()


async def post(api, *events: dict) -> list[int]:
    response = await api.post("/api/v1/events", json=list(events))
    assert response.status_code == 201, response.text
    return [receipt["id"] for receipt in response.json()["events"]]


def run(student: str, cell: str, status: str, **more) -> dict:
    return {
        "student_id": student,
        "event_type": "cell_executed",
        "notebook_path": "week1/lists.ipynb",
        "cell_id": cell,
        "cell_index": {"c1": 1, "c2": 2, "c3": 3}.get(cell),
        "status": status,
        **more,
    }


def help_event(student: str, kind: str = "help", **more) -> dict:
    return {"student_id": student, "event_type": kind, "notebook_path": "week1/lists.ipynb", **more}


async def students(api, **params) -> dict:
    response = await api.get("/api/v1/students", params=params)
    assert response.status_code == 200, response.text
    return {student["student_id"]: student for student in response.json()["students"]}


async def help_queue(api, **params) -> dict:
    response = await api.get("/api/v1/help", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def age_hands(api, seconds: float) -> None:
    """Move every raise's last beat `seconds` into the past, as if no beat came since."""
    storage = api.service.storage
    then = storage.db_time(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds))
    await storage.database.execute("UPDATE hand_raises SET last_beat_at = :then", {"then": then})
