"""The events a class's cell-monitor-extension posts, for the benchmarks' load.

The same fields, shapes and mix as the extension (and /api/v1/events' camelCase mapping):
eventId, eventType, eventTime, emailAddress, userName, teamName, sessionId, notebookPath, and
for `cell_executed` also cellId, cellIndex, cellType, code, executionCount, hasError,
errorMessage (`ename: evalue`), result (the message again on an error) and
executionDurationMs. There is no course field. Each student works through a notebook of
CELL_COUNT cells:

- most students fail 8% of their runs with a short `ename: evalue`;
- STUCK_ROLES students fail STUCK_TRIES times on STUCK_CELL with a whole IPython traceback
  (ANSI colours included) as the error text, then move on;
- one student in 100 struggles, failing 60% of runs with varied errors;
- every SAVE_EVERY runs a student's tab sends `notebook_saved` (the notebook only);
- a few students hold a hand up: `help` (no cell) every HELP_BEAT_SECONDS while it is up.

`write_load` writes the events as JSON lines with EVENT_ID_PLACEHOLDER for the event id,
which bench/post.lua replaces by a unique id per POST.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

STUDENTS = 500
CELL_COUNT = 40
NOTEBOOK = "week3/lab03.ipynb"
LONG_PATH = (
    "courses/2026-autumn/python-for-data-science/week-03/labs/"
    "lab03_pandas_groupby_and_merge_exercises_with_extra_challenges_final (copy 3).ipynb"
)
STUCK_ROLES = (5, 6, 7, 13, 14)  # student number % 20: one class in four has stuck students
STUCK_CELL, STUCK_TRIES, STUCK_ERROR = 4, 6, ("KeyError", "'price'")
ERROR_RATE, STRUGGLING_ERROR_RATE = 0.08, 0.6
SAVE_EVERY = 5
HANDS, HELP_BEAT_SECONDS = 3, 10
EVENT_ID_PLACEHOLDER = "@EVENT_ID@"
ESC = "\x1b"

BASE_CELLS = [
    "import pandas as pd\nimport numpy as np",
    "df = pd.read_csv('sales.csv')\ndf.head()",
    "df.describe()",
    "df['region'].value_counts()",
    "df['total'] = df['price'] * df['qty']",
    "df.groupby('region')['total'].sum()",
    "import matplotlib.pyplot as plt\ndf.plot(kind='bar')",
    "def mean(xs):\n    return sum(xs) / len(xs)\nmean([1, 2, 3])",
    "for i in range(3):\n    print(i)",
    "assert mean([2, 4]) == 3",
]
# CELL_COUNT cells: the ten above, then variations of them as the lab goes on.
CELLS = [
    BASE_CELLS[n] if n < len(BASE_CELLS) else f"# exercise {n}\n{BASE_CELLS[n % len(BASE_CELLS)]}"
    for n in range(CELL_COUNT)
]
OTHER_ERRORS = [
    ("NameError", "name 'totl' is not defined"),
    ("TypeError", 'can only concatenate str (not "int") to str'),
    ("IndexError", "list index out of range"),
    ("ZeroDivisionError", "division by zero"),
]
NAMES = ["田中 太郎", "Zoë 🚀 Park", "Ada L.", "Grace H.", "Alan T.", "Edsger D.", "Barbara L.",
         "Donald K.", "Margaret H.", "Linus T.", "佐藤 花子", "Ken T.", "Dennis R.", "Frances A.",
         "John M.", "Radia P.", "Tim B.", "Sophie W.", "Hedy L.", "Katherine J."]  # fmt: skip


def traceback_text(ename: str, evalue: str, count: int, code: str) -> str:
    """An IPython traceback as some clients send it: ANSI colours and all."""
    red, green, reset = f"{ESC}[0;31m", f"{ESC}[0;32m", f"{ESC}[0m"
    return (
        f"{red}{'-' * 75}{reset}\n{red}{ename}{reset}{' ' * 30}Traceback (most recent call last)\n"
        f"Cell {green}In[{count}], line 1{reset}\n{green}----> 1{reset} {code}\n\n"
        f"{red}{ename}{reset}: {evalue}"
    )


def timestamp(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Student:
    """One student's tab: the events it posts, in order, each stamped by `clock()`."""

    def __init__(self, number: int, notebook: str | None = None, seed: int = 7) -> None:
        self.email = f"student{number:03d}@uni.example"
        self.name = NAMES[number] if number < len(NAMES) else f"Student {number}"
        self.team = f"Team {'ABCD'[number % 4]}"
        self.notebook = notebook or (LONG_PATH if number == 3 else NOTEBOOK)
        bits = random.Random(seed * 1000 + number).getrandbits(128)
        self.session = str(uuid.UUID(int=bits, version=4))
        if number % 100 == 16:
            self.role = "struggling"
        elif number % 20 in STUCK_ROLES:
            self.role = "stuck"
        else:
            self.role = "progressing"
        self.rng = random.Random(seed * 7919 + number)
        self.count = self.tries = 0
        # The class is spread over the lab, and over the time since each one's last save.
        self.cell = self.rng.randrange(CELL_COUNT)
        self.unsaved = self.rng.randrange(SAVE_EVERY)

    def event(self, kind: str, moment: dt.datetime, event_id: str, **cell) -> dict:
        return {"eventId": event_id, "eventType": kind, "eventTime": timestamp(moment),
                "emailAddress": self.email, "userName": self.name, "teamName": self.team,
                "sessionId": self.session, "notebookPath": self.notebook, **cell}  # fmt: skip

    def next_error(self) -> tuple[str, str] | None:
        if self.role == "stuck" and self.cell == STUCK_CELL and self.tries < STUCK_TRIES:
            return STUCK_ERROR
        rate = STRUGGLING_ERROR_RATE if self.role == "struggling" else ERROR_RATE
        return self.rng.choice(OTHER_ERRORS) if self.rng.random() < rate else None

    def execution(self, moment: dt.datetime, event_id: str) -> dict:
        self.count += 1
        error = self.next_error()
        code = CELLS[self.cell]
        message = None
        if error and error is STUCK_ERROR:
            message = traceback_text(*error, self.count, code)
        elif error:
            message = f"{error[0]}: {error[1]}"
        cell_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.notebook}#{self.cell}"))
        event = self.event(
            "cell_executed", moment, event_id, cellId=cell_id, cellIndex=self.cell,
            cellType="code", code=code, executionCount=self.count, hasError=bool(error),
            errorMessage=message, result=message or ("0\n1\n2" if self.cell % 10 == 8 else ""),
            executionDurationMs=self.rng.randint(3, 900),
        )  # fmt: skip
        if error is STUCK_ERROR:
            self.tries += 1
        else:
            self.cell, self.tries = (self.cell + 1) % CELL_COUNT, 0
        return event

    def events(
        self, clock: Callable[[], dt.datetime], ids: Iterator[str], opened: bool
    ) -> Iterator[dict]:
        if opened:
            yield self.event("notebook_opened", clock(), next(ids))
        while True:
            yield self.execution(clock(), next(ids))
            self.unsaved += 1
            if self.unsaved == SAVE_EVERY:
                yield self.event("notebook_saved", clock(), next(ids))
                self.unsaved = 0


