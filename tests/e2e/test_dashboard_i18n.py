"""The dashboard in Japanese (the browser's language here) and English, the alert bar, the
keyboard, the chart's ranges and search, in real headless Chromium against real uvicorn."""

from __future__ import annotations

import re

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tests.e2e.pages import Dashboard, camel_case_run, execution, hand

# Runs in the page: the English table's words (pieces between placeholders, long enough to
# mean something) that show in the page's visible text.
ENGLISH_LEFT = """
const done = arguments[arguments.length - 1];
Promise.all([import("/static/dashboard/strings/en.js"), import("/static/dashboard/strings/ja.js")])
  .then(([{ en }, { ja }]) => {
    const text = document.body.innerText;
    const words = Object.entries(en).flatMap(([key, value]) =>
      (typeof value === "object" ? Object.values(value) : [value])
        .filter((english) => JSON.stringify(ja[key]) !== JSON.stringify(english))
        .flatMap((english) => english.split(/\\{\\w+\\}/)).map((piece) => piece.trim())
        .filter((piece) => piece.length >= 5));
    const keys = Object.keys(en).filter((key) => text.includes(key));
    done([...words.filter((word) => text.includes(word)), ...keys]);
  });
"""


@pytest.fixture
def browser_languages() -> str:
    return "ja,en"


def english_left(dashboard: Dashboard) -> list[str]:
    return dashboard.browser.execute_async_script(ENGLISH_LEFT)


def test_the_page_follows_a_japanese_browser_and_leaves_no_english(dashboard) -> None:
    dashboard.post(*[execution("lin", "error", student_name="林") for _ in range(3)])
    dashboard.post(hand("ada", "Ada", team="A"), execution("bo", "ok", team="A"))
    dashboard.open()
    assert dashboard.browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ja"
    assert dashboard.element("h1").text == "授業テレメトリ"
    row = dashboard.student_row("lin")
    assert dashboard.wait(lambda: "つまずき" in dashboard.cell(row, "attention"))
    assert re.search(r"(秒|分)前|今", dashboard.cell(row, "last-seen"))  # a relative age
    assert dashboard.wait(lambda: dashboard.element("#activity-chart polyline.active"))
    assert english_left(dashboard) == []
    row.click()
    assert dashboard.wait(lambda: "セル実行" in dashboard.element("#timeline").text)
    assert english_left(dashboard) == []


def test_the_settings_switch_changes_the_language_and_a_reload_keeps_it(dashboard) -> None:
    dashboard.open()
    assert dashboard.element("h1").text == "授業テレメトリ"
    dashboard.click("#settings summary")
    Select(dashboard.element("#language")).select_by_value("en")
    assert dashboard.wait(lambda: dashboard.element("h1").text == "Classroom telemetry")
    dashboard.open()
    html = dashboard.browser.find_element(By.TAG_NAME, "html")
    assert html.get_attribute("lang") == "en"
    assert dashboard.element("#queue-title").text.startswith("Help queue")


PULSES = "return document.getElementById('alerts-flash').getAnimations().map((a) => a.playState)"


def alert_names(dashboard: Dashboard) -> list[str]:
    buttons = dashboard.browser.find_elements(By.CSS_SELECTOR, "#alerts button")
    return [button.text for button in buttons]


def test_the_alert_bar_names_raised_hands_in_queue_order_and_opens_their_story(
    dashboard,
) -> None:
    dashboard.open()
    bar = dashboard.element("#alerts")
    assert not bar.is_displayed()  # quiet while no hand is up
    shown = []
    for student_id, name in (("bob", "Bob"), ("ada", "エイダ"), ("cy", "Cy")):
        dashboard.post(hand(student_id, name))
        shown.append(name)
        assert dashboard.wait(lambda: alert_names(dashboard) == shown)
        # Each new hand pulses the bar: one pulse, restarted, never two on top of each other.
        assert dashboard.browser.execute_script(PULSES) == ["running"]
    assert "3名が挙手中" in bar.text
    dashboard.click('#alerts button[data-student-id="ada"]')
    assert dashboard.wait(lambda: dashboard.element("#student-title").text == "エイダ")
    for student_id, name in (("bob", "Bob"), ("ada", "エイダ"), ("cy", "Cy")):
        dashboard.post(hand(student_id, name, event_type="help_stop"))
    assert dashboard.wait(lambda: not bar.is_displayed())


