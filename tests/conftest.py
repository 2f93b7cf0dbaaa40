"""Fixtures: vendor fakes on 127.0.0.1, a settings factory, and the real bot running in-process."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog

from imagebot import logs
from imagebot.app import App, build, run
from imagebot.config import Settings
from imagebot.logs import configure_logging
from imagebot.netguard import Resolver, system_resolver
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.pgcluster import ENABLE_HINT, Cluster, find_bin_dir, start_cluster
from tests.support import deep_merge

if TYPE_CHECKING:
    from tests.crash_harness import MakeDaemon

BOT_TOKEN = "123456:TEST-token_abc"
REPLICATE_TOKEN = "r8_test_token"
FAL_KEY = "fal_key_id:fal_key_secret"
WEBHOOK_SECRET = "s3cret-webhook_token"

_SECRET_VARS = (
    "TELEGRAM_BOT_TOKEN",
    "REPLICATE_API_TOKEN",
    "FAL_KEY",
    "IMAGEBOT_WEBHOOK_SECRET",
    "IMAGEBOT_OPS_TOKEN",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "STATE_DIRECTORY",
)


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("IMAGEBOT_TEST_STORE", "sqlite"),
        help="the database the bot runs on in the tests (default: $IMAGEBOT_TEST_STORE, "
        "else sqlite); postgresql starts a throw-away cluster",
    )
    parser.addoption(
        "--store-dependent-only",
        action="store_true",
        help="leave out the tests that ask for PostgreSQL themselves (pg_url, pg_cluster) and"
        " so run the same whatever --store says: .ci/run's second pass, after a first pass ran"
        " them",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"store: {config.getoption('--store')}"


def _needs_postgresql(item: pytest.Item, store: str) -> bool:
    names = getattr(item, "fixturenames", ())
    if "pg_url" in names or "pg_cluster" in names:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "postgresql" in callspec.params.values():
        return True
    return store == "postgresql" and "store_target" in names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without PostgreSQL's server binaries, its half of the suite is left out (one line at
    the end says so and how to enable it), not failed. Tests marked `sqlite_only(reason)`
    (behaviour of SQLite's file alone) are skipped with that reason under --store postgresql."""
    if config.getoption("--store") == "postgresql":
        for item in items:
            mark = item.get_closest_marker("sqlite_only")
            if mark is not None:
                reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "")
                item.add_marker(pytest.mark.skip(reason=f"SQLite only: {reason}"))
    if config.getoption("--store-dependent-only"):
        same_anyway = [item for item in items if _needs_postgresql(item, "sqlite")]
        if same_anyway:
            config.hook.pytest_deselected(items=same_anyway)
            items[:] = [item for item in items if not _needs_postgresql(item, "sqlite")]
    if find_bin_dir() is not None:
        return
    store = config.getoption("--store")
    skipped = [item for item in items if _needs_postgresql(item, store)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not _needs_postgresql(item, store)]
        config.stash[_PG_LEFT_OUT] = len(skipped)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    left_out = config.stash.get(_PG_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"{ENABLE_HINT} ({left_out} tests)", yellow=True)


_PG_LEFT_OUT = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throw-away PostgreSQL server for the session (skips when it is not installed)."""
    cluster = start_cluster()
    if cluster is None:
        pytest.skip(ENABLE_HINT)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh empty database on the session's cluster, dropped after the test."""
    url = pg_cluster.create_db()
    try:
        yield url
    finally:
        pg_cluster.drop_db(url)


@pytest.fixture
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What `storage.database` is in this test: a SQLite file, or (--store postgresql) a
    fresh database's URL."""
    if request.config.getoption("--store") == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "imagebot.db")


