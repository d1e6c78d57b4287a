"""jupyterlab-pioneer's remote_exporter envelope, mapped onto our events (pure, no I/O)."""

import copy
import datetime as dt
import json
from typing import Any

import pytest

from telemetry.config import Settings
from telemetry.errors import ApiError
from telemetry.ingest import normalise_batch
from telemetry.pioneer import is_pioneer_envelope
from tests.pioneer_samples import (
    C0,
    C1,
    C2,
    CELL_FIELDS,
    ERROR,
    EVENT_TYPES,
    KERNEL_ERROR,
    NOTEBOOK,
    NOTEBOOK_PATH,
    SECRETS,
    SERVER_ENVIRON,
    SESSION,
    cell,
    pioneer_data,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
T = 1_795_687_200_123  # 2026-11-26T10:00:00.123Z, as Date.now() gives it
SETTINGS = Settings()


def envelope(
    name: str, info: Any = None, content: Any = None, params: Any = None, env: Any = None
) -> dict[str, Any]:
    """The body remote_exporter posts."""
    return {
        "data": pioneer_data(name, info, T, content),
        "params": {"student_id": "s-42"} if params is None else params,
        "env": [] if env is None else env,
    }


def normalise_one(body: Any, settings: Settings = SETTINGS) -> dict:
    [event] = normalise_batch(body, NOW, settings)
    return event


def problems(body: Any, settings: Settings = SETTINGS) -> list[dict]:
    with pytest.raises(ApiError) as error:
        normalise_batch(body, NOW, settings)
    assert (error.value.status, error.value.code) == (422, "invalid_event")
    return error.value.details


OLDER_AND_EDGE_SHAPES = [
    pytest.param(
        "CellEditEvent",
        {"index": 2, "changes": [8, [0, "0"]], "type": "code"},
        None,
        {"cell_index": 2},
        id="CellEditEvent-keystroke",
    ),
    pytest.param(
        "CellExecuteEvent",
        {"cells": [cell(C1, 1)], "success": True, "kernelError": None},
        None,
        {"cell_id": C1, "cell_index": 1, "status": "ok"},
        id="CellExecuteEvent-ok-without-notebookContent",
    ),
    pytest.param(
        # A rejection other than KernelError serialises as {}: message/stack are not enumerable.
        "CellExecuteEvent",
        {"cells": [cell(C2, 2)], "success": False, "kernelError": {}},
        NOTEBOOK,
        {"cell_id": C2, "cell_index": 2, "status": "error", "source": "print(x)\nx = 1"},
        id="CellExecuteEvent-empty-kernelError",
    ),
    pytest.param(
        # NotebookActions.executed also fires, with success: true, for markdown cells.
        "CellExecuteEvent",
        {"cells": [cell(C0, 0, "markdown")], "success": True, "kernelError": None},
        NOTEBOOK,
        {"cell_id": C0, "cell_index": 0, "status": "ok", "source": "# Week 1"},
        id="CellExecuteEvent-markdown",
    ),
    pytest.param(
        "CellRemoveEvent",
        {"cells": [{"newIndex": -1, "oldIndex": 3}]},
        None,
        {"cell_index": 3},
        id="CellRemoveEvent-before-1.7",
    ),
    pytest.param(
        # No active cell: its id is undefined (dropped by JSON.stringify), findIndex gives -1.
        "ClipboardPasteEvent",
        {"cells": [{"index": -1, "type": None, "metadata": None}], "selection": "x"},
        None,
        {},
        id="ClipboardPasteEvent-no-active-cell",
    ),
    pytest.param(
        "ActiveCellChangeEvent",
        {"cells": [cell(C1, 1), cell(C2, 2)]},
        None,
        {},
        id="several-cells-name-no-cell",
    ),
    pytest.param("MyCustomEvent", {"anything": [1, 2]}, None, {}, id="custom-event"),
]


@pytest.mark.parametrize(
    ("name", "info", "content", "expected"), [*EVENT_TYPES, *OLDER_AND_EDGE_SHAPES]
)
def test_each_event_type_is_mapped(name: str, info: Any, content: Any, expected: dict) -> None:
    body = envelope(name, info, content)
    original = copy.deepcopy(body)
    event = normalise_one(body)
    assert (event["student_id"], event["event_type"]) == ("s-42", name)
    assert event["occurred_at"] == dt.datetime(2026, 11, 26, 10, 0, 0, 123000, tzinfo=dt.UTC)
    assert (event["session_id"], event["notebook_path"]) == (SESSION, NOTEBOOK_PATH)
    assert {key: event[key] for key in CELL_FIELDS if event[key] is not None} == expected
    assert len(event["event_id"]) == 36  # the envelope has no id: one is minted
    if name != "NotebookOpenEvent":
        assert event["extra"]["pioneer"]["eventInfo"] == info
    assert "notebookContent" not in json.dumps(event["extra"])
    assert body == original


@pytest.mark.parametrize(
    ("allow", "kept"),
    [
        (frozenset(), {}),
        (frozenset({"COURSE", "HOME"}), {"COURSE": "SI101", "HOME": "/home/jovyan"}),
        (frozenset({"NOT_THERE"}), {}),
    ],
)
def test_server_environ_keeps_only_allowed_variables(allow: frozenset, kept: dict) -> None:
    body = envelope("NotebookOpenEvent", {"environ": SERVER_ENVIRON})
    event = normalise_one(body, Settings(pioneer_environ_allow=allow))
    assert event["extra"]["pioneer"]["eventInfo"] == {"environ": kept}
    assert not any(secret in json.dumps(event["extra"]) for secret in SECRETS)
    assert body["data"]["eventDetail"]["eventInfo"]["environ"] == SERVER_ENVIRON


@pytest.mark.parametrize("environ", ["Not a JSON response", None, ["HOME"]])
def test_environ_that_is_not_an_object_is_emptied(environ: Any) -> None:
    body = envelope("NotebookOpenEvent", {"environ": environ})
    event = normalise_one(body, Settings(pioneer_environ_allow=frozenset({"HOME"})))
    assert event["extra"]["pioneer"]["eventInfo"] == {"environ": {}}


@pytest.mark.parametrize(
    ("params", "env", "env_name", "student_id"),
    [
        pytest.param(
            {"student_id": "p-1"}, [{"JUPYTERHUB_USER": "alice"}], "JUPYTERHUB_USER", "p-1",
            id="params-first",
        ),
        pytest.param(
            {"course_id": "SI101"},
            [{"WORKSPACE_ID": "w-9"}, {"JUPYTERHUB_USER": "alice"}],
            "JUPYTERHUB_USER",
            "alice",
            id="then-the-env-entry",
        ),
        pytest.param(
            {"student_id": "  "}, [{"JUPYTERHUB_USER": "alice"}], "JUPYTERHUB_USER", "alice",
            id="blank-param-falls-through",
        ),
        pytest.param(
            None, [{"LMS_USER": "bob"}, {"JUPYTERHUB_USER": "alice"}], "LMS_USER", "bob",
            id="configured-env-name",
        ),
        pytest.param(
            None,
            [{"JUPYTERHUB_USER": None}, {"JUPYTERHUB_USER": "carol"}],
            "JUPYTERHUB_USER",
            "carol",
            id="first-non-null-entry",
        ),
        pytest.param({"student_id": 12345}, [], "JUPYTERHUB_USER", "12345", id="numeric-param"),
    ],
)  # fmt: skip
def test_student_comes_from_params_then_env(
    params: Any, env: list, env_name: str, student_id: str
) -> None:
    body = envelope("NotebookSaveEvent", params=params, env=env)
    body["params"] = params
    event = normalise_one(body, Settings(pioneer_student_env=env_name))
    assert event["student_id"] == student_id


@pytest.mark.parametrize(
    ("params", "env", "field", "problem"),
    [
        (None, [], "event.params.student_id", "'JUPYTERHUB_USER' entry in env"),
        ({"student_id": ""}, [{"JUPYTERHUB_USER": None}], "event.params.student_id", "required"),
        ({"student_id": ["s"]}, [], "event.params.student_id", "must be a string"),
        ({}, [{"JUPYTERHUB_USER": 7}], "event.env[0].JUPYTERHUB_USER", "must be a string"),
    ],
)
def test_missing_student_is_422_naming_both_sources(
    params: Any, env: list, field: str, problem: str
) -> None:
    body = envelope("NotebookSaveEvent", params=params, env=env)
    body["params"] = params
    [detail] = problems(body)
    assert detail["field"] == field and problem in detail["problem"]


def test_params_are_mapped_and_kept_without_the_token() -> None:
    params = {
        "student_id": "s-42",
        "course_id": "SI101",
        "student_name": "Ada L.",
        "team": "Team A",
        "token": "shared-secret",
        "section": "001",
    }
    env = [{"WORKSPACE_ID": "w-9"}, {"UNSET_VAR": None}]
    event = normalise_one(envelope("NotebookSaveEvent", params=params, env=env))
    assert (event["course_id"], event["student_name"], event["team"]) == (
        "SI101",
        "Ada L.",
        "Team A",
    )
    assert event["extra"] == {
        "pioneer": {
            "eventInfo": None,
            "params": {key: value for key, value in params.items() if key != "token"},
            "env": env,
        }
    }


def test_custom_keys_of_event_detail_are_kept() -> None:
    body = envelope("MyCustomEvent", {"anything": [1, 2]})
    body["data"]["eventDetail"]["origin"] = "custom-extension"
    assert normalise_one(body)["extra"]["pioneer"]["origin"] == "custom-extension"


@pytest.mark.parametrize(
    ("content", "cell_id", "index", "expected"),
    [
        pytest.param(NOTEBOOK, C1, 1, "import math\nmath.sqrt(2)", id="by-id"),
        pytest.param(NOTEBOOK, C1, 2, "import math\nmath.sqrt(2)", id="id-wins-over-index"),
        pytest.param(NOTEBOOK, "not-in-notebook", 1, None, id="unknown-id"),
        pytest.param(
            {"cells": [{"cell_type": "code", "source": ["a\n", "b"]}]}, "any", 0, "a\nb",
            id="nbformat-4.4-by-position",
        ),
        pytest.param({"cells": "oops"}, C1, 1, None, id="cells-not-a-list"),
        pytest.param("not a notebook", C1, 1, None, id="content-not-an-object"),
    ],
)  # fmt: skip
def test_executed_cell_source_comes_from_notebook_content(
    content: Any, cell_id: str, index: int, expected: str | None
) -> None:
    info = {"cells": [cell(cell_id, index)], "success": True, "kernelError": None}
    assert normalise_one(envelope("CellExecuteEvent", info, content))["source"] == expected


def test_kernel_error_in_our_own_names_is_kept() -> None:
    info = {"cells": [cell(C1, 1)], "success": False, "kernelError": ERROR}
    assert normalise_one(envelope("CellExecuteEvent", info))["error"] == ERROR


def test_kernel_error_is_ignored_when_the_cell_succeeded() -> None:
    info = {"cells": [cell(C1, 1)], "success": True, "kernelError": KERNEL_ERROR}
    event = normalise_one(envelope("CellExecuteEvent", info))
    assert (event["status"], event["error"]) == ("ok", None)


def bad(path: str, value: Any) -> dict[str, Any]:
    """A valid CellExecuteEvent envelope with the value at a dotted path replaced or removed."""
    info = {"cells": [cell(C1, 1)], "success": True}
    body = envelope("CellExecuteEvent", info, NOTEBOOK)
    *parents, last = path.split(".")
    target = body
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return body


D = "event.data.eventDetail"
INFO = f"{D}.eventInfo"


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (bad("data.eventDetail", None), D, "must be an object"),
        (bad("data.eventDetail", ["x"]), D, "must be an object"),
        (bad("data.eventDetail.eventName", KeyError), f"{D}.eventName", "is required"),
        (bad("data.eventDetail.eventName", 3), f"{D}.eventName", "must be a string"),
        (bad("data.eventDetail.eventName", []), f"{D}.eventName", "must be a string"),
        (bad("data.eventDetail.eventName", {"a": 1}), f"{D}.eventName", "must be a string"),
        (bad("data.eventDetail.eventName", " "), f"{D}.eventName", "must not be empty"),
        (bad("data.eventDetail.eventTime", KeyError), f"{D}.eventTime", "epoch milliseconds"),
        (bad("data.eventDetail.eventTime", "2026-11-26"), f"{D}.eventTime", "epoch milli"),
        (bad("data.eventDetail.eventTime", True), f"{D}.eventTime", "epoch milliseconds"),
        (bad("data.eventDetail.eventTime", 1), f"{D}.eventTime", "plausible range"),
        (bad("data.eventDetail.eventTime", float("nan")), f"{D}.eventTime", "plausible"),
        (bad("data.notebookState", "x"), "event.data.notebookState", "an object or null"),
        (
            bad("data.notebookState.notebookPath", ["a"]),
            "event.data.notebookState.notebookPath",
            "must be a string",
        ),
        (bad("params", ["s-42"]), "event.params", "an object or null"),
        (bad("params.course_id", 101), "event.params.course_id", "must be a string"),
        (bad("env", {"A": "b"}), "event.env", "a list or null"),
        (bad("env", ["A"]), "event.env[0]", "must be an object"),
        (bad("data.eventDetail.eventInfo.cells", {"id": C1}), f"{INFO}.cells", "list of objects"),
        (bad("data.eventDetail.eventInfo.cells", ["x"]), f"{INFO}.cells", "list of objects"),
        (
            bad("data.eventDetail.eventInfo.cells.0.index", "1"),
            f"{INFO}.cells[0].index",
            "whole number",
        ),
        (bad("data.eventDetail.eventInfo.cells.0.index", -2), f"{INFO}.cells[0].index", "between"),
        (bad("data.eventDetail.eventInfo.cells.0.id", 5), f"{INFO}.cells[0].id", "a string"),
        (bad("data.eventDetail.eventInfo.success", "yes"), f"{INFO}.success", "true or false"),
        (
            bad("data.notebookState.notebookContent.cells.1.source", 5),
            "event.data.notebookState.notebookContent.cells[1].source",
            "must be a string",
        ),
    ],
)
def test_bad_envelope_is_422_naming_the_field(body: dict, field: str, problem: str) -> None:
    [detail] = problems(body)
    assert detail["field"] == field and problem in detail["problem"], detail


