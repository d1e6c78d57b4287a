"""Screenshots of the dashboard with a simulated class, for the README.

    .venv/bin/python bench/screenshots.py            # about 3 minutes
    .venv/bin/python bench/screenshots.py --seconds 30

Starts the service on a temporary SQLite file, lets 30 simulated students in 3 teams post
cell-monitor-extension's camelCase events (bench/dashboard_class.py) in real time, so the
activity chart has a few minutes, then opens the page in Debian's headless Chromium
(`apt-get install -y chromium chromium-driver fonts-noto-cjk`), in English and in Japanese,
and saves PNGs to bench/screenshots/.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from dashboard_class import Classroom  # noqa: E402
from run import uvicorn  # noqa: E402

OUT_DIR = BENCH_DIR / "screenshots"
STUDENTS = 30
ACTIONS_PER_SECOND = 3
CHROMIUM_ARGUMENTS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--disable-background-networking", "--hide-scrollbars",
    "--force-device-scale-factor=1",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(client: httpx.Client, events: list[dict]) -> None:
    if events:
        response = client.post("/api/v1/events", json=events)
        response.raise_for_status()


def simulate(client: httpx.Client, seconds: float) -> Classroom:
    """A class at work for `seconds` of real time: the server stamps what it receives."""
    classroom = Classroom(STUDENTS)
    post(client, classroom.opening())
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        classroom.clock = elapsed
        post(client, [classroom.action() for _ in range(ACTIONS_PER_SECOND)])
        post(client, classroom.heartbeats())
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started - elapsed)))
    return classroom


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    return webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )


def until(browser: webdriver.Chrome, condition, timeout: float = 20.0):
    return WebDriverWait(browser, timeout, 0.1).until(lambda _: condition())


def shoot(browser: webdriver.Chrome, name: str, width: int, height: int) -> None:
    browser.set_window_size(width, height)
    until(browser, lambda: browser.execute_script("return document.readyState") == "complete")
    # Two frames: the page draws its batched updates on the next animation frame.
    browser.execute_async_script(
        "const done = arguments[0];"
        "requestAnimationFrame(() => requestAnimationFrame(() => done()));"
    )
    path = OUT_DIR / f"{name}.png"
    browser.save_screenshot(str(path))
    print(f"{path.relative_to(BENCH_DIR.parent)}: {path.stat().st_size // 1024} KB")


def open_page(browser: webdriver.Chrome, url: str, language: str = "en") -> None:
    browser.get(url)
    browser.execute_script("localStorage.setItem('telemetry.language', arguments[0])", language)
    browser.get(url)
    connection = browser.find_element(By.ID, "connection")
    until(browser, lambda: connection.get_attribute("data-state") == "live")
    until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#stuck-cells li"))
    until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#progress-grid td.square"))


def take(base_url: str) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    browser = chromium()
    try:
        browser.set_window_size(1400, 1000)
        open_page(browser, base_url + "/")
        shoot(browser, "dashboard-1400", 1400, 1000)
        progress = browser.find_element(By.ID, "progress-section")
        browser.execute_script("arguments[0].scrollIntoView()", progress)
        shoot(browser, "dashboard-progress", 1400, 1000)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.find_element(By.CSS_SELECTOR, "#stuck-cells button.cell-summary").click()
        until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#cell-students li"))
        shoot(browser, "dashboard-stuck-cell", 1400, 1000)
        browser.find_element(By.CSS_SELECTOR, "#cell-students button.pick").click()
        until(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#timeline > li")) > 3)
        shoot(browser, "dashboard-student", 1400, 1000)
        open_page(browser, base_url + "/", "ja")
        shoot(browser, "dashboard-ja-1400", 1400, 1000)
        browser.set_window_size(800, 1000)
        open_page(browser, base_url + "/")
        shoot(browser, "dashboard-800", 800, 1400)
        open_page(browser, base_url + "/", "ja")
        shoot(browser, "dashboard-ja-800", 800, 1400)
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="how long the class works")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        env = {"DATABASE_URL": f"sqlite:///{workdir}/telemetry.db", "LOG_LEVEL": "WARNING"}
        with uvicorn("telemetry:app", port, env, Path(workdir) / "uvicorn.log"):
            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url, timeout=10) as client:
                classroom = simulate(client, args.seconds)
                hands = [s for s in classroom.students if s.hand_since is not None]
                if hands:  # one instructor already on the way, as in a real class
                    client.post(f"/api/v1/help/{hands[0].email}/on-my-way", json={"by": "Ms Lee"})
            take(base_url)


if __name__ == "__main__":
    main()
