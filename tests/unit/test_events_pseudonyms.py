import datetime as dt

import pytest

from telemetry.config import ConfigError, Settings, load_settings
from telemetry.events import pseudonym, pseudonymized
from telemetry.ingest import normalise_batch
from tests.pioneer_samples import pioneer_data

SALT = "a-salt-of-twenty-chars"
NOW = dt.datetime(2025, 11, 24, 16, 0, tzinfo=dt.UTC)


def test_the_same_id_and_salt_always_give_the_same_pseudonym() -> None:
    assert pseudonym(SALT, "ada@uni.edu") == pseudonym(SALT, "ada@uni.edu")
    assert len(pseudonym(SALT, "ada@uni.edu")) == 20
    assert int(pseudonym(SALT, "ada@uni.edu"), 16) >= 0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((SALT, "ada@uni.edu"), (SALT + "!", "ada@uni.edu")),
        ((SALT, "ada@uni.edu"), (SALT, "ada@uni.ed")),
        ((SALT, "ada@uni.edu"), (SALT, "Ada@uni.edu")),
    ],
)
def test_other_salts_and_other_ids_give_other_pseudonyms(first, second) -> None:
    assert pseudonym(*first) != pseudonym(*second)


def test_a_pseudonymized_event_keeps_no_raw_id_or_name() -> None:
    envelope = {
        "data": pioneer_data("NotebookSaveEvent", None, 1_764_000_000_000),
        "params": {"student_id": "ada@uni.edu", "student_name": "Ada L", "team": "red"},
        "env": [{"JUPYTERHUB_USER": "ada"}],
    }
    [event] = normalise_batch(envelope, NOW, Settings())
    masked = pseudonymized(event, SALT)
    assert masked["student_id"] == pseudonym(SALT, "ada@uni.edu")
    assert masked["student_name"] is None and masked["team"] == "red"
    assert "ada" not in repr(masked["extra"]).lower().replace(masked["student_id"], "")
    assert masked["extra"]["pioneer"]["params"] == {"team": "red"}
    assert event["student_id"] == "ada@uni.edu"  # the validated event itself is left alone


def test_the_student_variable_cannot_be_kept_from_pioneer_environ_with_pseudonyms() -> None:
    environ = {"PSEUDONYMIZE_SALT": SALT, "PIONEER_ENVIRON_ALLOW": "JUPYTERHUB_USER,LANG"}
    with pytest.raises(ConfigError, match="PIONEER_ENVIRON_ALLOW"):
        load_settings(environ)


def test_a_short_salt_is_refused_as_guessable() -> None:
    with pytest.raises(ConfigError, match="PSEUDONYMIZE_SALT"):
        load_settings({"PSEUDONYMIZE_SALT": "short"})
