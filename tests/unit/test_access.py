import logging

import pytest

from telemetry.access import (
    RedactTokens,
    bearer_token,
    envelope_token,
    matching_secret,
    origin_allowed,
    require_grant,
)
from telemetry.config import ConfigError, Grant, load_settings, parse_tokens, token_fingerprint
from telemetry.errors import ApiError

TOKENS = ("old-token", "new-token")
ENVELOPE = {"data": {"eventDetail": {}, "notebookState": {}}}


@pytest.mark.parametrize(
    ("candidate", "valid"),
    [("old-token", True), ("new-token", True), ("new-tokeN", False), ("", False), (None, False),
     ("new-token ", False), ("néw", False)],
)  # fmt: skip
def test_any_configured_token_is_accepted_and_nothing_else(candidate, valid) -> None:
    assert (matching_secret(candidate, TOKENS) is not None) is valid


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
    assert [grant.secret for grant in settings.ingest_tokens] == ["a", "b"]
    assert settings.dashboard_tokens == (Grant(token_fingerprint("d"), "d"),)
    assert settings.cors_origins == ("https://x.edu",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tok3", [(token_fingerprint("tok3"), "tok3", None)]),
        ("tok1:cs101, tok2:cs101+ds200", [(token_fingerprint("tok1"), "tok1", {"cs101"}),
                                          (token_fingerprint("tok2"), "tok2", {"cs101", "ds200"})]),
        ("lee=s3cret:cs101+ds200", [("lee", "s3cret", {"cs101", "ds200"})]),
        ("lee=s3cret,dpo=other", [("lee", "s3cret", None), ("dpo", "other", None)]),
        ("ops=YWJjZA==", [("ops", "YWJjZA==", None)]),  # base64 padding, once named
        ("a.b@uni-1=x/y+z:CS_1.2026@x-y", [("a.b@uni-1", "x/y+z", {"CS_1.2026@x-y"})]),
        ("", []),
    ],
)  # fmt: skip
def test_token_specs_give_names_secrets_and_courses(raw, expected) -> None:
    grants = parse_tokens("DASHBOARD_TOKENS", raw)
    courses = [None if grant.courses is None else set(grant.courses) for grant in grants]
    assert [(g.name, g.secret, c) for g, c in zip(grants, courses, strict=True)] == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("tok:", "scopes a token to ''"),
        ("tok:cs101+", "scopes a token to ''"),
        ("tok:cs 101", "scopes a token to 'cs 101'"),
        ("tok:cs101;drop", "scopes a token to 'cs101;drop'"),
        ("tok:cs101:ds200", "scopes a token to 'cs101:ds200'"),
        ("lee=", "empty or malformed secret"),
        ("=abc", "empty or malformed secret"),
        ("YWJjZA==", "needs a name first"),
        (":cs101", "empty or malformed secret"),
        ("same,same", "lists a secret twice"),
        ("a=same:cs101,b=same:ds200", "lists a secret twice"),
        ("lee=one,lee=two", "names two tokens 'lee'"),
    ],
)
def test_bad_token_specs_stop_start_up_without_showing_the_secret(raw, problem) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"DASHBOARD_TOKENS": raw})
    assert problem in str(error.value)
    assert "DASHBOARD_TOKENS" in str(error.value)
    assert "same" not in str(error.value) and "YWJjZA" not in str(error.value)


def test_admin_tokens_take_names_but_no_courses() -> None:
    settings = load_settings({"ADMIN_TOKENS": "dpo=s3cret, other"})
    assert [grant.name for grant in settings.admin_tokens] == ["dpo", token_fingerprint("other")]
    assert all(grant.courses is None for grant in settings.admin_tokens)
    with pytest.raises(ConfigError, match="ADMIN_TOKENS entries cannot name courses"):
        load_settings({"ADMIN_TOKENS": "dpo=s3cret:cs101"})


def test_an_unnamed_token_is_named_by_a_fingerprint_that_is_not_the_secret() -> None:
    name = token_fingerprint("dashboard-secret")
    assert name.startswith("sha256:") and "dashboard-secret" not in name
    assert name == token_fingerprint("dashboard-secret") != token_fingerprint("dashboard-secreT")


def test_the_presented_token_finds_its_own_grant() -> None:
    grants = (Grant("a", "one", frozenset({"cs101"})), Grant("b", "two"))
    assert require_grant(grants, [None, "two"], "dashboard") == grants[1]
    assert require_grant(grants, ["one"], "dashboard").courses == {"cs101"}
    for candidates in (["three"], [None], []):
        with pytest.raises(ApiError) as refused:
            require_grant(grants, candidates, "dashboard")
        assert refused.value.status == 401


@pytest.mark.parametrize(
    ("courses", "course_id", "covered"),
    [(None, "cs101", True), (None, None, True), ({"cs101"}, "cs101", True),
     ({"cs101"}, "ds200", False), ({"cs101"}, None, False), ({"cs101"}, "", False)],
)  # fmt: skip
def test_a_scoped_grant_covers_its_courses_only(courses, course_id, covered) -> None:
    grant = Grant("x", "s", None if courses is None else frozenset(courses))
    assert grant.covers(course_id) is covered


def test_an_ingest_token_may_carry_one_course() -> None:
    settings = load_settings({"INGEST_TOKENS": "lab=s3cret:cs101,other"})
    assert [(grant.name, grant.courses) for grant in settings.ingest_tokens] == [
        ("lab", frozenset({"cs101"})),
        (token_fingerprint("other"), None),
    ]
    with pytest.raises(ConfigError, match="INGEST_TOKENS gives 'lab' several courses"):
        load_settings({"INGEST_TOKENS": "lab=s3cret:cs101+ds200"})
