"""The dashboard in real headless Chromium against a real uvicorn server."""

from __future__ import annotations

import re

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.conftest import REDIS_URL
from tests.e2e.pages import XSS, Dashboard, camel_case_run, execution, hand


@pytest.fixture(params=["sqlite", "postgres+redis"])
def either_storage(request, browser, start_server, tmp_path, channel) -> Dashboard:
    """The page against the SQLite default, then against PostgreSQL and Redis as deployed."""
    if request.param == "sqlite":
        return Dashboard(browser, start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}"))
    database_url = request.getfixturevalue("postgres_database_url")
    server = start_server(
        DATABASE_URL=database_url, REDIS_URL=REDIS_URL, NOTIFICATION_CHANNEL=channel
    )
    return Dashboard(browser, server)


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
    assert dashboard.wait(lambda: "stuck" not in dashboard.cell(row, "attention"))


# Runs before the page's scripts: the session answer says two errors in a row make a student
# stuck, where the server's own rule says three.
STRICTER_RULES = """
const fetchAnswer = window.fetch;
window.fetch = async (resource, options) => {
  const response = await fetchAnswer(resource, options);
  if (!String(resource).startsWith("api/v1/session")) return response;
  const session = await response.json();
  session.rules.stuck_error_streak = 2;
  const {status, headers} = response;
  return new Response(JSON.stringify(session), {status, headers});
};
"""


def test_live_updates_follow_the_rules_in_the_session_answer(dashboard) -> None:
    dashboard.browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": STRICTER_RULES}
    )
    dashboard.open()
    dashboard.post(*[execution("lin", "error") for _ in range(2)])
    row = dashboard.student_row("lin")
    assert dashboard.wait(lambda: "stuck: 2 errors" in dashboard.cell(row, "attention"))


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


def test_page_marks_its_data_stale_while_the_server_restarts(dashboard, server) -> None:
    dashboard.open()
    # How to connect, on an empty page: drawn on the next frame, which may come after "live".
    assert dashboard.wait(dashboard.element("#empty").is_displayed)
    [before] = dashboard.post(execution("ada", "ok"))
    dashboard.feed_item(before)
    assert not dashboard.element("#empty").is_displayed()
    assert not dashboard.element("#stale").is_displayed()
    server.stop()
    dashboard.wait_for_connection("reconnecting")
    stale = dashboard.element("#stale")
    dashboard.wait(stale.is_displayed)
    assert re.search(r"data as of \d\d:\d\d:\d\d", stale.text), stale.text
    assert "stale" in dashboard.browser.find_element(By.TAG_NAME, "body").get_attribute("class")
    server.start()  # the same port and SQLite file
    dashboard.wait_for_connection("live")
    dashboard.wait(lambda: not stale.is_displayed())
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


def queue_names(dashboard: Dashboard) -> list[str]:
    items = dashboard.browser.find_elements(By.CSS_SELECTOR, "#queue li .who button.name")
    return [item.text for item in items]


def test_help_queue_is_first_come_first_served_and_a_dismissal_reaches_every_dashboard(
    either_storage,
) -> None:
    dashboard = either_storage
    dashboard.open()
    for student_id, name in (("bob", "Bob"), ("ada", "Ada"), ("cy", "Cy")):
        dashboard.post(hand(student_id, name))  # one POST each: three receive times
    dashboard.post(hand("ada", "Ada"))  # a heartbeat keeps Ada's place
    first = dashboard.browser.current_window_handle
    assert dashboard.wait(lambda: queue_names(dashboard) == ["Bob", "Ada", "Cy"])
    wait = lambda: dashboard.element("#queue li .wait").text  # noqa: E731
    shown = dashboard.wait(wait)
    assert re.fullmatch(r"\d+:\d\d", shown)
    assert dashboard.wait(lambda: wait() != shown)  # it ticks
    dashboard.browser.switch_to.new_window("window")
    second = dashboard.browser.current_window_handle
    dashboard.open()
    assert dashboard.wait(lambda: queue_names(dashboard) == ["Bob", "Ada", "Cy"])
    dashboard.browser.switch_to.window(first)
    dashboard.click('#queue li[data-student-id="bob"] button.on-my-way')
    dashboard.click('#queue li[data-student-id="ada"] button.dismiss')
    assert dashboard.wait(lambda: queue_names(dashboard) == ["Bob", "Cy"])
    dashboard.browser.switch_to.window(second)
    assert dashboard.wait(lambda: queue_names(dashboard) == ["Bob", "Cy"])
    bob = dashboard.element('#queue li[data-student-id="bob"]')
    assert dashboard.wait(lambda: "on the way" in bob.text)
    dashboard.open()  # a reload agrees
    assert dashboard.wait(lambda: queue_names(dashboard) == ["Bob", "Cy"])
    dashboard.browser.find_element(By.TAG_NAME, "body").send_keys("h")
    focused = dashboard.browser.switch_to.active_element
    assert focused.text == "Bob"  # H: the oldest raised hand


