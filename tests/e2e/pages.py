"""The dashboard as the browser tests drive it: the page object, and the events they post."""

from __future__ import annotations

import httpx
from selenium.common.exceptions import StaleElementReferenceException
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
        # Live updates redraw rows: an element read mid-redraw is looked up again.
        return WebDriverWait(
            self.browser, timeout, 0.05, ignored_exceptions=[StaleElementReferenceException]
        ).until(lambda _: condition())

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

    def click(self, selector: str) -> None:
        """Click the element matching selector, looked up again if a redraw replaced it."""
        self.wait(lambda: self.element(selector).click() is None)

    def feed_item(self, event_id: int) -> WebElement:
        return self.element(f'#feed [data-event-id="{event_id}"]')

    def student_row(self, student_id: str) -> WebElement:
        return self.element(f'#students tr[data-student-id="{student_id}"]')

    def cell(self, row: WebElement, name: str) -> str:
        return row.find_element(By.CSS_SELECTOR, f"td.{name}").text


def execution(student_id: str, status: str, **fields) -> dict:
    event = {"student_id": student_id, "event_type": "cell_executed", "course_id": "cs101",
             "notebook_path": "week1.ipynb", "cell_id": "c1", "status": status}  # fmt: skip
    return event | fields


def hand(student_id: str, name: str, **fields) -> dict:
    event = {"student_id": student_id, "student_name": name, "event_type": "help",
             "course_id": "cs101", "notebook_path": "week1/lists.ipynb",
             "cell_index": 2}  # fmt: skip
    return event | fields


def camel_case_run(
    email: str, name: str, team: str, cell: str, index: int, error: str = ""
) -> dict:
    event = {"eventType": "cell_executed", "emailAddress": email, "userName": name,
             "teamName": team, "notebookPath": "course/week2/loops.ipynb", "cellId": cell,
             "cellIndex": index, "code": "print(x)", "hasError": bool(error),
             "executionDurationMs": 12}  # fmt: skip
    return event | ({"errorMessage": error} if error else {})
