import logging

import pytest

from telemetry import (
    RedactTokens,
    bearer_token,
    envelope_token,
    load_settings,
    origin_allowed,
    token_is_valid,
)

TOKENS = ("old-token", "new-token")
ENVELOPE = {"data": {"eventDetail": {}, "notebookState": {}}}


@pytest.mark.parametrize(
    ("candidate", "valid"),
    [("old-token", True), ("new-token", True), ("new-tokeN", False), ("", False), (None, False),
     ("new-token ", False), ("néw", False)],
)  # fmt: skip
def test_any_configured_token_is_accepted_and_nothing_else(candidate, valid) -> None:
    assert token_is_valid(candidate, TOKENS) is valid


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None),
     ("", None), ("abc", None)],
)  # fmt: skip
def test_bearer_token(header: str, token) -> None:
    assert bearer_token({"authorization": header}) == token


@pytest.mark.parametrize(
    ("body", "token"),
    [(ENVELOPE | {"params": {"token": "t"}}, "t"), (ENVELOPE | {"params": None}, None),
     (ENVELOPE | {"params": {"token": 5}}, None), ({"params": {"token": "t"}}, None),
     ({"data": {}, "params": {"token": "t"}}, None),
     ([ENVELOPE | {"params": {"token": "t"}}], None), ({}, None)],
)  # fmt: skip
def test_token_in_a_pioneer_envelope(body, token) -> None:
    assert envelope_token(body) == token


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "svc.example", (), True),
        ("https://svc.example", "svc.example", (), True),
        ("https://hub.uni.edu", "svc.example", ("https://hub.uni.edu",), True),
        ("https://evil.example", "svc.example", ("https://hub.uni.edu",), False),
        ("https://svc.example.evil", "svc.example", (), False),
    ],
)
def test_websocket_origin_check(origin, host, allowed, ok) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def test_access_log_never_shows_query_tokens() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/api/v1/stream?a=1&token=s3cret&b=2", "1.1", 200), None,
    )  # fmt: skip
    RedactTokens().filter(record)
    assert "s3cret" not in record.getMessage()
    assert "token=REDACTED&b=2" in record.getMessage()


def test_token_lists_come_from_the_environment() -> None:
    settings = load_settings(
        {"INGEST_TOKENS": " a, b ,", "DASHBOARD_TOKENS": "d", "CORS_ORIGINS": "https://x.edu"}
    )
    assert settings.ingest_tokens == ("a", "b")
    assert settings.dashboard_tokens == ("d",)
    assert settings.cors_origins == ("https://x.edu",)