def test_every_problem_of_an_envelope_is_reported() -> None:
    body = bad("data.notebookState.sessionID", 5)
    body["data"]["eventDetail"]["eventInfo"]["cells"][0]["index"] = "1"
    assert [detail["field"] for detail in problems(body)] == [
        "event.data.notebookState.sessionID",
        f"{INFO}.cells[0].index",
    ]


def test_both_formats_in_one_batch_are_each_detected() -> None:
    ours = {"student_id": "s1", "event_type": "cell_executed"}
    events = normalise_batch([ours, envelope("NotebookSaveEvent")], NOW, SETTINGS)
    assert [(e["student_id"], e["event_type"]) for e in events] == [
        ("s1", "cell_executed"),
        ("s-42", "NotebookSaveEvent"),
    ]
    details = problems([ours, envelope("NotebookSaveEvent", params={})])
    assert [d["field"] for d in details] == ["events[1].params.student_id"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(envelope("CellAddEvent"), True, id="real-envelope"),
        pytest.param({"data": {"eventDetail": None}}, True, id="malformed-detail-still-detected"),
        pytest.param({"data": {"notebookState": {}}}, False, id="no-eventDetail"),
        pytest.param({"data": "x", "params": None, "env": []}, False, id="data-not-an-object"),
        pytest.param({"student_id": "s", "event_type": "run"}, False, id="our-own-shape"),
        pytest.param([{"data": {"eventDetail": {}}}], False, id="list"),
        pytest.param(None, False, id="null"),
    ],
)
def test_pioneer_envelope_is_detected_by_its_shape(body: Any, expected: bool) -> None:
    assert is_pioneer_envelope(body) is expected


