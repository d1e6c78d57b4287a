import pytest

from telemetry.config import (
    ConfigError,
    Settings,
    load_settings,
    normalise_database_url,
    normalise_redis_url,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://u:p@db.example:5432/d1", "postgresql://u:p@db.example:5432/d1"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql://u@h/d"),
        ("postgres://u@h/d?sslmode=require", "postgresql://u@h/d?ssl=require"),
        (
            "postgres://u@h/d?sslmode=require&max_size=3",
            "postgresql://u@h/d?ssl=require&max_size=3",
        ),
        ("sqlite:///data/x.db", "sqlite:///data/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_url_is_normalised_for_databases(raw: str, expected: str) -> None:
    assert normalise_database_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("mysql://u@h/d", "scheme 'mysql'"),
        ("postgres://u@h", "must name a host and a database"),
        ("not a url", "scheme ''"),
    ],
)
def test_bad_database_url_names_the_variable(raw: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL") as error:
        normalise_database_url(raw)
    assert problem in str(error.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("redis://:pw@h:6379/2", "redis://:pw@h:6379/2"),
        ("rediss://:pw@h:6380", "rediss://:pw@h:6380?ssl_cert_reqs=none"),
        ("rediss://h:6380?ssl_cert_reqs=required", "rediss://h:6380?ssl_cert_reqs=required"),
    ],
)
def test_redis_url_skips_certificate_checks_only_for_rediss(raw, expected) -> None:
    assert normalise_redis_url(raw) == expected


@pytest.mark.parametrize("raw", ["http://h:6379", "redis://", "memcached://h"])
def test_bad_redis_url_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        normalise_redis_url(raw)


@pytest.mark.parametrize("environ", [{}, {"DATABASE_URL": " ", "REDIS_URL": ""}])
def test_defaults_need_no_server(environ: dict) -> None:
    settings = load_settings(environ)
    assert settings == Settings()
    assert settings.redis_url is None
    assert settings.database_url.startswith("sqlite")
    assert settings.notification_channel == "telemetry:events"
    assert settings.database_pool_size == 5


def test_environment_overrides_defaults() -> None:
    settings = load_settings(
        {
            "DATABASE_POOL_SIZE": "3",
            "NOTIFICATION_CHANNEL": "course:42",
            "MAX_BATCH_EVENTS": "10",
            "REDIS_URL": "redis://h",
        }
    )
    assert (settings.database_pool_size, settings.notification_channel) == (3, "course:42")
    assert settings.max_batch_events == 10


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"DATABASE_POOL_SIZE": "ten"}, "DATABASE_POOL_SIZE"),
        ({"DATABASE_POOL_SIZE": "0"}, "DATABASE_POOL_SIZE"),
        ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES"),
        ({"WEB_CONCURRENCY": "2"}, "REDIS_URL"),
        ({"RETENTION_DAYS": "0"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "-3"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "1.5"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "a month"}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": "1000000"}, "RETENTION_DAYS"),
    ],
)
def test_bad_numbers_fail_with_the_variable_named(environ: dict, variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ)


def test_several_workers_are_allowed_with_redis() -> None:
    assert load_settings({"WEB_CONCURRENCY": "2", "REDIS_URL": "redis://h"}).redis_url


def test_pioneer_defaults_keep_no_server_variable() -> None:
    settings = load_settings({})
    assert settings.pioneer_student_env == "JUPYTERHUB_USER"
    assert settings.pioneer_environ_allow == frozenset()


@pytest.mark.parametrize(
    ("environ", "student_env", "allow"),
    [
        ({"PIONEER_STUDENT_ENV": " LMS_USER "}, "LMS_USER", frozenset()),
        ({"PIONEER_STUDENT_ENV": ""}, "JUPYTERHUB_USER", frozenset()),
        ({"PIONEER_STUDENT_ENV": " , "}, "JUPYTERHUB_USER", frozenset()),
        ({"PIONEER_ENVIRON_ALLOW": "COURSE"}, "JUPYTERHUB_USER", {"COURSE"}),
        (
            {"PIONEER_ENVIRON_ALLOW": "COURSE, HOME,,LANG "},
            "JUPYTERHUB_USER",
            {"COURSE", "HOME", "LANG"},
        ),
        ({"PIONEER_ENVIRON_ALLOW": " , "}, "JUPYTERHUB_USER", frozenset()),
    ],
)
def test_pioneer_variables_are_read(environ: dict, student_env: str, allow: set) -> None:
    settings = load_settings(environ)
    assert (settings.pioneer_student_env, settings.pioneer_environ_allow) == (student_env, allow)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"PIONEER_STUDENT_ENV": "JUPYTERHUB USER"}, "PIONEER_STUDENT_ENV"),
        ({"PIONEER_STUDENT_ENV": "A,B"}, "PIONEER_STUDENT_ENV"),
        ({"PIONEER_ENVIRON_ALLOW": "HOME;PATH"}, "PIONEER_ENVIRON_ALLOW"),
        ({"PIONEER_ENVIRON_ALLOW": "HOME,1ST"}, "PIONEER_ENVIRON_ALLOW"),
    ],
)
def test_bad_pioneer_variable_names_fail_with_the_variable_named(
    environ: dict, variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ)


def test_retention_and_pseudonyms_are_off_by_default() -> None:
    settings = load_settings({})
    assert (settings.retention_days, settings.pseudonymize_salt) == (None, None)


def test_retention_days_and_salt_are_read() -> None:
    salt = "0123456789abcdef0123"
    settings = load_settings({"RETENTION_DAYS": " 30 ", "PSEUDONYMIZE_SALT": salt})
    assert (settings.retention_days, settings.pseudonymize_salt) == (30, salt)
