"""The JupyterHub sign-in's pure parts: the group rule, PKCE, the hub's variables."""

import pytest

from telemetry.config import ConfigError, Grant, load_settings
from telemetry.errors import ApiError
from telemetry.hubauth import course_grant, pkce_challenge

HUB = {
    "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    "JUPYTERHUB_API_TOKEN": "service-secret",
    "JUPYTERHUB_SERVICE_PREFIX": "/services/telemetry/",
}


@pytest.mark.parametrize(
    ("user", "courses"),
    [
        ({"name": "ada", "groups": ["telemetry-cs101"]}, {"cs101"}),
        (
            {"name": "duo", "groups": ["telemetry-cs101", "telemetry-ds200", "tas"]},
            {"cs101", "ds200"},
        ),
        ({"name": "head", "admin": True, "groups": []}, None),
        ({"name": "head", "admin": True, "groups": ["telemetry-cs101"]}, None),
    ],
)
def test_course_groups_and_admins_make_the_grant(user: dict, courses: set | None) -> None:
    grant = course_grant(user, "telemetry-")
    assert grant == Grant(
        f"hub:{user['name']}", "", None if courses is None else frozenset(courses)
    )


@pytest.mark.parametrize("groups", [[], ["tas"], ["telemetry-"], ["cs101-telemetry-x"]])
def test_a_user_in_no_course_group_reads_nothing(groups: list) -> None:
    with pytest.raises(ApiError) as refusal:
        course_grant({"name": "cy", "admin": False, "groups": groups}, "telemetry-")
    assert (refusal.value.status, refusal.value.code) == (403, "no_course")


def test_pkce_challenge_is_rfc_7636s() -> None:  # its appendix B example
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_the_hub_sign_in_is_off_without_the_hubs_variables() -> None:
    settings = load_settings({})
    assert not settings.hub_sign_in and settings.jupyterhub_service_prefix is None


def test_the_hubs_variables_are_read() -> None:
    settings = load_settings({**HUB, "JUPYTERHUB_BASE_URL": "/jhub/", "HUB_CHECK_SECONDS": "5"})
    assert settings.hub_sign_in
    assert settings.jupyterhub_service_prefix == "/services/telemetry"
    assert settings.jupyterhub_base_url == "/jhub/"
    assert (settings.hub_course_group_prefix, settings.hub_check_seconds) == ("telemetry-", 5.0)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({**HUB, "JUPYTERHUB_API_TOKEN": ""}, "JUPYTERHUB_API_TOKEN"),
        ({**HUB, "JUPYTERHUB_SERVICE_PREFIX": ""}, "JUPYTERHUB_SERVICE_PREFIX"),
        ({**HUB, "JUPYTERHUB_SERVICE_PREFIX": "services/telemetry"}, "JUPYTERHUB_SERVICE_PREFIX"),
        ({**HUB, "JUPYTERHUB_API_URL": "127.0.0.1:8081"}, "JUPYTERHUB_API_URL"),
        ({**HUB, "HUB_COURSE_GROUP_PREFIX": "course/"}, "HUB_COURSE_GROUP_PREFIX"),
        ({**HUB, "HUB_CHECK_SECONDS": "0"}, "HUB_CHECK_SECONDS"),
    ],
)
def test_bad_hub_variables_fail_with_the_variable_named(environ: dict, variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ)