# The exact body remote_exporter (jupyterlab-pioneer 1.7.3, tornado 6.6.1) sent to a capture
# server, with params {"student_id":"s-42","course_id":"SI101","token":"t0k"}, env
# ["JUPYTERHUB_USER","NOT_SET_VAR"] and JUPYTERHUB_USER=alice in its environment.
CAPTURED = (
    '{"data": {"eventDetail": {"eventName": "CellExecuteEvent", "eventTime": 1795737731762, '
    '"eventInfo": {"cells": [{"id": "6b0a0c6e-2f1a-4c1e-9d0e-3f2b7a9c1d11", "index": 2, '
    '"type": "code", "metadata": null}], "success": false, "kernelError": {"errorName": '
    '"NameError", "errorValue": "name \'x\' is not defined", "traceback": ["\\u001b[0;31m'
    'NameError\\u001b[0m: name \'x\' is not defined"]}}}, "notebookState": {"sessionID": '
    '"0f3e5f0e-54c7-4c5b-a0a5-4d0b3e1b8a21", "notebookPath": "assignments/week1.ipynb", '
    '"notebookContent": null}}, "params": {"student_id": "s-42", "course_id": "SI101", '
    '"token": "t0k"}, "env": [{"JUPYTERHUB_USER": "alice"}, {"NOT_SET_VAR": null}]}'
)