def test_a_hand_shows_the_cell_last_run_though_beats_carry_none(dashboard) -> None:
    dashboard.open()
    dashboard.post(hand("ada", "Ada", event_type="cell_executed", cell_index=4, status="error"))
    dashboard.post(hand("ada", "Ada", cell_index=None))  # a beat: a notebook, no cell
    where = lambda: dashboard.element('#queue li[data-student-id="ada"] .where').text  # noqa: E731
    assert dashboard.wait(lambda: where() == "[4] lists.ipynb")
    dashboard.post(hand("ada", "Ada", event_type="notebook_saved", cell_index=None))
    dashboard.open()  # a reload agrees
    assert dashboard.wait(lambda: where() == "[4] lists.ipynb")


def test_where_the_class_is_stuck_names_the_cell_and_its_students(either_storage) -> None:
    dashboard = either_storage
    name_error = "\x1b[0;31mNameError\x1b[0m: name 'x' is not defined"
    dashboard.post(
        *[camel_case_run(f"s{n}@uni.edu", f"Student {n}", "A", "uuid-loop", 4, name_error)
          for n in range(3)],
        camel_case_run("s3@uni.edu", "Student 3", "B", "uuid-loop", 4, "TypeError: bad operand"),
        camel_case_run("s4@uni.edu", "Student 4", "B", "uuid-loop", 4),
    )  # fmt: skip
    dashboard.open()
    cell = dashboard.element("#stuck-cells button.cell-summary")
    assert dashboard.wait(lambda: "4 failing" in cell.text)
    assert "[4] loops.ipynb" in cell.text and "5 ran" in cell.text
    assert "3 × NameError: name 'x' is not defined" in cell.text
    assert "uuid-loop" not in cell.text and "[0;31m" not in cell.text
    cell.click()
    panel = dashboard.element("#cell-panel")
    dashboard.wait(panel.is_displayed)
    failing = "#cell-students li.group.error button.pick"
    students = dashboard.wait(lambda: panel.find_elements(By.CSS_SELECTOR, failing))
    names = sorted(button.get_attribute("data-student-id") for button in students)
    assert names == ["s0@uni.edu", "s1@uni.edu", "s2@uni.edu", "s3@uni.edu"]
    dashboard.browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    dashboard.wait(lambda: not panel.is_displayed())


def test_a_students_timeline_pages_back_on_demand(dashboard) -> None:
    runs = [execution("ada", "ok", student_name="Ada", source=f"step({n})", cell_index=n)
            for n in range(54)]  # fmt: skip
    runs.append(execution("ada", "error", source="1/0", cell_index=54, duration_ms=7,
                          error={"ename": "ZeroDivisionError", "evalue": "division by zero",
                                 "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m"]}))  # fmt: skip
    dashboard.post(*runs, *[execution("bob", "ok", cell_index=n) for n in range(150)])
    dashboard.open()
    feed = lambda: dashboard.browser.find_elements(By.CSS_SELECTOR, "#feed details")  # noqa: E731
    assert dashboard.wait(lambda: len(feed()) == 200)  # drawn over a few frames
    dashboard.click("#feed-older")  # the feed's older events, on demand
    assert dashboard.wait(lambda: len(feed()) == 205)
    dashboard.wait(lambda: not dashboard.element("#feed-older").is_displayed())
    dashboard.student_row("ada").click()
    panel = dashboard.element("#student-panel")
    timeline = lambda: panel.find_elements(By.CSS_SELECTOR, "#timeline > li")  # noqa: E731
    assert len(dashboard.wait(timeline)) == 50
    newest = timeline()[0]
    assert "1/0" in newest.text and "ZeroDivisionError: division by zero" in newest.text
    assert (
        "7 ms" in newest.text and "[54] week1.ipynb" in newest.text and "[0;31m" not in newest.text
    )
    facts = dashboard.element("#student-facts").text
    assert "55 runs, 1 errors" in facts and "[54] week1.ipynb" in facts
    older = dashboard.element("#timeline-older")
    older.click()
    assert dashboard.wait(lambda: len(timeline()) == 55)
    assert "step(0)" in timeline()[-1].text
    dashboard.wait(lambda: not older.is_displayed())  # nothing older left
    [live] = dashboard.post(execution("ada", "ok", source="live()"))
    assert dashboard.wait(lambda: timeline()[0].get_attribute("data-event-id") == str(live))
    dashboard.browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    dashboard.wait(lambda: not panel.is_displayed())


