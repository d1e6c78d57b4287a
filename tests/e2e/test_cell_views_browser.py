"""The progress grid and the one-cell panel in real headless Chromium, in English and in
Japanese, against a real uvicorn server: what an instructor sees and clicks."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.e2e.pages import XSS, Dashboard

LAB = "week1/lists.ipynb"

SEEN = {
    "en": {
        "headline": "2 of 3 past cell [2]",
        "one_off": "+ 1 cell with a single failure",
        "passed": "Latest run passed",
        "sort": "Furthest behind first",
    },
    "ja": {
        "headline": "3人中2人がセル[2]以降",
        "one_off": "+ 1回だけのエラーのセル 1件",
        "passed": "最新の実行は成功",
        "sort": "遅れている順",
    },
}


def run(student: str, name: str, index: int, status: str, source: str = "x = 1") -> dict:
    error = {"ename": "NameError", "evalue": "name 'totl' is not defined"}
    return {"student_id": student, "student_name": name, "event_type": "cell_executed",
            "notebook_path": LAB, "cell_id": f"c{index}", "cell_index": index, "status": status,
            "source": source, **({"error": error} if status == "error" else {})}  # fmt: skip


@pytest.fixture(params=["en", "ja"])
def class_of_three(request, browser, start_server, tmp_path) -> tuple[Dashboard, dict]:
    """Ada fails cell 2 twice, Bob is past cell 3, Cy ran cell 1; the page in a language."""
    dashboard = Dashboard(browser, start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}"))
    dashboard.post(
        run("ada", "Ada", 1, "ok"), run("ada", "Ada", 2, "error"),
        run("ada", "Ada", 2, "error", source=f"print(totl)  # {XSS}"),
        run("bob", "Bob", 1, "ok"), run("bob", "Bob", 2, "ok"), run("bob", "Bob", 3, "ok"),
        run("cy", "Cy", 1, "ok"),
    )  # fmt: skip
    browser.get(dashboard.server.url + "/")
    browser.execute_script(
        "localStorage.setItem('telemetry.language', arguments[0])", request.param
    )
    dashboard.open()
    return dashboard, SEEN[request.param]


def squares(dashboard: Dashboard, student_id: str) -> list[tuple[str, str]]:
    row = dashboard.element(f'#progress-grid tr[data-student-id="{student_id}"]')
    cells = row.find_elements(By.CSS_SELECTOR, "td.square")
    return [(cell.get_attribute("class").split()[-1], cell.text) for cell in cells]


def head(group) -> tuple[str, str]:
    """A group's count and error, as its heading shows them."""
    return tuple(group.find_element(By.CSS_SELECTOR, f".group-{part}").text
                 for part in ("count", "error"))  # fmt: skip


def test_progress_shows_each_students_squares_and_how_far_the_class_is(class_of_three) -> None:
    dashboard, seen = class_of_three
    assert dashboard.wait(lambda: squares(dashboard, "ada")) == [
        ("ok", "✓"), ("error", "✗"), ("none", "·")
    ]  # fmt: skip
    assert squares(dashboard, "bob") == [("ok", "✓")] * 3
    assert dashboard.element("#progress-headline").text == seen["headline"]
    assert dashboard.element("#progress-sort option:checked").text == seen["sort"]
    order = dashboard.browser.find_elements(
        By.CSS_SELECTOR, "#progress-grid tbody tr[data-student-id]"
    )
    assert [row.get_attribute("data-student-id") for row in order] == ["cy", "ada", "bob"]
    # A new student's first run shows in the grid without a reload.
    dashboard.post(run("dee", "Dee", 3, "error"))
    assert dashboard.wait(lambda: squares(dashboard, "dee")) == [
        ("none", "·"), ("none", "·"), ("error", "✗")
    ]  # fmt: skip


def test_a_progress_column_opens_the_cell_grouped_by_error_and_a_click_opens_a_story(
    class_of_three,
) -> None:
    dashboard, seen = class_of_three
    dashboard.click('#progress-grid th button[data-cell="c2"]')
    panel = dashboard.element("#cell-panel")
    dashboard.wait(panel.is_displayed)
    groups = dashboard.wait(lambda: panel.find_elements(By.CSS_SELECTOR, "li.group"))
    assert [head(group) for group in groups] == [
        ("1", "NameError: name 'totl' is not defined"), ("1", seen["passed"])
    ]  # fmt: skip
    code = groups[0].find_element(By.CSS_SELECTOR, "pre.code")
    assert code.text == f"print(totl)  # {XSS}"
    assert dashboard.browser.execute_script("return window.__pwned") is None
    groups[0].find_element(By.CSS_SELECTOR, 'button[data-student-id="ada"]').click()
    story = dashboard.element("#student-panel")
    dashboard.wait(story.is_displayed)
    assert dashboard.wait(lambda: "Ada" in dashboard.element("#student-title").text)


def test_stuck_cells_come_first_and_single_failures_fold_into_one_line(class_of_three) -> None:
    dashboard, seen = class_of_three
    dashboard.post(run("cy", "Cy", 3, "error"))  # once: a one-off
    toggle = dashboard.element("#stuck-cells .one-off-toggle")
    assert dashboard.wait(lambda: toggle.text == seen["one_off"])
    shown = dashboard.browser.find_elements(By.CSS_SELECTOR, "#stuck-cells button.cell-summary")
    assert [cell.get_attribute("data-cell") for cell in shown] == ["c2"]
    toggle.click()
    assert dashboard.wait(lambda: dashboard.element('#stuck-cells li.one-off [data-cell="c3"]'))
    dashboard.click('#stuck-cells button.cell-summary[data-cell="c2"]')
    group = dashboard.element("#cell-panel li.group.error")
    assert head(group) == ("1", "NameError: name 'totl' is not defined")


def test_a_class_too_long_for_the_grid_scrolls_to_its_last_student(
    browser, start_server, tmp_path
) -> None:
    dashboard = Dashboard(browser, start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}"))
    dashboard.post(*(run(f"s{n:03d}", f"Student {n:03d}", 1 + n // 20, "ok") for n in range(120)))
    dashboard.open()
    drawn = "#progress-grid tbody tr[data-student-id]"
    first = dashboard.wait(lambda: dashboard.browser.find_elements(By.CSS_SELECTOR, drawn))
    assert first[0].get_attribute("data-student-id") == "s000"  # furthest behind first
    dashboard.browser.execute_script(
        "const grid = document.querySelector('#progress-grid'); grid.scrollTop = grid.scrollHeight"
    )
    last = dashboard.wait(
        lambda: dashboard.element('#progress-grid tr[data-student-id="s119"]').is_displayed()
    )
    assert last
    rows = dashboard.browser.find_elements(By.CSS_SELECTOR, drawn)
    assert "s000" not in [row.get_attribute("data-student-id") for row in rows]
