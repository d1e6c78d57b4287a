"""Recording dashboards, and a real headless Chromium (Debian's chromedriver) that leaves a
screenshot when a test fails."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.conftest import REDIS_URL, Server
from tests.e2e.clients import StreamRecorder
from tests.e2e.pages import Dashboard

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
def browser_languages() -> str:
    """The browser's languages (navigator.languages): the page's language follows them.
    English unless a test module overrides this fixture."""
    return "en-US,en"


@pytest.fixture
def browser(
    request: pytest.FixtureRequest, tmp_path: Path, browser_languages: str
) -> Iterator[webdriver.Chrome]:
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
    # --lang does not reach navigator.languages in headless Chromium; this preference does.
    options.add_experimental_option("prefs", {"intl.accept_languages": browser_languages})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
        if request.node.stash.get(FAILED, False):
            save_evidence(driver, tmp_path)
        else:
            uncaught = [entry["message"] for entry in driver.get_log("browser")
                        if "Uncaught" in entry["message"]]  # fmt: skip
            assert not uncaught, f"the page threw: {uncaught}"
    finally:
        driver.quit()


def save_evidence(driver: webdriver.Chrome, directory: Path) -> None:
    screenshot = directory / "screenshot.png"
    driver.save_screenshot(str(screenshot))
    console = directory / "browser-console.log"
    console.write_text("\n".join(str(entry) for entry in driver.get_log("browser")))
    print(f"\nscreenshot of the failed test: {screenshot}\nbrowser console: {console}")


@pytest.fixture
async def connect_dashboard() -> AsyncIterator[
    Callable[[StreamRecorder], Awaitable[StreamRecorder]]
]:
    """Connects a recording SSE or WebSocket client, closed after the test:
    `sse = await connect_dashboard(SseClient(url))`."""
    connected: list[StreamRecorder] = []

    async def connect(client: StreamRecorder) -> StreamRecorder:
        connected.append(client)
        return await client.start()

    try:
        yield connect
    finally:
        for client in connected:
            await client.close()


@pytest.fixture
def raw_sse_socket() -> Iterator[Callable[..., socket.socket]]:
    """Dashboards that connect and then never read: their receive window fills up."""
    sockets: list[socket.socket] = []

    def connect(server: Server, receive_buffer: int = 4096) -> socket.socket:
        sock = socket.socket()
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        return sock

    try:
        yield connect
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def production(postgres_database_url, channel, start_server) -> Callable[..., Server]:
    """Start servers as deployed, all on this test's own PostgreSQL database and Redis channel."""
    env = {
        "DATABASE_URL": postgres_database_url,
        "REDIS_URL": REDIS_URL,
        "NOTIFICATION_CHANNEL": channel,
    }
    return lambda **extra: start_server(**env, **extra)


@pytest.fixture
def server(start_server, tmp_path):
    return start_server(DATABASE_URL=f"sqlite:///{tmp_path / 'telemetry.db'}")


@pytest.fixture
def dashboard(browser, server) -> Dashboard:
    """The page against a fresh server on the SQLite default."""
    return Dashboard(browser, server)
