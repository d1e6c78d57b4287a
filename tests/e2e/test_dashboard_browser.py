"""The dashboard in real headless Chromium against a real uvicorn server."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'


class Dashboard:
    """The page as an instructor sees it, waited on by polling the DOM (never by sleeping)."""

    def __init__(self, browser, server) -> None:
        self.browser = browser
        self.server = server

    def open(self) -> Dashboard:
        self.browser.get(self.server.url + "/")
        self.wait_for_connection("live")
        return self

    def wait(self, condition, timeout: float = 20.0):
        return WebDriverWait(self.browser, timeout, poll_frequency=0.05).until(
            lambda _: condition()
        )

    def connection(self) -> str:
        return self.browser.find_element(By.ID, "connection").get_attribute("data-state")

    def wait_for_connection(self, state: str) -> None:
        self.wait(lambda: self.connection() == state)

    def post(self, *events: dict) -> list[int]:
        response = httpx.post(f"{self.server.url}/api/v1/events", json=list(events), timeout=10)
        assert response.status_code == 201, response.text
        return [receipt["id"] for receipt in response.json()["events"]]

    def feed_items(self, event_id: int) -> list[WebElement]:
        return self.browser.find_elements(By.CSS_SELECTOR, f'#feed [data-event-id="{event_id}"]')

    def element(self, selector: str, within: WebElement | None = None) -> WebElement:
        """The first element matching selector, once there is one."""
        scope = within or self.browser
        return self.wait(lambda: next(iter(scope.find_elements(By.CSS_SELECTOR, selector)), None))

    def feed_item(self, event_id: int) -> WebElement:
        return self.element(f'#feed [data-event-id="{event_id}"]')

    def student_row(self, student_id: str) -> WebElement:
        return self.element(f'#students tr[data-student-id="{student_id}"]')

    def cell(self, row: WebElement, name: str) -> str:
        return row.find_element(By.CSS_SELECTOR, f"td.{name}").text


@pytest.fixture
def server(start_server, tmp_path):
    return start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'telemetry.db'}")


@pytest.fixture
def dashboard(browser, server) -> Dashboard:
    return Dashboard(browser, server)


def execution(student_id: str, status: str, **fields) -> dict:
    event = {"student_id": student_id, "event_type": "cell_executed", "course_id": "cs101",
             "notebook_path": "week1.ipynb", "cell_id": "c1", "status": status}  # fmt: skip
    return event | fields


def test_page_loads_state_then_shows_posted_events_live(dashboard) -> None:
    dashboard.post(execution("ada", "ok", student_name="Ada"))
    dashboard.open()
    ada = dashboard.student_row("ada")
    assert dashboard.cell(ada, "executions") == "1"
    [event_id] = dashboard.post(execution("grace", "error", student_name="Grace", cell_index=4))
    item = dashboard.feed_item(event_id)
    assert "Grace" in item.text and "week1.ipynb" in item.text and "error" in item.text
    grace = dashboard.student_row("grace")
    assert dashboard.wait(lambda: dashboard.cell(grace, "errors") == "1")
    dashboard.post(execution("ada", "ok"), {"student_id": "ada", "event_type": "help"})
    assert dashboard.wait(lambda: dashboard.cell(ada, "executions") == "2")
    assert dashboard.wait(lambda: "hand raised" in dashboard.cell(ada, "attention"))


def test_repeated_errors_on_one_cell_mark_the_student_stuck(dashboard) -> None:
    dashboard.open()
    dashboard.post(*[execution("lin", "error") for _ in range(3)])
    row = dashboard.student_row("lin")
    assert dashboard.wait(lambda: "stuck" in dashboard.cell(row, "attention"))
    dashboard.post(execution("lin", "ok"))
    assert dashboard.wait(lambda: dashboard.cell(row, "attention") == "")


def test_student_provided_markup_shows_as_text_and_runs_nothing(dashboard) -> None:
    dashboard.open()
    [event_id] = dashboard.post(execution("mallory", "error", student_name=XSS, source=XSS))
    for attempt in ("live", "reloaded"):
        item = dashboard.feed_item(event_id)
        item.find_element(By.TAG_NAME, "summary").click()  # the code, on demand
        code = dashboard.element("pre.code", within=item)
        assert code.text == XSS, attempt
        row = dashboard.student_row("mallory")
        assert row.find_element(By.CSS_SELECTOR, "td.student .name").text == XSS, attempt
        assert dashboard.browser.execute_script("return window.__pwned") is None, attempt
        assert not dashboard.browser.find_elements(By.CSS_SELECTOR, "#feed img, #students img")
        dashboard.open()  # the same values again, this time through the read API


def test_page_reconnects_by_itself_after_the_server_restarts(dashboard, server) -> None:
    dashboard.open()
    [before] = dashboard.post(execution("ada", "ok"))
    dashboard.feed_item(before)
    server.stop()
    dashboard.wait_for_connection("reconnecting")
    server.start()  # the same port and SQLite file
    dashboard.wait_for_connection("live")
    [after] = dashboard.post(execution("ada", "error"))
    dashboard.feed_item(after)
    assert len(dashboard.feed_items(before)) == 1  # the resumed stream repeats nothing
    row = dashboard.student_row("ada")
    assert dashboard.wait(lambda: dashboard.cell(row, "executions") == "2")


DASHBOARD_TOKEN = "instructor-secret"


@pytest.fixture
def guarded(start_server, tmp_path, browser):
    server = start_server(
        DATABASE_URL=f"sqlite:///{tmp_path / 'guarded.db'}", DASHBOARD_TOKENS=DASHBOARD_TOKEN
    )
    return Dashboard(browser, server)


def test_guarded_dashboard_asks_for_a_token_then_goes_live(guarded) -> None:
    guarded.browser.get(guarded.server.url + "/")
    guarded.wait_for_connection("signed out")
    token = guarded.element("#token")
    token.send_keys("wrong")
    guarded.element("#sign-in button").click()
    guarded.wait(lambda: "refused" in guarded.element("#sign-in-problem").text)
    token.clear()
    token.send_keys(DASHBOARD_TOKEN)
    guarded.element("#sign-in button").click()
    guarded.wait_for_connection("live")
    [event_id] = guarded.post(execution("ada", "ok"))
    guarded.feed_item(event_id)


def test_a_link_with_the_token_in_its_fragment_signs_in(guarded) -> None:
    guarded.browser.get(guarded.server.url + f"/#token={DASHBOARD_TOKEN}")
    guarded.wait_for_connection("live")
    assert "token" not in guarded.browser.current_url
    [event_id] = guarded.post(execution("grace", "error"))
    guarded.feed_item(event_id)
    assert DASHBOARD_TOKEN not in guarded.server.logs()
