"""jupyterlab-pioneer's remote exporter: its envelopes mapped onto our events, then validated
as ours. Of the Jupyter server's environment only PIONEER_ENVIRON_ALLOW is kept; never a token.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from telemetry.config import Settings
from telemetry.errors import FieldErrors
from telemetry.events import normalise_event

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
PIONEER_CELL_EVENTS = frozenset((
    "ActiveCellChangeEvent", "CellAddEvent", "CellExecuteEvent", "CellRemoveEvent",
    "ClipboardCopyEvent", "ClipboardCutEvent", "ClipboardPasteEvent",
))  # fmt: skip
INFO = "data.eventDetail.eventInfo"
NO_CELL = {"cell_id": (None, ""), "cell_index": (None, "")}


class PioneerError(ValueError):
    """An envelope the mapping cannot walk: args are where, in the posted body, and why."""


def is_pioneer_envelope(body: Any) -> bool:
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, dict) and "eventDetail" in data


def dig(document: Any, path: str) -> Any:
    """The value at a dotted path of nested objects; None where any step is missing."""
    for key in path.split("."):
        document = document.get(key) if isinstance(document, dict) else None
    return document


def check_shape(envelope: dict) -> None:
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


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def student_of(envelope: dict, env_name: str) -> tuple[Any, str]:
    """params.student_id, else the value of the env entry named env_name."""
    given = dig(envelope, "params.student_id")
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)  # numeric ids written into the exporter's params
    if not is_blank(given):
        return given, "params.student_id"
    for position, entry in enumerate(envelope.get("env") or []):
        if not is_blank(entry.get(env_name)):
            return entry[env_name], f"env[{position}].{env_name}"
    problem = f"is required, or a non-empty {env_name!r} entry in env"
    raise PioneerError("params.student_id", problem)


def cell_of(event_name: Any, info: Any) -> dict[str, tuple[Any, str]]:
    """cell_id and cell_index of a cell event, each with where it came from."""
    if not isinstance(event_name, str):  # normalise_event refuses it; a list would not hash
        return NO_CELL
    where = INFO
    if event_name == "CellEditEvent" and isinstance(info, dict):
        subject = info  # it has no cell list, only eventInfo.index
    elif event_name in PIONEER_CELL_EVENTS and isinstance(info, dict) and info.get("cells"):
        cells, where = info["cells"], f"{where}.cells"
        if not isinstance(cells, list) or not all(isinstance(item, dict) for item in cells):
            raise PioneerError(where, "must be a list of objects")
        if len(cells) != 1:
            return NO_CELL  # not a shape the producers send: kept in eventInfo only
        subject, where = cells[0], f"{where}[0]"
    else:
        return NO_CELL
    # CellRemoveEvent before 1.7 sent oldIndex.
    key = next((key for key in ("index", "oldIndex") if key in subject), "index")
    # findIndex() gives -1 when the producer could not find the cell.
    index = None if subject.get(key) == -1 else subject.get(key)
    return {"cell_id": (subject.get("id"), f"{where}.id"), "cell_index": (index, f"{where}.{key}")}


def execution_of(info: Any) -> dict[str, tuple[Any, str]]:
    """status and error of a CellExecuteEvent."""
    info = info if isinstance(info, dict) else {}
    success = info.get("success")
    if success is not None and not isinstance(success, bool):
        raise PioneerError(f"{INFO}.success", "must be true or false")
    status = None if success is None else ("ok" if success else "error")
    picked = {"status": (status, f"{INFO}.success")}
    kernel_error = info.get("kernelError")
    # JupyterLab's KernelError serialises as {errorName, errorValue, traceback}; others as {}.
    if success is not True and kernel_error:
        if isinstance(kernel_error, dict):
            names = {"errorName": "ename", "errorValue": "evalue"}
            kernel_error = {names.get(key, key): value for key, value in kernel_error.items()}
        picked["error"] = (kernel_error, f"{INFO}.kernelError")
    return picked


def source_of(notebook: Any, cell_id: Any, cell_index: Any) -> tuple[Any, str]:
    """The executed cell's source in notebookContent (sent only with logWholeNotebook)."""
    where = "data.notebookState.notebookContent.cells"
    cells = dig(notebook, "cells")
    if not isinstance(cells, list):
        return None, where
    cells = [item if isinstance(item, dict) else {} for item in cells]
    ids = [item.get("id") for item in cells]
    if any("id" in item for item in cells):
        position = ids.index(cell_id) if cell_id is not None and cell_id in ids else None
    else:  # nbformat before 4.5 has no cell ids: the position is the key
        in_range = isinstance(cell_index, int) and 0 <= cell_index < len(cells)
        position = cell_index if in_range else None
    if position is None:
        return None, where
    text = cells[position].get("source")
    if isinstance(text, list) and all(isinstance(line, str) for line in text):
        text = "".join(text)  # nbformat allows a list of lines
    return text, f"{where}[{position}].source"


def rest_of(envelope: dict, environ_allow: frozenset[str]) -> dict[str, Any]:
    """What the mapping does not use, kept verbatim but for the server's environ and secrets."""
    detail = envelope["data"]["eventDetail"]
    kept = {key: value for key, value in detail.items() if key not in ("eventName", "eventTime")}
    info = kept.get("eventInfo")
    if isinstance(info, dict) and "environ" in info:
        # NotebookOpenEvent sends the Jupyter server's whole os.environ, tokens included.
        environ = info["environ"] if isinstance(info["environ"], dict) else {}
        allowed = {name: value for name, value in environ.items() if name in environ_allow}
        kept["eventInfo"] = {**info, "environ": allowed}
    params = {key: value for key, value in (envelope.get("params") or {}).items() if key != "token"}
    if params:
        kept["params"] = params
    if envelope.get("env"):
        kept["env"] = envelope["env"]
    return kept


def normalise_pioneer(
    raw: dict, path: str, now: dt.datetime, settings: Settings, errors: FieldErrors
) -> dict[str, Any] | None:
    """One remote_exporter envelope through normalise_event; problems name its fields."""
    try:
        check_shape(raw)
        picked = {name: (dig(raw, where), where) for name, where in PIONEER_FIELDS.items()}
        picked["student_id"] = student_of(raw, settings.pioneer_student_env)
        event_name, info = picked["event_type"][0], dig(raw, INFO)
        picked |= cell_of(event_name, info)
        if event_name == "CellExecuteEvent":
            picked |= execution_of(info)
            notebook = dig(raw, "data.notebookState.notebookContent")
            picked["source"] = source_of(notebook, picked["cell_id"][0], picked["cell_index"][0])
    except PioneerError as problem:
        errors.add(f"{path}.{problem.args[0]}", problem.args[1])
        return None
    event = {name: value for name, (value, _) in picked.items()}
    event["pioneer"] = rest_of(raw, settings.pioneer_environ_allow)
    origins = {name: where for name, (_, where) in picked.items()}
    return normalise_event(event, path, now, settings, errors, origins)
