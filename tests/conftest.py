"""Shared fixtures: fresh databases on the real PostgreSQL, the real Redis, real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def collectable_test_objects() -> Iterator[None]:
    """The app freezes what its start-up built out of the garbage collector's sight; in a test
    process that takes in the tests' objects too, and hypothesis, checking at the session's
    end that a random generator it registers is referenced, cannot see frozen referrers."""
    yield
    gc.unfreeze()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_url(database: str) -> str:
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


# Every test database is a copy of this one, made once per session with schema.sql applied.
TEMPLATE_DATABASE = f"telemetry_template_{uuid.uuid4().hex[:10]}"
template_made = False


async def make_template(admin: asyncpg.Connection) -> None:
    global template_made
    await admin.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
    schema = "\n".join(
        line for line in (REPO / "schema.sql").read_text().splitlines() if not line.startswith("--")
    )
    template = await asyncpg.connect(postgres_url(TEMPLATE_DATABASE))
    try:
        await template.execute(schema)
    finally:
        await template.close()
    template_made = True


@pytest.fixture(scope="session", autouse=True)
def drop_template() -> Iterator[None]:
    yield
    if template_made:
        asyncio.run(drop_database(TEMPLATE_DATABASE))


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new PostgreSQL database with the schema applied, dropped afterwards."""
    name = f"telemetry_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        if not template_made:
            await make_template(admin)
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DATABASE}"')
    finally:
        await admin.close()
    try:
        yield postgres_url(name)
    finally:
        await drop_database(name)


@pytest.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'telemetry.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each storage test runs once on PostgreSQL and once on the SQLite default."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'telemetry.db'}"
    else:
        async with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def channel() -> str:
    """A channel of this test's own, so tests never hear each other's events."""
    return f"telemetry:test:{uuid.uuid4().hex[:10]}"


class Server:
    """A real uvicorn process running telemetry:app on a free loopback port."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Server:
        command = [
            sys.executable, "-m", "uvicorn", "telemetry:app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--app-dir", str(REPO), "--timeout-graceful-shutdown", "5",
        ]  # fmt: skip
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=self.cwd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.wait_until_responds(timeout)
        return self

    def wait_until_responds(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited early:\n{self.log_path.read_text()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"uvicorn did not answer in {timeout} s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def restart(self) -> Server:
        """Stop, then start again on the same port with the same environment and database."""
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start uvicorn servers with the given environment; all are stopped after the test."""
    servers: list[Server] = []

    def start(**env: str) -> Server:
        base = {key: value for key, value in os.environ.items() if key not in ENV_KEYS}
        log_path = tmp_path / f"uvicorn-{len(servers)}.log"
        server = Server({**base, **env}, cwd=tmp_path, log_path=log_path)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


ENV_KEYS = ("DATABASE_URL", "REDIS_URL", "NOTIFICATION_CHANNEL", "WEB_CONCURRENCY")


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll until predicate() is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


class RedisServer:
    """A private redis-server on a free port, for tests that stop, restart or kill it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def cli(self, *args: str) -> str:
        command = ["redis-cli", "-p", str(self.port), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


POSTGRES_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/bin"))


class PostgresServer:
    """A private PostgreSQL cluster on a free port, for tests that stop or restart it.

    initdb refuses to run as root, so the cluster belongs to the postgres user when the
    tests run as root; its directory is made outside pytest's private tmp tree.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="telemetry-pg-"))
        self.data = self.directory / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *command: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, *command], check=True, capture_output=True)

    def init(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        initdb = str(POSTGRES_BIN / "initdb")
        self.run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        pg_ctl, log = str(POSTGRES_BIN / "pg_ctl"), str(self.directory / "postgres.log")
        self.run(pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self.run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init()
    try:
        yield server
    finally:
        server.remove()
