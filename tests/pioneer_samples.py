"""jupyterlab-pioneer 1.7.3 payloads, shared by the unit and end-to-end tests.

Each eventInfo copies the object its producer builds in the released front end
(share/jupyter/labextensions/jupyterlab-pioneer/static/256.a2c5c0de33d676dcbc8a.js), and
`pioneer_data` is `args["data"]` as its Jupyter server handler hands it to remote_exporter.
"""

from __future__ import annotations

import copy
from typing import Any

SESSION = "0f3e5f0e-54c7-4c5b-a0a5-4d0b3e1b8a21"
NOTEBOOK_PATH = "assignments/week1.ipynb"
C0 = "a1b2c3d4-0000-4000-8000-000000000000"
C1 = "a1b2c3d4-1111-4111-8111-111111111111"
C2 = "a1b2c3d4-2222-4222-8222-222222222222"
TRACEBACK = [
    "\u001b[0;31m-----------------------------------------------------------\u001b[0m",
    "\u001b[0;31mNameError\u001b[0m                 Traceback (most recent call last)",
    "\u001b[0;31mNameError\u001b[0m: name 'x' is not defined",
]
# JupyterLab's KernelError, as JSON.stringify writes it (only enumerable own properties).
KERNEL_ERROR = {
    "errorName": "NameError",
    "errorValue": "name 'x' is not defined",
    "traceback": TRACEBACK,
}
ERROR = {"ename": "NameError", "evalue": "name 'x' is not defined", "traceback": TRACEBACK}
# notebookPanel.model.toJSON(), sent only when the event has logWholeNotebook: true.
NOTEBOOK = {
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
    "cells": [
        {"id": C0, "cell_type": "markdown", "metadata": {}, "source": "# Week 1"},
        {
            "id": C1,
            "cell_type": "code",
            "metadata": {},
            "source": "import math\nmath.sqrt(2)",
            "outputs": [],
            "execution_count": 1,
        },
        {
            "id": C2,
            "cell_type": "code",
            "metadata": {},
            "source": ["print(x)\n", "x = 1"],
            "outputs": [],
            "execution_count": None,
        },
    ],
}
# What NotebookOpenEvent's eventInfo.environ holds: the Jupyter server's os.environ.
SECRETS = ("hub-api-token-4f1c9e", "wJalrXUtnFEMI-K7MDENG")
SERVER_ENVIRON = {
    "HOME": "/home/jovyan",
    "JUPYTERHUB_USER": "alice",
    "JUPYTERHUB_API_TOKEN": SECRETS[0],
    "AWS_SECRET_ACCESS_KEY": SECRETS[1],
    "COURSE": "SI101",
}


def cell(cell_id: str, index: int, cell_type: str = "code") -> dict[str, Any]:
    """A cell as the 1.7.3 producers describe it (metadata is null unless logCellMetadata)."""
    return {"id": cell_id, "index": index, "type": cell_type, "metadata": None}


def pioneer_data(name: str, info: Any, time_ms: int, content: Any = None) -> dict[str, Any]:
    """args["data"]: what the front end posts, less the exporter config (a fresh copy)."""
    return copy.deepcopy(
        {
            "eventDetail": {"eventName": name, "eventTime": time_ms, "eventInfo": info},
            "notebookState": {
                "sessionID": SESSION,
                "notebookPath": NOTEBOOK_PATH,
                "notebookContent": content,
            },
        }
    )


# One of each event 1.7.3 produces: (eventName, eventInfo, notebookContent, mapped fields).
EVENT_TYPES = [
    ("ActiveCellChangeEvent", {"cells": [cell(C1, 1)]}, None, {"cell_id": C1, "cell_index": 1}),
    ("CellAddEvent", {"cells": [cell(C2, 2)]}, None, {"cell_id": C2, "cell_index": 2}),
    (
        "CellEditEvent",
        {"index": 1, "doc": ["import math", "math.sqrt(2)"], "type": "code", "metadata": None},
        None,
        {"cell_index": 1},
    ),
    (
        "CellExecuteEvent",
        {"cells": [cell(C2, 2)], "success": False, "kernelError": KERNEL_ERROR},
        NOTEBOOK,
        {
            "cell_id": C2,
            "cell_index": 2,
            "status": "error",
            "error": ERROR,
            "source": "print(x)\nx = 1",
        },
    ),
    (
        "CellRemoveEvent",
        {"cells": [{"index": 3, "type": "code", "metadata": None}]},
        None,
        {"cell_index": 3},
    ),
    (
        "ClipboardCopyEvent",
        {"cells": [cell(C1, 1)], "selection": "math.sqrt"},
        None,
        {"cell_id": C1, "cell_index": 1},
    ),
    (
        "ClipboardCutEvent",
        {"cells": [cell(C1, 1)], "selection": "(2)"},
        None,
        {"cell_id": C1, "cell_index": 1},
    ),
    (
        "ClipboardPasteEvent",
        {"cells": [cell(C2, 2)], "selection": "x = 2"},
        None,
        {"cell_id": C2, "cell_index": 2},
    ),
    ("NotebookHiddenEvent", None, None, {}),
    ("NotebookOpenEvent", {"environ": SERVER_ENVIRON}, None, {}),
    ("NotebookSaveEvent", None, NOTEBOOK, {}),
    (
        "NotebookScrollEvent",
        {"cells": [{"id": C1, "index": 1, "type": "code"}, {"id": C2, "index": 2, "type": "code"}]},
        None,
        {},
    ),
    ("NotebookVisibleEvent", {"cells": [{"id": C0, "index": 0, "type": "markdown"}]}, None, {}),
]
CELL_FIELDS = ("cell_id", "cell_index", "status", "error", "source")
