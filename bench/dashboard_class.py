"""A simulated class for the dashboard's screenshots and benchmark.

Students post what cell-monitor-extension posts (camelCase: emailAddress, teamName,
notebookPath, cellId, cellIndex, code, hasError, errorMessage, executionDurationMs), work
through one notebook cell by cell, and fail the way a class does: many on the same cell,
some everywhere, a few raise a hand and keep it up with a `help` every 10 seconds.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass, field

FIRST_NAMES = (
    "Ada", "Grace", "Alan", "Barbara", "Edsger", "Frances", "Guido", "Hedy", "Ivan", "Jean",
    "Ken", "Lin", "Margaret", "Niklaus", "Ole", "Radia", "Sophie", "Tim", "Ursula", "Vint",
    "Wendy", "Xiao", "Yukihiro", "Zuse", "Anita", "Bjarne", "Carol", "Dennis", "Evelyn", "Fran",
)  # fmt: skip
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Liskov", "Dijkstra", "Allen", "Kay", "Sammet")
TEAMS = ("Team Red", "Team Green", "Team Blue")
NOTEBOOK = "courses/python-101/week3/loops_and_lists.ipynb"
CELLS = [
    "import math",
    "numbers = [3, 1, 4, 1, 5, 9, 2, 6]",
    "for n in numbers:\n    print(n)",
    "squares = [n * n for n in numbers]\nsquares",
    "for n in numbers:\n    total += n\nprint(total)",
    "evens = [n for n in numbers if n % 2 == 0]",
    "math.sqrt(sum(squares))",
    "label = 'sum: ' + sum(numbers)",
    "sorted(numbers, reverse=True)",
    "words = ['loop', 'list']\n' '.join(words)",
]
# IPython colours what it sends, and the extension passes it on.
RED, RESET = "\x1b[0;31m", "\x1b[0m"
ERRORS = {
    4: f"{RED}NameError{RESET}: name 'total' is not defined",
    7: f'{RED}TypeError{RESET}: can only concatenate str (not "int") to str',
    2: f"{RED}IndentationError{RESET}: expected an indented block after 'for' statement",
    6: f"{RED}NameError{RESET}: name 'squares' is not defined",
}
HELP_BEAT_SECONDS = 10


@dataclass
class Student:
    email: str
    name: str
    team: str
    fate: str  # steady, stuck (on cell 4, then 7), struggling (errors anywhere), hand
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    cell: int = 0
    runs: int = 0
    hand_since: float | None = None
    last_beat: float = 0.0


def roster(size: int, seed: int = 11) -> list[Student]:
    chooser = random.Random(seed)
    fates = ["steady"] * size
    for index in range(size):
        fates[index] = chooser.choices(
            ("steady", "stuck", "struggling", "hand"), weights=(60, 22, 8, 10)
        )[0]
    students = []
    for index in range(size):
        first = FIRST_NAMES[index % len(FIRST_NAMES)]
        last = LAST_NAMES[(index // len(FIRST_NAMES) + index) % len(LAST_NAMES)]
        email = f"{first.lower()}.{last.lower()}{index}@uni.example.edu"
        team = TEAMS[index % len(TEAMS)]
        students.append(Student(email, f"{first} {last}", team, fates[index]))
    return students


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def camel_event(student: Student, event_type: str, **fields) -> dict:
    event = {
        "eventId": uuid.uuid4().hex,
        "eventType": event_type,
        "eventTime": now_iso(),
        "emailAddress": student.email,
        "userName": student.name,
        "teamName": student.team,
        "sessionId": student.session,
        "notebookPath": NOTEBOOK,
    }
    return event | fields


class Classroom:
    """Yields the events a class sends, one student action at a time."""

    def __init__(self, size: int, seed: int = 11) -> None:
        self.students = roster(size, seed)
        self.random = random.Random(seed)
        self.clock = 0.0  # simulated seconds, advanced by the caller

    def opening(self) -> list[dict]:
        return [camel_event(student, "notebook_opened") for student in self.students]

    def action(self) -> dict:
        """One student runs a cell, or raises a hand."""
        student = self.random.choice(self.students)
        if student.fate == "hand" and student.hand_since is None and student.cell >= 3:
            student.hand_since = student.last_beat = self.clock
            return camel_event(student, "help", cellIndex=student.cell)
        return self.run_cell(student)

    def run_cell(self, student: Student) -> dict:
        index = student.cell
        error = self.fails(student, index)
        student.runs += 1
        if not error:
            student.cell = (index + 1) % len(CELLS)
        fields = {
            "cellId": f"cell-{index:02d}-{uuid.uuid5(uuid.NAMESPACE_URL, NOTEBOOK + str(index))}",
            "cellIndex": index,
            "cellType": "code",
            "code": CELLS[index],
            "executionCount": student.runs,
            "hasError": bool(error),
            "executionDurationMs": round(self.random.uniform(2, 400), 1),
        }
        if error:
            fields["errorMessage"] = error
        else:
            fields["result"] = f"Out[{student.runs}]: ok"
        return camel_event(student, "cell_executed", **fields)

    def fails(self, student: Student, index: int) -> str | None:
        if student.fate == "stuck" and index in (4, 7):
            return ERRORS[index] if self.random.random() < 0.9 else None
        if student.fate == "struggling":
            return (
                self.random.choice(list(ERRORS.values())) if self.random.random() < 0.45 else None
            )
        if index in ERRORS and self.random.random() < 0.25:
            return ERRORS[index]
        return None

    def heartbeats(self) -> list[dict]:
        """The `help` every raised hand sends every 10 seconds, as the extension does."""
        beats = []
        for student in self.students:
            due = (
                student.hand_since is not None
                and self.clock - student.last_beat >= HELP_BEAT_SECONDS
            )
            if due:
                student.last_beat = self.clock
                beats.append(camel_event(student, "help", cellIndex=student.cell))
        return beats
