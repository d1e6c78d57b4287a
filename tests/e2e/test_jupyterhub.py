"""The service as a JupyterHub service: a real hub (pip's jupyterhub) with its real proxy
(npm's configurable-http-proxy), started once for the module; instructors sign in with the
hub, and events come in through the hub's proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import REPO, free_port
from tests.e2e.clients import SseClient

CHP = REPO / ".ci" / "node_modules" / ".bin" / "configurable-http-proxy"
PREFIX = "/services/telemetry"
PASSWORD = "instructor-password"  # SharedPasswordAuthenticator: every non-admin user's
ADMIN_PASSWORD = "head-of-school-password-of-32-chars"
INGEST = "ingest-secret"
DASHBOARD = "dash-secret"
GROUPS = {
    "telemetry-cs101": {"users": ["ada", "dee"]},
    "telemetry-ds200": {"users": ["bob"]},
    "lab-assistants": {"users": ["cy"]},  # no course group: reads nothing
}
CHECK_SECONDS = 1  # HUB_CHECK_SECONDS: how soon a revoked session ends

HUB_CONFIG = """
import json
settings = json.loads({settings!r})
c.JupyterHub.bind_url = settings["bind_url"]
c.JupyterHub.hub_bind_url = settings["hub_url"]
c.JupyterHub.db_url = settings["db_url"]
c.JupyterHub.cookie_secret = bytes.fromhex(settings["cookie_secret"])
c.ConfigurableHTTPProxy.command = [settings["chp"]]
c.ConfigurableHTTPProxy.api_url = settings["proxy_api_url"]
c.ConfigurableHTTPProxy.pid_file = settings["proxy_pid_file"]
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = settings["password"]
c.SharedPasswordAuthenticator.admin_password = settings["admin_password"]
c.Authenticator.admin_users = {{"head"}}
c.Authenticator.allow_all = True
c.JupyterHub.redirect_to_server = False  # no notebook server: none could start here
c.JupyterHub.load_groups = settings["groups"]
c.JupyterHub.load_roles = [
    # Every user may reach the service; its group rule decides what they read.
    {{"name": "user", "scopes": ["self", "access:services!service=telemetry"]}},
    {{"name": "e2e", "scopes": ["admin:groups", "tokens", "read:users"], "services": ["e2e"]}},
]
c.JupyterHub.services = [
    {{
        "name": "telemetry",
        "url": settings["service_url"],
        "command": settings["command"],
        "environment": settings["environment"],
        "oauth_no_confirm": True,
    }},
    {{"name": "e2e", "api_token": settings["e2e_token"]}},
]
"""


@dataclass
class Hub:
    url: str
    e2e_token: str
    log_path: Path

    @property
    def service(self) -> str:
        return self.url + PREFIX

    def logs(self) -> str:
        return self.log_path.read_text()

    def api(self, method: str, path: str, **request) -> httpx.Response:
        headers = {"Authorization": f"token {self.e2e_token}"}
        return httpx.request(method, f"{self.url}/hub/api{path}", headers=headers, **request)


def hub_config(directory: Path, port: int, e2e_token: str) -> Path:
    service_port = free_port()
    command = [sys.executable, "-m", "uvicorn", "telemetry:app", "--host", "127.0.0.1",
               "--port", str(service_port), "--app-dir", str(REPO),
               "--timeout-graceful-shutdown", "5"]  # fmt: skip
    settings = {
        "bind_url": f"http://127.0.0.1:{port}",
        "hub_url": f"http://127.0.0.1:{free_port()}",
        "db_url": f"sqlite:///{directory / 'jupyterhub.sqlite'}",
        "cookie_secret": secrets.token_hex(32),
        "chp": str(CHP),
        "proxy_api_url": f"http://127.0.0.1:{free_port()}",
        "proxy_pid_file": str(directory / "proxy.pid"),
        "password": PASSWORD,
        "admin_password": ADMIN_PASSWORD,
        "groups": GROUPS,
        "service_url": f"http://127.0.0.1:{service_port}",
        "command": command,
        "environment": {
            "DATABASE_URL": f"sqlite:///{directory / 'telemetry.db'}",
            "INGEST_TOKENS": INGEST,
            "DASHBOARD_TOKENS": f"lee={DASHBOARD}:cs101",
            "HUB_CHECK_SECONDS": str(CHECK_SECONDS),
        },
        "e2e_token": e2e_token,
    }
    path = directory / "jupyterhub_config.py"
    path.write_text(HUB_CONFIG.format(settings=json.dumps(settings)))
    return path


def wait_until_served(hub: Hub, process: subprocess.Popen, timeout: float = 90.0) -> None:
    """Ready once the proxy routes the service's prefix to a service that answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyterhub exited early:\n{hub.logs()}")
        try:
            if httpx.get(f"{hub.service}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service did not answer through the hub in {timeout} s:\n{hub.logs()}")


