"""Posts of each client shape carrying a raw student id and a name, which pseudonymous mode
must keep out of every table, answer and log: shared by the integration and e2e tests."""

from __future__ import annotations

from tests.pioneer_samples import NOTEBOOK, cell, pioneer_data

SALT = "9f2c61d0a7b84e3f95c2"
# Each client shape with a raw id and a name that must never be stored.
OURS = {"student_id": "ada.lovelace@uni.edu", "student_name": "Ada Lovelace",
        "event_type": "cell_executed", "status": "error", "cell_id": "c1",
        "course_id": "cs1"}  # fmt: skip
CAMEL = [{"eventType": "cell_executed", "emailAddress": "grace.hopper@uni.edu",
          "userName": "Grace Hopper", "userId": "grace.hopper@uni.edu", "teamName": "red",
          "hasError": True, "errorMessage": "NameError", "cellId": "c1"}]  # fmt: skip
PIONEER = {
    "data": pioneer_data(
        "CellExecuteEvent", {"cells": [cell("c2", 2)], "success": True}, 1_764_000_000_000, NOTEBOOK
    ),
    "params": {"student_name": "Alan Turing", "course_id": "cs1"},
    "env": [{"JUPYTERHUB_USER": "alan.turing"}],
}
RAW_IDS = ("ada.lovelace@uni.edu", "grace.hopper@uni.edu", "alan.turing")
NAMES = ("Ada Lovelace", "Grace Hopper", "Alan Turing")


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [secret for secret in RAW_IDS + NAMES if secret.lower() in lowered]
