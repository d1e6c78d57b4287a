"""jupyterlab-pioneer's remote exporter: its envelopes mapped to our events. Only the
variables named in PIONEER_ENVIRON_ALLOW of the Jupyter server's environment are kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from telemetry.config import Settings
from telemetry.errors import FieldErrors
from telemetry.events import normalise_event

logger = logging.getLogger(__name__)


# jupyterlab-pioneer's remote_exporter (1.7.3) posts one event per request, as
#   {"data": {"eventDetail": {eventName, eventTime, eventInfo},
#             "notebookState": {sessionID, notebookPath, notebookContent}},
#    "params": <its exporter's args.params> | null, "env": [{NAME: os.getenv(NAME)}, ...]}
# and cannot set headers. Our field -> where the envelope carries it, taken as it is:
PIONEER_FIELDS = {
    "event_type": "data.eventDetail.eventName",
    "occurred_at": "data.eventDetail.eventTime",
    "session_id": "data.notebookState.sessionID",
    "notebook_path": "data.notebookState.notebookPath",
    "course_id": "params.course_id",
    "student_name": "params.student_name",
    "team": "params.team",
}


# The objects and lists the mapping walks through besides eventDetail; null stands for absent.
PIONEER_CONTAINERS = {"data.notebookState": dict, "params": dict, "env": list}


# Events about one cell, listed in eventInfo.cells. NotebookScrollEvent and
# NotebookVisibleEvent list the cells on screen, which is no subject cell.
PIONEER_CELL_EVENTS = frozenset(
    (
        "ActiveCellChangeEvent",
        "CellAddEvent",
        "CellExecuteEvent",
        "CellRemoveEvent",
        "ClipboardCopyEvent",
        "ClipboardCutEvent",
        "ClipboardPasteEvent",
    )
)


# CellEditEvent has no cell list, only eventInfo.index; CellRemoveEvent before 1.7 sent oldIndex.
PIONEER_INDEX_KEYS = ("index", "oldIndex")


# JupyterLab's KernelError serialises as {errorName, errorValue, traceback}.
PIONEER_ERROR_KEYS = {"errorName": "ename", "errorValue": "evalue"}


# Mapped onto our fields, or never to be stored: the rest of eventDetail is kept.
PIONEER_CONSUMED_DETAIL = frozenset(("eventName", "eventTime"))


PIONEER_SECRET_PARAMS = frozenset(("token",))


class PioneerError(ValueError):
    """An envelope the mapping cannot walk; `field_path` is where, in the posted body."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path
        self.problem = problem


def is_pioneer_envelope(body: Any) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, dict) and "eventDetail" in data


def dig(document: Any, path: str) -> Any:
    """The value at a dotted path of nested objects; None where any step is missing."""
    for key in path.split("."):
        document = document.get(key) if isinstance(document, dict) else None
    return document


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_pioneer_shape(envelope: dict) -> None:
    if not isinstance(envelope["data"]["eventDetail"], dict):
        raise PioneerError("data.eventDetail", "must be an object")
    for path, kind in PIONEER_CONTAINERS.items():
        value = dig(envelope, path)
        if value is not None and not isinstance(value, kind):
            raise PioneerError(path, f"must be {'an object' if kind is dict else 'a list'} or null")
    for position, entry in enumerate(envelope.get("env") or []):
        if not isinstance(entry, dict):
            raise PioneerError(f"env[{position}]", "must be an object {NAME: value}")
    occurred_at = dig(envelope, PIONEER_FIELDS["occurred_at"])
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, (int, float)):
        raise PioneerError(PIONEER_FIELDS["occurred_at"], "must be epoch milliseconds (a number)")


def pioneer_student(envelope: dict, env_name: str) -> tuple[Any, str]:
    """params.student_id, else the value of the env entry named env_name."""
    given = dig(envelope, "params.student_id")
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)  # numeric ids written into the exporter's params
    if not is_blank(given):
        return given, "params.student_id"
    for position, entry in enumerate(envelope.get("env") or []):
        if not is_blank(entry.get(env_name)):
            return entry[env_name], f"env[{position}].{env_name}"
    raise PioneerError(
        "params.student_id", f"is required, or a non-empty {env_name!r} entry in env"
    )


NO_CELL = {"cell_id": (None, ""), "cell_index": (None, "")}


def pioneer_cell(event_name: Any, info: Any) -> dict[str, tuple[Any, str]]:
    """cell_id and cell_index of a cell event, each with where it came from."""
    if not isinstance(event_name, str):  # normalise_event refuses it; a list would not hash
        return NO_CELL
    where = "data.eventDetail.eventInfo"
    if event_name == "CellEditEvent" and isinstance(info, dict):
        cell = info
    elif event_name in PIONEER_CELL_EVENTS and isinstance(info, dict) and info.get("cells"):
        cells, where = info["cells"], f"{where}.cells"
        if not isinstance(cells, list) or not all(isinstance(item, dict) for item in cells):
            raise PioneerError(where, "must be a list of objects")
        if len(cells) != 1:
            return NO_CELL  # not a shape the producers send: kept in eventInfo only
        cell, where = cells[0], f"{where}[0]"
    else:
        return NO_CELL
    key = next((key for key in PIONEER_INDEX_KEYS if key in cell), "index")
    # findIndex() gives -1 when the producer could not find the cell.
    index = None if cell.get(key) == -1 else cell.get(key)
    return {"cell_id": (cell.get("id"), f"{where}.id"), "cell_index": (index, f"{where}.{key}")}