def stop(process: subprocess.Popen) -> None:
    # SIGTERM lets the hub stop the proxy and the managed service it started.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    if not CHP.exists():
        pytest.fail(
            f"{CHP} is missing: install it with `npm ci --prefix .ci` (.ci/run does)", pytrace=False
        )
    directory = tmp_path_factory.mktemp("jupyterhub")
    port, e2e_token = free_port(), secrets.token_hex(16)
    config = hub_config(directory, port, e2e_token)
    hub = Hub(f"http://127.0.0.1:{port}", e2e_token, directory / "jupyterhub.log")
    with hub.log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_served(hub, process)
        yield hub
    finally:
        stop(process)


@contextlib.contextmanager
def signed_in(hub: Hub, user: str, password: str = PASSWORD) -> Iterator[Browser]:
    """A client that logged in at the hub's form, then signed in to the service with it."""
    with httpx.Client(base_url=hub.url, follow_redirects=True, timeout=10) as client:
        form = client.get("/hub/login").text
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form).group(1)
        login = {"username": user, "password": password, "_xsrf": xsrf}
        # Not followed: the hub would go on to start a notebook server.
        assert client.post("/hub/login", data=login, follow_redirects=False).status_code == 302
        yield Browser(client, client.get(f"{PREFIX}/oauth_login"))


@dataclass
class Browser:
    client: httpx.Client
    signed_in: httpx.Response  # where the sign-in ended

    def get(self, path: str, **request) -> httpx.Response:
        return self.client.get(PREFIX + path, **request)

    @property
    def session_cookie(self) -> str:
        return f"telemetry_hub={self.client.cookies['telemetry_hub']}"


def post(hub: Hub, *events: dict) -> list[int]:
    response = httpx.post(
        f"{hub.service}/api/v1/events", json=list(events), params={"token": INGEST}, timeout=10
    )
    assert response.status_code == 201, response.text
    return [receipt["id"] for receipt in response.json()["events"]]


def run(student: str, course: str, **fields) -> dict:
    return {"student_id": student, "event_type": "cell_executed", "course_id": course,
            "notebook_path": "week1.ipynb", "status": "ok", **fields}  # fmt: skip


# Run in the dashboard's page: a POST like cell-monitor-extension's from JupyterLab, on the
# hub's origin: no CORS_ORIGINS is configured, and none is needed.
POST_FROM_PAGE = """
const [url, event, done] = arguments;
fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify([event])})
  .then((response) => done(response.status), (error) => done(String(error)));
"""


def student_ids(browser) -> set[str]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#students tr[data-student-id]")
    return {row.get_attribute("data-student-id") for row in rows}


def connection(browser) -> str:
    return browser.find_element(By.ID, "connection").get_attribute("data-state")


def test_an_instructor_signs_in_with_the_hub_and_sees_their_course_live(hub, browser) -> None:
    post(hub, run("ann", "cs101", student_name="Ann"), run("otto", "ds200", student_name="Otto"))
    browser.get(f"{hub.service}/")
    wait = WebDriverWait(browser, 20, 0.05)
    sign_in = wait.until(lambda _: browser.find_element(By.ID, "hub-sign-in"))
    wait.until(lambda _: sign_in.is_displayed())
    sign_in.click()
    # The hub's own login form, then back through its authorize endpoint.
    wait.until(lambda _: browser.find_elements(By.ID, "username_input"))
    browser.find_element(By.ID, "username_input").send_keys("ada")
    browser.find_element(By.ID, "password_input").send_keys(PASSWORD)
    browser.find_element(By.ID, "login_submit").click()
    wait.until(lambda _: connection(browser) == "live")
    assert browser.current_url == f"{hub.service}/"
    wait.until(lambda _: "ann" in student_ids(browser))
    # Through the proxy, from the page's origin, as the extension posts: other course first.
    url = f"{PREFIX}/api/v1/events?token={INGEST}"
    for event in (run("olga", "ds200"), run("anya", "cs101", student_name="Anya")):
        assert browser.execute_async_script(POST_FROM_PAGE, url, event) == 201
    wait.until(lambda _: "anya" in student_ids(browser))
    assert student_ids(browser) == {"ann", "anya"}
    assert "Otto" not in browser.find_element(By.ID, "feed").text


