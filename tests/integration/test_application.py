"""The dashboard's static files: served with a strict policy the page can live under."""

import re

import pytest

from telemetry.application import STATIC_DIR


@pytest.fixture
async def client(api_client, sqlite_database_url: str):
    async with api_client(sqlite_database_url) as client:
        yield client


async def test_page_is_served_with_a_strict_content_security_policy(client) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert '<script type="module" src="static/dashboard.js">' in response.text


SCRIPTS = sorted(STATIC_DIR.rglob("*.js"))
MODULES = [f"/static/{script.relative_to(STATIC_DIR).as_posix()}" for script in SCRIPTS]


@pytest.mark.parametrize(
    ("path", "media_type"),
    [*((module, "text/javascript") for module in MODULES), ("/static/dashboard.css", "text/css")],
)
async def test_script_and_style_are_served_from_static(client, path, media_type) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)


def test_page_has_no_inline_script_or_style_and_never_parses_html() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # every script is a file
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)
    for script in SCRIPTS:
        text = script.read_text()
        assert not re.search(r"\.(innerHTML|outerHTML|insertAdjacentHTML)\b|document\.write", text)
