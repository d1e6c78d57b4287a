"""app.json, Heroku's deploy button, declares only what the service reads, and starts it closed."""

import json
from dataclasses import fields

import pytest

from telemetry.config import Settings, load_settings
from tests.conftest import REPO

APP = json.loads((REPO / "app.json").read_text())
# Set by Heroku's add-ons, not by app.json: the service reads them all the same.
FROM_ADDONS = {"DATABASE_URL", "REDIS_URL"}


def test_every_variable_app_json_sets_is_one_the_service_reads() -> None:
    read = {field.name.upper() for field in fields(Settings)}
    assert set(APP["env"]) <= read, set(APP["env"]) - read
    assert FROM_ADDONS <= read


def test_the_addons_give_postgresql_and_redis() -> None:
    plans = [addon["plan"].split(":")[0] for addon in APP["addons"]]
    assert plans == ["heroku-postgresql", "heroku-redis"]


@pytest.mark.parametrize("name", ["INGEST_TOKENS", "DASHBOARD_TOKENS", "ADMIN_TOKENS"])
def test_tokens_are_generated_secrets_so_a_new_app_never_starts_open(name: str) -> None:
    assert APP["env"][name]["generator"] == "secret"


def test_the_values_app_json_sets_are_valid_settings() -> None:
    given = {name: spec["value"] for name, spec in APP["env"].items() if "value" in spec}
    secrets = {name: "f" * 64 for name, spec in APP["env"].items() if "generator" in spec}
    addons = {"DATABASE_URL": "postgres://u:p@db.example:5432/d", "REDIS_URL": "rediss://r:6379"}
    settings = load_settings({**given, **secrets, **addons})
    assert settings.web_concurrency == int(given["WEB_CONCURRENCY"])
    assert len(settings.dashboard_tokens) == 1 and settings.ingest_tokens[0].secret == "f" * 64