def pioneer_execution(info: Any) -> dict[str, tuple[Any, str]]:
    """status and error of a CellExecuteEvent."""
    info = info if isinstance(info, dict) else {}
    where = "data.eventDetail.eventInfo"
    success = info.get("success")
    if success is not None and not isinstance(success, bool):
        raise PioneerError(f"{where}.success", "must be true or false")
    status = None if success is None else ("ok" if success else "error")
    picked = {"status": (status, f"{where}.success")}
    kernel_error = info.get("kernelError")
    # Errors other than KernelError serialise as {}: nothing to keep.
    if success is not True and kernel_error:
        if isinstance(kernel_error, dict):
            kernel_error = {PIONEER_ERROR_KEYS.get(k, k): v for k, v in kernel_error.items()}
        picked["error"] = (kernel_error, f"{where}.kernelError")
    return picked


def pioneer_source(notebook: Any, cell_id: Any, cell_index: Any) -> tuple[Any, str]:
    """The executed cell's source in notebookContent (sent only with logWholeNotebook)."""
    where = "data.notebookState.notebookContent.cells"
    cells = dig(notebook, "cells")
    if not isinstance(cells, list):
        return None, where
    cells = [cell if isinstance(cell, dict) else {} for cell in cells]
    if any("id" in cell for cell in cells):
        ids = [cell.get("id") for cell in cells]
        position = ids.index(cell_id) if cell_id is not None and cell_id in ids else None
    elif isinstance(cell_index, int) and 0 <= cell_index < len(cells):
        position = cell_index  # nbformat before 4.5 has no cell ids: the position is the key
    else:
        position = None
    if position is None:
        return None, where
    source = cells[position].get("source")
    if isinstance(source, list) and all(isinstance(line, str) for line in source):
        source = "".join(source)  # nbformat allows a list of lines
    return source, f"{where}[{position}].source"


def pioneer_rest(envelope: dict, environ_allow: frozenset[str]) -> dict[str, Any]:
    """What the mapping does not use, kept verbatim but for the server's environ and secrets."""
    detail = envelope["data"]["eventDetail"]
    rest = {key: value for key, value in detail.items() if key not in PIONEER_CONSUMED_DETAIL}
    info = rest.get("eventInfo")
    if isinstance(info, dict) and "environ" in info:
        # NotebookOpenEvent sends the Jupyter server's whole os.environ, tokens included.
        environ = info["environ"] if isinstance(info["environ"], dict) else {}
        allowed = {name: value for name, value in environ.items() if name in environ_allow}
        rest["eventInfo"] = {**info, "environ": allowed}
    params = envelope.get("params") or {}
    kept_params = {key: value for key, value in params.items() if key not in PIONEER_SECRET_PARAMS}
    if kept_params:
        rest["params"] = kept_params
    if envelope.get("env"):
        rest["env"] = envelope["env"]
    return rest


def pioneer_to_event(envelope: dict, settings: Settings) -> tuple[dict[str, Any], dict[str, str]]:
    """One remote_exporter body to our input event, and where each of its fields came from."""
    check_pioneer_shape(envelope)
    picked = {name: (dig(envelope, where), where) for name, where in PIONEER_FIELDS.items()}
    picked["student_id"] = pioneer_student(envelope, settings.pioneer_student_env)
    event_name, info = picked["event_type"][0], dig(envelope, "data.eventDetail.eventInfo")
    picked |= pioneer_cell(event_name, info)
    if event_name == "CellExecuteEvent":
        picked |= pioneer_execution(info)
        notebook = dig(envelope, "data.notebookState.notebookContent")
        picked["source"] = pioneer_source(notebook, picked["cell_id"][0], picked["cell_index"][0])
    event = {name: value for name, (value, _) in picked.items()}
    event["pioneer"] = pioneer_rest(envelope, settings.pioneer_environ_allow)
    return event, {name: where for name, (_, where) in picked.items()}


def normalise_pioneer(
    raw: dict, path: str, now: dt.datetime, settings: Settings, errors: FieldErrors
) -> dict[str, Any] | None:
    """A pioneer envelope through normalise_event; problems name the envelope's fields."""
    try:
        mapped, origins = pioneer_to_event(raw, settings)
    except PioneerError as problem:
        errors.add(f"{path}.{problem.field_path}", problem.problem)
        return None
    own_errors = FieldErrors()
    event = normalise_event(mapped, path, now, settings, own_errors)
    for detail in own_errors.details:
        name = detail["field"].removeprefix(f"{path}.")
        errors.add(f"{path}.{origins.get(name, name)}", detail["problem"])
    return event
