"""The stalled chip, the summary's count and the queue's median wait, in real headless
Chromium against uvicorn, in English and in Japanese. Time passes by moving stored times
into the past in the server's SQLite file."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3

import httpx
import pytest

from telemetry.classview import format_timestamp
from tests.e2e.pages import Dashboard, execution

TEXTS = {
    "en": {"chip": "stalled", "summary": "1 stalled", "median": "median wait"},
    "ja": {"chip": "停滞", "summary": "1人が停滞", "median": "待ち時間の中央値"},
}


@pytest.fixture
def database(tmp_path):
    return tmp_path / "telemetry.db"


@pytest.fixture
def dashboard(browser, start_server, database) -> Dashboard:
    return Dashboard(browser, start_server(DATABASE_URL=f"sqlite:///{database}"))


def backdate(database, table: str, column: str, minutes: float, where: str, *args) -> None:
    then = format_timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes))
    with sqlite3.connect(database) as connection:
        connection.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (then, *args))


def open_in(dashboard: Dashboard, language: str) -> None:
    dashboard.browser.get(dashboard.server.url + "/healthz")
    dashboard.browser.execute_script(f"localStorage.setItem('telemetry.language', '{language}')")
    dashboard.open()


@pytest.mark.parametrize("language", ["en", "ja"])
def test_a_stalled_student_shows_a_chip_and_counts_in_the_summary(
    dashboard, database, language
) -> None:
    texts = TEXTS[language]
    [ada_first] = dashboard.post(execution("ada", "error"))
    [bob_first] = dashboard.post(execution("bob", "error"))
    backdate(database, "events", "received_at", 11, "id IN (?, ?)", ada_first, bob_first)
    backdate(database, "students", "last_seen", 11, "student_id = 'bob'")
    dashboard.post(execution("ada", "error"))
    open_in(dashboard, language)
    ada = dashboard.student_row("ada")
    assert dashboard.wait(lambda: texts["chip"] in dashboard.cell(ada, "attention"))
    assert dashboard.wait(lambda: texts["summary"] in dashboard.element("#summary").text)
    # Ada passes the cell: the chip goes. Bob, back, fails it again: stalled, live.
    dashboard.post(execution("ada", "ok"), execution("bob", "error"))
    assert dashboard.wait(lambda: texts["chip"] not in dashboard.cell(ada, "attention"))
    bob = dashboard.student_row("bob")
    assert dashboard.wait(lambda: texts["chip"] in dashboard.cell(bob, "attention"))
    assert dashboard.wait(lambda: texts["summary"] in dashboard.element("#summary").text)


@pytest.mark.parametrize("language", ["en", "ja"])
def test_the_queue_shows_todays_median_wait(dashboard, database, language) -> None:
    texts = TEXTS[language]
    dashboard.post({"student_id": "ada", "event_type": "help"})
    backdate(database, "hand_raises", "raised_at", 1.5, "student_id = 'ada'")
    response = httpx.post(f"{dashboard.server.url}/api/v1/help/ada/on-my-way", json={"by": "Lee"})
    assert response.status_code == 201, response.text
    open_in(dashboard, language)
    median = dashboard.element("#queue-median")
    assert dashboard.wait(lambda: texts["median"] in median.text)
    assert re.search(r"1:3\d", median.text), median.text