def test_body_captured_from_the_real_exporter() -> None:
    body = json.loads(CAPTURED)
    now = dt.datetime(2026, 11, 27, 1, tzinfo=dt.UTC)
    [event] = normalise_batch(body, now, SETTINGS)
    traceback = ["\u001b[0;31mNameError\u001b[0m: name 'x' is not defined"]
    assert {key: value for key, value in event.items() if value is not None} == {
        "event_id": event["event_id"],
        "student_id": "s-42",
        "event_type": "CellExecuteEvent",
        "occurred_at": dt.datetime(2026, 11, 27, 0, 2, 11, 762000, tzinfo=dt.UTC),
        "session_id": "0f3e5f0e-54c7-4c5b-a0a5-4d0b3e1b8a21",
        "notebook_path": "assignments/week1.ipynb",
        "course_id": "SI101",
        "cell_id": "6b0a0c6e-2f1a-4c1e-9d0e-3f2b7a9c1d11",
        "cell_index": 2,
        "status": "error",
        "error": {
            "ename": "NameError",
            "evalue": "name 'x' is not defined",
            "traceback": traceback,
        },
        "outputs_truncated": False,
        "source_truncated": False,
        "extra": {
            "pioneer": {
                "eventInfo": body["data"]["eventDetail"]["eventInfo"],
                "params": {"student_id": "s-42", "course_id": "SI101"},
                "env": [{"JUPYTERHUB_USER": "alice"}, {"NOT_SET_VAR": None}],
            }
        },
    }