async def test_a_group_member_reads_only_their_course_in_the_api_and_live(hub) -> None:
    post(hub, run("ben", "cs101"), run("bo", "ds200"))
    with signed_in(hub, "ada") as ada:
        assert ada.signed_in.url == f"{hub.service}/"
        session = ada.get("/api/v1/session").json()
        assert (session["token"], session["courses"]) == ("hub:ada", ["cs101"])
        students = ada.get("/api/v1/students").json()["students"]
        assert {student["course_id"] for student in students} == {"cs101"}
        refused = ada.get("/api/v1/events", params={"course_id": "ds200"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "out_of_scope")
        stream = SseClient(hub.service, last_event_id=post(hub, run("ben", "cs101"))[0])
        stream.headers["Cookie"] = ada.session_cookie
    await stream.start()
    try:
        post(hub, run("bo", "ds200"))
        [cs101] = post(hub, run("ben", "cs101"))
        await stream.wait_for_ids([cs101])
    finally:
        await stream.close()
    assert '"token":"hub:ada","courses":["cs101"],"endpoint":"GET /api/v1/stream"' in hub.logs()


def test_a_hub_user_in_no_course_group_is_refused(hub) -> None:
    with signed_in(hub, "cy") as cy:
        assert cy.signed_in.status_code == 403
        assert cy.signed_in.json()["error"]["code"] == "no_course"
        assert "telemetry_hub" not in cy.client.cookies
        refused = cy.get("/api/v1/students")
    assert refused.status_code == 401
    assert refused.headers["link"] == f'<{PREFIX}/oauth_login>; rel="login"'


def test_a_hub_admin_reads_every_course(hub) -> None:
    post(hub, run("ivy", "cs101"), run("ike", "ds200"))
    with signed_in(hub, "head", ADMIN_PASSWORD) as head:
        assert head.get("/api/v1/session").json()["courses"] is None
        students = head.get("/api/v1/students").json()["students"]
    assert {"cs101", "ds200"} <= {student["course_id"] for student in students}


async def open_stream(browser: Browser, hub: Hub) -> SseClient:
    stream = SseClient(hub.service)
    stream.headers["Cookie"] = browser.session_cookie
    return await stream.start()


async def test_leaving_the_group_or_a_revoked_token_ends_the_session_and_its_stream(hub) -> None:
    with signed_in(hub, "bob") as bob, signed_in(hub, "dee") as dee:
        streams = [await open_stream(bob, hub), await open_stream(dee, hub)]
        try:
            removal = {"users": ["bob"]}
            assert hub.api("DELETE", "/groups/telemetry-ds200/users", json=removal).is_success
            token_id = httpx.get(
                f"{hub.url}/hub/api/user",
                headers={"Authorization": f"token {dee.client.cookies['telemetry_hub']}"},
            ).json()["token_id"]
            assert hub.api("DELETE", f"/users/dee/tokens/{token_id}").is_success
            for stream in streams:  # within HUB_CHECK_SECONDS, and a little
                await asyncio.wait_for(stream.ended.wait(), CHECK_SECONDS * 3 + 5)
        finally:
            for stream in streams:
                await stream.close()
        out_of_every_course = bob.get("/api/v1/students")
        assert out_of_every_course.json()["error"]["code"] == "no_course"
        assert out_of_every_course.headers["link"] == f'<{PREFIX}/oauth_login>; rel="login"'
        assert dee.get("/api/v1/students").status_code == 401
    assert hub.api("POST", "/groups/telemetry-ds200/users", json=removal).is_success


def test_dashboard_tokens_keep_working_beside_the_hub_sign_in(hub) -> None:
    headers = {"Authorization": f"Bearer {DASHBOARD}"}
    answer = httpx.get(f"{hub.service}/api/v1/session", headers=headers)
    assert (answer.json()["token"], answer.json()["courses"]) == ("lee", ["cs101"])


def test_ingest_through_the_proxy_keeps_its_token(hub) -> None:
    refused = httpx.post(f"{hub.service}/api/v1/events", json=run("zed", "cs101"))
    assert refused.status_code == 401
    assert post(hub, run("zed", "cs101"))


def test_the_sign_in_checks_its_state_and_the_bare_prefix_redirects(hub) -> None:
    forged = httpx.get(f"{hub.service}/oauth_callback", params={"code": "x", "state": "y"})
    assert (forged.status_code, forged.json()["error"]["code"]) == (400, "oauth_state_mismatch")
    bare = httpx.get(hub.service)
    assert (bare.status_code, bare.headers["location"]) == (308, f"{PREFIX}/")