@pytest.fixture(autouse=True, scope="session")
def loopback_only() -> Iterator[None]:
    """Safety net: no test may resolve or connect to anything but loopback, not even by
    mistake (a misconfigured test would otherwise try api.telegram.org)."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host):
            raise OSError(f"tests are loopback-only: refused to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"tests are loopback-only: refused to connect to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.getaddrinfo = real_getaddrinfo
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMAGEBOT_* or vendor variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("IMAGEBOT_") or key in _SECRET_VARS:
            monkeypatch.delenv(key, raising=False)
    # As the CLI does: PTB's RetryAfter otherwise warns about its int/timedelta change.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(token=BOT_TOKEN) as fake:
        yield fake


@pytest.fixture
async def replicate() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(token=REPLICATE_TOKEN)
    fake.latency_s = 0.15
    async with fake:
        yield fake


@pytest.fixture
async def fal() -> AsyncIterator[FakeFal]:
    fake = FakeFal(key=FAL_KEY)
    fake.latency_s = 0.15
    async with fake:
        yield fake


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    store_target: str,
) -> SettingsFactory:
    """Settings pointed at the fakes, fast intervals, loopback allowed for media; override any
    section with keyword arguments (`runner={"max_running": 1}`)."""

    def factory(**sections: Any) -> Settings:
        data: dict[str, Any] = {
            "telegram": {
                "api_base_url": telegram.url,
                "poll_timeout_s": 1,
                "rate_per_chat_per_s": 30,
                "rate_group_per_min": 600,
                "rate_overall_per_s": 200,
            },
            "webhook": {"listen": "127.0.0.1", "port": 0, "url": "http://127.0.0.1:9/hook"},
            "ops": {"listen": "127.0.0.1", "port": 0},
            "storage": {
                "database": store_target,
                "results_dir": str(tmp_path / "results"),
            },
            "access": {"open": True},
            "limits": {"rate_per_minute": 100},
            "runner": {"retry_base_s": 0.05, "retry_max_s": 0.2},
            "replicate": {"base_url": replicate.url, "poll_interval_s": 0.05},
            "fal": {"base_url": fal.url, "poll_interval_s": 0.05},
            "media": {
                "allowed_hosts": ["127.0.0.1"],
                "allowed_private_networks": ["127.0.0.1/32"],
            },
            "progress": {"edit_interval_s": 1, "queue_refresh_s": 1},
            "TELEGRAM_BOT_TOKEN": BOT_TOKEN,
            "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
            "FAL_KEY": FAL_KEY,
            "IMAGEBOT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
        return Settings(**deep_merge(data, sections))

    return factory


@asynccontextmanager
async def running(settings: Settings, resolver: Resolver = system_resolver) -> AsyncIterator[App]:
    """The real bot (app.run) in this event loop until the block ends."""
    app = build(settings, resolver=resolver)
    task = asyncio.create_task(run(app))
    try:
        await wait_until(lambda: app.state.ready or task.done(), within=10)
        if task.done():
            task.result()  # raises what made start-up fail
        yield app
    finally:
        app.request_stop("test over")
        await asyncio.wait_for(task, 30)


@pytest.fixture
def bot(make_settings: SettingsFactory) -> Callable[..., Any]:
    """`async with bot(limits={...}) as app:` runs the bot with those overrides."""

    def start(**sections: Any) -> Any:
        return running(make_settings(**sections))

    return start


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every TCP connect the test makes; a connect to anything but loopback fails before a
    packet leaves, so a broken SSRF guard shows up as an assertion, never as traffic."""
    seen: list[Any] = []
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            seen.append(address)
            ip = ipaddress.ip_address(str(address[0]).split("%")[0])
            if not ip.is_loopback:
                raise ConnectionRefusedError(f"test guard: no connecting to {ip}")
        real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The production log pipeline (JSON, DEBUG) into a StringIO, told no secrets to mask, so
    only a token that never reached a log line passes; the previous set-up is put back after."""
    root = logging.getLogger()
    names = ("httpx", "httpcore", "apscheduler", "telegram.Bot", "telegram.ext.Application")
    quiet = {name: logging.getLogger(name).level for name in names}
    saved = (list(root.handlers), root.level, structlog.get_config())
    hooks = (sys.excepthook, threading.excepthook, logs._redactor)
    stream = io.StringIO()
    configure_logging(fmt="json", level="DEBUG", secrets=(), stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
        sys.excepthook, threading.excepthook, logs._redactor = hooks
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
async def daemon(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    store_target: str,
) -> AsyncIterator[MakeDaemon]:
    """`daemon(**sections)` makes a Daemon on the test's store (SQLite, or PostgreSQL with
    --store postgresql); every one is killed at teardown."""
    from tests.crash_harness import Daemon  # here: crash_harness imports this module

    made: list[Daemon] = []

    def make(**sections: Any) -> Daemon:
        made.append(Daemon(tmp_path, telegram, replicate, fal, database=store_target, **sections))
        return made[-1]

    yield make
    for one in made:
        await one.close()
