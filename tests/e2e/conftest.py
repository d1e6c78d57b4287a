"""A real headless Chromium, driven by Debian's chromedriver; a screenshot when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

# Debian's packages: selenium-manager must never download a browser or a driver.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_ARGUMENTS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--window-size=1400,1000",
)  # fmt: skip
FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
def browser(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Chromium for one test; on failure its screenshot and console log land in tmp_path."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing: install Debian's packages with "
            "`apt-get install -y chromium chromium-driver` (.ci/run does)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*CHROMIUM_ARGUMENTS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
        if request.node.stash.get(FAILED, False):
            save_evidence(driver, tmp_path)
    finally:
        driver.quit()


def save_evidence(driver: webdriver.Chrome, directory: Path) -> None:
    screenshot = directory / "screenshot.png"
    driver.save_screenshot(str(screenshot))
    console = directory / "browser-console.log"
    console.write_text("\n".join(str(entry) for entry in driver.get_log("browser")))
    print(f"\nscreenshot of the failed test: {screenshot}\nbrowser console: {console}")