def placeholders() -> Iterator[str]:
    while True:
        yield EVENT_ID_PLACEHOLDER


def class_events(count: int, clock: Callable[[], dt.datetime], **options) -> Iterator[dict]:
    """`count` events of a class of STUDENTS, interleaved as their tabs would post them.

    Options: ids (an iterator of event ids, else EVENT_ID_PLACEHOLDER), notebook, seed,
    opened (each tab's `notebook_opened` first; else the class is already at work)."""
    ids = options.get("ids") or placeholders()
    seed = options.get("seed", 7)
    students = [Student(n, options.get("notebook"), seed) for n in range(STUDENTS)]
    opened = options.get("opened", False)
    streams = [student.events(clock, ids, opened) for student in students]
    order = list(range(STUDENTS))
    rng = random.Random(seed)
    produced = 0
    while produced < count:
        rng.shuffle(order)
        for number in order[: count - produced]:
            yield next(streams[number])
            produced += 1


def help_beats(moment: dt.datetime, event_id: str = EVENT_ID_PLACEHOLDER) -> list[dict]:
    """One beat of each raised hand: the first HANDS students' `help`, without a cell."""
    return [Student(n).event("help", moment, event_id) for n in range(HANDS)]


def encode(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def write_load(directory: Path, per_student: int = 50) -> tuple[Path, Path]:
    """The events post.lua replays (BENCH_EVENTS) and the help beats it adds (BENCH_HELP)."""
    now = dt.datetime.now(dt.UTC)
    events, beats = directory / "events.jsonl", directory / "help.jsonl"
    lines = (encode(e) for e in class_events(STUDENTS * per_student, lambda: now))
    events.write_text("\n".join(lines) + "\n", encoding="utf-8")
    beats.write_text("\n".join(encode(e) for e in help_beats(now)) + "\n", encoding="utf-8")
    return events, beats


def describe(path: Path) -> dict:
    """The mix of a written load: events, by type, errors, tracebacks, mean bytes."""
    kinds: dict[str, int] = {}
    errors = tracebacks = size = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        event = json.loads(line)
        kinds[event["eventType"]] = kinds.get(event["eventType"], 0) + 1
        errors += bool(event.get("hasError"))
        tracebacks += ESC in (event.get("errorMessage") or "")
        size += len(line.encode())
    return {"events": len(lines), "types": kinds, "errors": errors, "tracebacks": tracebacks,
            "mean_bytes": round(size / len(lines))}  # fmt: skip