def test_a_cell_over_the_limit_is_stored_cut_and_shown_as_cut(dashboard) -> None:
    # cell-monitor-extension treats a 4xx as final: a refused run would never appear.
    big = {"eventType": "cell_executed", "emailAddress": "ada@uni.edu", "userName": "Ada",
           "notebookPath": "week1.ipynb", "cellIndex": 3, "code": "x = 1\n" * 50_000}  # fmt: skip
    dashboard.post(big)
    dashboard.open()
    dashboard.student_row("ada@uni.edu").click()
    newest = dashboard.wait(
        lambda: dashboard.browser.find_elements(By.CSS_SELECTOR, "#timeline > li")
    )[0]
    assert "x = 1" in newest.text
    assert "only its beginning was kept" in newest.find_element(By.CSS_SELECTOR, ".cut").text


OVERFLOW = """
const width = document.documentElement.clientWidth;
const cut = [...document.querySelectorAll('#feed .type, .path .file')]
  .filter((node) => node.scrollWidth > node.clientWidth + 1).map((node) => node.textContent);
return {page: document.documentElement.scrollWidth - width, cut};
"""


@pytest.mark.parametrize("width", [800, 1400])
def test_page_fits_the_window_without_horizontal_overflow(dashboard, width) -> None:
    long = "a-very-long-student-name-without-any-space-at-all@some.university.example.edu"
    dashboard.post(
        execution(long, "error", student_name=long, team="Team with a long name",
                  notebook_path="course/" * 12 + "lesson_with_long_name.ipynb", cell_index=12),
        hand("ada", "Ada"),
        *[execution(f"s{n}", "error", team=f"T{n % 3}") for n in range(12)],
    )  # fmt: skip
    dashboard.browser.set_window_size(width, 900)
    dashboard.open()
    dashboard.student_row(long)
    dashboard.element("#queue li")
    assert dashboard.wait(lambda: dashboard.browser.execute_script(OVERFLOW)) == {
        "page": 0,
        "cut": [],
    }
    dashboard.student_row(long).click()
    dashboard.element("#timeline > li")
    assert dashboard.browser.execute_script(OVERFLOW) == {"page": 0, "cut": []}


def test_an_open_event_holds_the_feed_until_it_is_closed(dashboard) -> None:
    output = [{"output_type": "stream", "name": "stdout", "text": "d[m] = 1\n"}]
    [first] = dashboard.post(execution("ada", "error", source="print(x)", outputs=output))
    dashboard.open()
    item = dashboard.feed_item(first)
    item.find_element(By.TAG_NAME, "summary").click()
    dashboard.element("pre.code", within=item)
    assert dashboard.element("pre.output", within=item).text == "d[m] = 1"  # raw, never "d] = 1"
    [second] = dashboard.post(execution("grace", "ok"))
    note = dashboard.element("#feed-paused")
    assert dashboard.wait(lambda: note.text == "paused while an event is open: 1 new")
    assert dashboard.feed_items(second) == []
    assert dashboard.browser.find_elements(By.CSS_SELECTOR, "#feed details")[0] == item
    item.find_element(By.TAG_NAME, "summary").click()  # closed: the held event follows
    dashboard.feed_item(second)
    assert not note.is_displayed()


def feed_ids(dashboard: Dashboard) -> list[int]:
    return dashboard.browser.execute_script(
        "return [...document.querySelectorAll('#feed details.event')]"
        ".map((item) => Number(item.dataset.eventId));"
    )


