"""What an operator sees when the database named by DATABASE_URL is not there."""

import pytest

from tests.conftest import postgres_url


@pytest.mark.parametrize(
    "database_url",
    [
        postgres_url("telemetry_no_such_database"),
        "postgresql://postgres@127.0.0.1:1/telemetry",
    ],
)
def test_an_unusable_database_is_one_line_naming_database_url(start_server, database_url):
    with pytest.raises(RuntimeError) as exited:
        start_server(DATABASE_URL=database_url)
    log = str(exited.value)
    assert "Traceback" not in log
    [line] = [line for line in log.splitlines() if "DATABASE_URL" in line]
    assert line.startswith("ERROR:") and database_url.split("@")[1] in line