def test_tab_reaches_a_row_enter_opens_it_esc_returns_to_it_and_question_lists_keys(
    dashboard,
) -> None:
    dashboard.post(execution("ada", "ok", student_name="Ada"))
    dashboard.open()
    dashboard.student_row("ada")
    body = dashboard.browser.find_element(By.TAG_NAME, "body")
    body.send_keys("?")
    assert dashboard.wait(lambda: dashboard.element("#keys").is_displayed())
    assert "Esc" in dashboard.element("#keys").text
    dashboard.browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert dashboard.wait(lambda: not dashboard.element("#keys").is_displayed())
    active = dashboard.browser.switch_to.active_element
    for _ in range(60):  # Tab through the header and the toolbars to the first row
        if active.get_attribute("data-student-id") == "ada" and active.tag_name == "tr":
            break
        active.send_keys(Keys.TAB)
        active = dashboard.browser.switch_to.active_element
    assert active.tag_name == "tr", "Tab never reached a table row"
    active.send_keys(Keys.ENTER)
    assert dashboard.wait(lambda: dashboard.element("#student-panel").is_displayed())
    dashboard.browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert dashboard.wait(lambda: not dashboard.element("#student-panel").is_displayed())
    focused = dashboard.browser.switch_to.active_element
    assert focused.get_attribute("data-student-id") == "ada"


def test_the_chart_switches_ranges_in_wider_buckets_and_keeps_the_choice(dashboard) -> None:
    dashboard.post(execution("ada", "ok"))
    dashboard.open()
    points = lambda: dashboard.element("#activity-chart polyline.active").get_attribute("points")  # noqa: E731
    assert dashboard.wait(lambda: len(points().split()) == 60)
    dashboard.click('#activity-range button[data-hours="6"]')
    assert dashboard.wait(lambda: len(points().split()) == 72)  # 5-minute buckets
    assert dashboard.element("#activity-bucket").text == "5分ごと"
    dashboard.open()
    pressed = dashboard.element('#activity-range button[data-hours="6"]')
    assert pressed.get_attribute("aria-pressed") == "true"
    assert dashboard.wait(lambda: len(points().split()) == 72)


def shown_students(dashboard: Dashboard) -> list[str]:
    rows = dashboard.browser.find_elements(By.CSS_SELECTOR, "#students tbody tr[data-student-id]")
    return sorted(row.get_attribute("data-student-id") for row in rows)


@pytest.mark.parametrize(
    ("typed", "found"),
    [("zoe", ["zoe"]), ("ZOË", ["zoe"]), ("ｚｏｅ", ["zoe"]), ("アダ", ["ada"]), ("ｱﾀﾞ", ["ada"])],
)
def test_search_ignores_accents_case_and_width(dashboard, typed, found) -> None:
    dashboard.post(
        execution("zoe", "ok", student_name="Zoë"),
        execution("ada", "ok", student_name="ｱﾀﾞ 花子"),
        execution("ta", "ok", student_name="タロウ"),
    )
    dashboard.open()
    assert dashboard.wait(lambda: shown_students(dashboard) == ["ada", "ta", "zoe"])
    dashboard.element("#search").send_keys(typed)
    assert dashboard.wait(lambda: shown_students(dashboard) == found)


def test_a_story_shows_a_cell_monitor_failure_once_with_a_readable_name(dashboard) -> None:
    failure = "NameError: name 'x' is not defined"
    run = camel_case_run("ada@uni.edu", "Ada", "A", "c1", 3, error=failure)
    dashboard.post(run | {"result": failure})  # the extension's result repeats errorMessage
    dashboard.open()
    dashboard.student_row("ada@uni.edu").click()
    item = dashboard.element("#timeline li")
    assert dashboard.wait(lambda: "セル実行：エラー" in item.text)
    assert item.text.count(failure) == 1


def test_the_empty_page_shows_this_servers_url_with_the_ingest_token(
    browser, start_server, tmp_path
) -> None:
    server = start_server(
        DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", INGEST_TOKENS="lab=lab-secret"
    )
    dashboard = Dashboard(browser, server).open()
    url = dashboard.element("#ingest-url")
    assert dashboard.wait(url.is_displayed)
    assert url.text == f"{server.url}/api/v1/events?token=INGEST_TOKEN"
    assert f"--port {server.port}" in dashboard.element("#listen-command").text