def test_a_reloaded_feed_fills_over_frames_newest_first_with_new_events_on_top(dashboard) -> None:
    history = dashboard.post(*[execution(f"s{n % 40}", "ok", cell_index=n % 9) for n in range(200)])
    # Four times slower, the page fills its feed over many frames, as on a slow laptop.
    dashboard.browser.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": 4})
    dashboard.open()
    arrived = dashboard.post(*[execution("late", "error") for _ in range(3)])
    newest = sorted(history + arrived, reverse=True)[:200]
    assert dashboard.wait(lambda: feed_ids(dashboard) == newest, timeout=60)


def student_ids(dashboard: Dashboard) -> list[str]:
    rows = dashboard.browser.find_elements(By.CSS_SELECTOR, "#students tbody tr[data-student-id]")
    return [row.get_attribute("data-student-id") for row in rows]


def test_students_can_be_searched_sorted_and_filtered_by_team(dashboard) -> None:
    dashboard.post(
        execution("ada@uni.edu", "ok", student_name="Ada", team="Red"),
        *[execution("bob@uni.edu", "error", student_name="Bob", team="Blue") for _ in range(2)],
        execution("cy@uni.edu", "error", student_name="Cy", team="Red"),
    )
    dashboard.open()
    assert dashboard.wait(
        lambda: student_ids(dashboard) == ["ada@uni.edu", "bob@uni.edu", "cy@uni.edu"]
    )
    dashboard.click('#students th[data-sort="errors"] button')
    assert dashboard.wait(
        lambda: student_ids(dashboard) == ["bob@uni.edu", "cy@uni.edu", "ada@uni.edu"]
    )
    dashboard.element("#search").send_keys("CY@")
    assert dashboard.wait(lambda: student_ids(dashboard) == ["cy@uni.edu"])
    dashboard.element("#search").clear()
    dashboard.element("#search").send_keys(" ")  # clear() fires no input event
    dashboard.click('#teams button[data-team="Red"]')
    assert dashboard.wait(lambda: student_ids(dashboard) == ["cy@uni.edu", "ada@uni.edu"])
    red = dashboard.element('#teams button[data-team="Red"]').text
    assert "2 of 2 active" in red and "0 hands" in red and "0 stuck" in red
    export = httpx.get(dashboard.element("#export-students").get_attribute("href"), timeout=10)
    assert export.status_code == 200 and export.text.startswith("\ufeffstudent_id,name,")
    assert export.text.count("\n") == 3  # the header and the team's two students


SCOPED_TOKEN, ADMIN_TOKEN = "lee-secret", "dpo-secret"


def test_a_scoped_dashboard_shows_its_courses_and_drops_an_erased_student(
    start_server, tmp_path, browser
) -> None:
    server = start_server(
        DATABASE_URL=f"sqlite:///{tmp_path / 'scoped.db'}",
        DASHBOARD_TOKENS=f"lee={SCOPED_TOKEN}:cs101+ds200",
        ADMIN_TOKENS=f"dpo={ADMIN_TOKEN}",
    )
    page = Dashboard(browser, server)
    ada_ids = page.post(execution("ada", "error"), hand("ada", "Ada"))
    page.post(execution("bo", "ok", course_id="ds200"), execution("eve", "ok", course_id="ma300"))
    # A bookmark of a course outside the token's is dropped, not asked for.
    browser.get(server.url + f"/?course_id=ma300#token={SCOPED_TOKEN}")
    page.wait_for_connection("live")
    page.student_row("bo")
    page.element('#queue [data-student-id="ada"]')
    options = [o.get_attribute("value") for o in page.element("#filter-course").find_elements(
        By.TAG_NAME, "option")]  # fmt: skip
    assert options == ["", "cs101", "ds200"] and "ma300" not in browser.current_url
    assert not browser.find_elements(By.CSS_SELECTOR, '#students tr[data-student-id="eve"]')
    page.click('#students tr[data-student-id="ada"]')
    page.wait(lambda: page.element("#student-panel").is_displayed())
    page.feed_item(ada_ids[0])
    erased = httpx.delete(
        f"{server.url}/api/v1/students/ada", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert erased.status_code == 200, erased.text

    def nothing_of_ada_left() -> bool:
        selectors = ['[data-student-id="ada"]', *(f'[data-event-id="{i}"]' for i in ada_ids)]
        found = [browser.find_elements(By.CSS_SELECTOR, selector) for selector in selectors]
        return not any(found) and not page.element("#student-panel").is_displayed()

    page.wait(nothing_of_ada_left)
    page.wait_for_connection("live")
    assert "ada" not in page.element("#students").text
    page.student_row("bo")
