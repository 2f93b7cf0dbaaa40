"""Crash-test harness: the real daemon as a subprocess, the vendor fakes in the test process.

The fakes (Telegram, Replicate, fal) run in the test's event loop, so everything they saw
survives any number of daemon restarts, exactly as the real services would. The daemon is
`python -m imagebot --config <toml>` with its secrets in the environment, its stdout and stderr
appended to one log file under tmp_path (a pipe could fill up and block it). The daemon listens
on ports the OS picks at each start (port 0), read back from its log (`starting` names the ops
address, `webhook_listening` the webhook port); its public webhook URL is a FrontDoor that holds
its own port for the Daemon's life and forwards to the current run (Telegram's webhook URL does
not change when the bot restarts). Readiness is GET /healthz = 200 on the ops port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests import storeview
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.front_door import FrontDoor
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import is_pg
from tests.support import deep_merge, toml_dumps

REPO = Path(__file__).resolve().parents[1]
WEBHOOK_PATH = "/telegram/webhook"
READY_WITHIN_S = 20.0
FINAL_STATUSES = ("succeeded", "failed", "canceled")


def connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db_path), timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def exists(db_path: Path | str) -> bool:
    """Whether the daemon's store exists yet (a PostgreSQL database always does)."""
    return is_pg(db_path) or Path(db_path).exists()


def query(db_path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of one query on the daemon's database (it may be running: WAL lets us read)."""
    if is_pg(db_path):
        return storeview.query(db_path, sql, params)
    conn = connect(Path(db_path))
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def write(db_path: Path | str, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
    """Write statements in one BEGIN IMMEDIATE transaction (a deferred one that has to upgrade
    may fail at once with "database is locked" under WAL); returns the rows each changed or
    the last inserted id for an INSERT. Call it through asyncio.to_thread while a bot runs in
    this event loop: its busy wait must not block the loop the bot needs to commit."""
    if is_pg(db_path):
        from imagebot.store.postgresql import PgConn
        from imagebot.store.postgresql import connect as pg_connect

        with pg_connect(str(db_path)) as raw, raw.transaction():
            pg = PgConn(raw, frozenset({"jobs", "star_orders", "credit_ledger"}))
            out = []
            for sql, params in statements:
                cursor = pg.execute(sql, params)
                is_insert = sql.lstrip().upper().startswith("INSERT")
                out.append(cursor.lastrowid if is_insert else cursor.rowcount)
            return [r or 0 for r in out]
    conn = sqlite3.connect(str(db_path), timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = []
        try:
            for sql, params in statements:
                cursor = conn.execute(sql, params)
                is_insert = sql.lstrip().upper().startswith("INSERT")
                results.append(cursor.lastrowid if is_insert else cursor.rowcount)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return [r or 0 for r in results]
    finally:
        conn.close()


def integrity(db_path: Path | str) -> str:
    """PRAGMA integrity_check of the database file, as the sqlite3 module sees it (on
    PostgreSQL: "ok" when the server answers; the server checks its own pages)."""
    if is_pg(db_path):
        return "ok" if storeview.query(db_path, "SELECT 1 AS one")[0]["one"] == 1 else "no"
    conn = connect(Path(db_path))
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)
    finally:
        conn.close()


class Daemon:
    """One imagebot installation (config, database, ports) that can be started many times."""

    def __init__(
        self,
        tmp_path: Path,
        telegram: FakeTelegram,
        replicate: FakeReplicate,
        fal: FakeFal,
        *,
        mode: str = "webhook",
        database: str | None = None,
        **sections: Any,
    ) -> None:
        self.dir = tmp_path
        self.telegram = telegram
        self.replicate = replicate
        self.fal = fal
        self.mode = mode
        # the public webhook URL: forwards to whatever port the current run listens on
        self.front_door = FrontDoor(lambda: self.webhook_port)
        self._run_log_offset = 0  # where the current run's lines begin in log_path
        self._ports: dict[str, int] = {}  # of the current run, once its log named them
        # the store: a SQLite file (a Path) or, with --store postgresql, a database URL
        self.db_path: Any = database if is_pg(database) else tmp_path / "imagebot.db"
        self.results_dir = tmp_path / "results"
        self.config_path = tmp_path / "imagebot.toml"
        self.log_path = tmp_path / "imagebot.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0
        # True: the daemon writes its log into a pipe that the test copies to log_path (a
        # file-size limit set on the daemon, see test_db_faults.py, must not hit its log)
        self.pipe_logs = False
        self._log_copier: asyncio.Task[None] | None = None
        self.config = deep_merge(self._base_config(), sections)
        self.config_path.write_text(toml_dumps(self.config), encoding="utf-8")

    def _base_config(self) -> dict[str, Any]:
        return {
            "telegram": {
                "mode": self.mode,
                "api_base_url": self.telegram.url,
                "poll_timeout_s": 1,
                "rate_per_chat_per_s": 30,
                "rate_group_per_min": 600,
                "rate_overall_per_s": 200,
                "request_timeout_s": 10,
            },
            "webhook": {
                "listen": "127.0.0.1",
                "port": 0,
                "url": f"{self.front_door.url}{WEBHOOK_PATH}",
                "path": WEBHOOK_PATH,
            },
            "ops": {"listen": "127.0.0.1", "port": 0},
            "storage": {"database": str(self.db_path), "results_dir": str(self.results_dir)},
            "access": {"open": True},
            "limits": {"rate_per_minute": 1000},
            "runner": {"retry_base_s": 0.05, "retry_max_s": 0.2},
            "generate": {"daily_cap": 10000, "timeout_s": 120},
            "edit": {"daily_cap": 10000, "timeout_s": 120},
            "replicate": {"base_url": self.replicate.url, "poll_interval_s": 0.05},
            "fal": {"base_url": self.fal.url, "poll_interval_s": 0.05},
            "media": {
                "allowed_hosts": ["127.0.0.1"],
                "allowed_private_networks": ["127.0.0.1/32"],
            },
            "progress": {"edit_interval_s": 1, "queue_refresh_s": 1},
            "logs": {"format": "json", "level": "INFO"},
            # On PostgreSQL a killed run's jobs are taken over once its heartbeat is a lease
            # old (a restart cannot tell a dead process from a live one on another host):
            # short, so a restart after kill -9 resumes them within seconds, not 30.
            "cluster": {"lease_s": 6, "heartbeat_s": 1},
        }

    # -- process ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("IMAGEBOT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        env.update(
            TELEGRAM_BOT_TOKEN=BOT_TOKEN,
            REPLICATE_API_TOKEN=REPLICATE_TOKEN,
            FAL_KEY=FAL_KEY,
            IMAGEBOT_WEBHOOK_SECRET=WEBHOOK_SECRET,
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _port(self, name: str) -> int | None:
        """The current run's `name` port ("ops" or "webhook") as its log says; None while the
        daemon is down or has not logged it yet."""
        if not self.running:
            return None
        if name not in self._ports:
            with self.log_path.open("rb") as log:
                log.seek(self._run_log_offset)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == "starting":
                        self._ports["ops"] = int(str(entry["ops"]).rsplit(":", 1)[1])
                    elif entry.get("event") == "webhook_listening":
                        self._ports["webhook"] = int(entry["port"])
        return self._ports.get(name)

    @property
    def ops_port(self) -> int | None:
        return self._port("ops")

    @property
    def webhook_port(self) -> int | None:
        return self._port("webhook")

    async def start(self, *, wait: bool = True) -> None:
        """Start the daemon; with `wait`, return once /healthz says it is ready."""
        assert not self.running, "the daemon is already running"
        await self.front_door.start()
        self.starts += 1
        self._ports = {}
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self._run_log_offset = log.tell()
            if self.pipe_logs:
                await self._start_piped()
                if wait:
                    await self.wait_ready()
                return
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "imagebot",
                "--config",
                str(self.config_path),
                cwd=str(self.dir),
                env=self._env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if wait:
            await self.wait_ready()

    async def _start_piped(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "imagebot",
            "--config",
            str(self.config_path),
            cwd=str(self.dir),
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        self._log_copier = asyncio.create_task(self._copy_log(self.proc.stdout))

    async def _copy_log(self, stream: asyncio.StreamReader) -> None:
        with self.log_path.open("ab") as log:
            while chunk := await stream.read(65536):
                log.write(chunk)
                log.flush()

    async def healthy(self) -> bool:
        if self.ops_port is None:
            return False
        url = f"http://127.0.0.1:{self.ops_port}/healthz"
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def ops_get(self, path: str) -> tuple[int, Any]:
        """GET a path of the ops server: (status, JSON body)."""
        port = self.ops_port
        assert port is not None, f"the daemon has no ops port now:\n{self.log_tail()}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as resp,
        ):
            return resp.status, await resp.json()

    async def wait_ready(self, within: float = READY_WITHIN_S) -> None:
        deadline = time.monotonic() + within
        while True:
            if not self.running:
                raise AssertionError(f"the daemon exited during start-up:\n{self.log_tail()}")
            if await self.healthy():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready within {within} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """kill -9, and wait for the process to be gone."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.kills += 1

    async def terminate(
        self, within: float = 45.0, sig: signal.Signals = signal.SIGTERM
    ) -> tuple[int, float]:
        """SIGTERM (what `systemctl stop` sends) or `sig`; return (exit code, seconds)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            await self.kill()
            tail = self.log_tail()
            raise AssertionError(f"no exit within {within} s of {sig.name}:\n{tail}") from None
        return code, time.monotonic() - started

    async def close(self) -> None:
        """Test teardown: whatever state the daemon is in, it is gone afterwards."""
        if self.running:
            await self.kill()
        if self._log_copier is not None:
            await asyncio.wait_for(self._log_copier, 10)
            self._log_copier = None
        await self.front_door.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line (of every run) whose event is `event`."""
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == event:
                    found.append(entry)
        return found

    # -- store -----------------------------------------------------------------------------

    def jobs(self) -> list[Any]:
        if not exists(self.db_path):
            return []
        try:
            return query(self.db_path, "SELECT * FROM jobs ORDER BY id")
        except Exception as exc:  # PostgreSQL before the first start made the tables
            if is_pg(self.db_path) and "does not exist" in str(exc):
                return []
            raise

    def job(self, job_id: int) -> sqlite3.Row:
        (row,) = query(self.db_path, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        return row

    def all_final(self) -> bool:
        return all(row["status"] in FINAL_STATUSES for row in self.jobs())

    async def wait_jobs(self, predicate: Any, within: float = 20.0) -> None:
        """Bounded poll of the jobs table until `predicate(rows)` holds."""
        await wait_until(lambda: predicate(self.jobs()), within=within, interval=0.05)


def count_by(items: Iterator[str] | list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return dict(sorted(counts.items()))


MakeDaemon = Callable[..., Daemon]


# -- one-shot runs of the CLI (start-up errors, store commands) -----------------------------


def environment(tmp_path: Path, telegram_url: str, **settings: str) -> dict[str, str]:
    """The process environment: no inherited IMAGEBOT_* settings, local providers, the bot
    token, a database under tmp_path, an OS-picked ops port; `settings` override."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    for secret in ("REPLICATE_API_TOKEN", "FAL_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        env.pop(secret, None)
    env.update(
        TELEGRAM_BOT_TOKEN=BOT_TOKEN,
        IMAGEBOT_WEBHOOK_SECRET=WEBHOOK_SECRET,
        IMAGEBOT_GENERATE__PROVIDER="local",
        IMAGEBOT_EDIT__PROVIDER="local",
        IMAGEBOT_TELEGRAM__API_BASE_URL=telegram_url,
        IMAGEBOT_STORAGE__DATABASE=str(tmp_path / "data" / "imagebot.db"),
        IMAGEBOT_OPS__LISTEN="127.0.0.1",
        IMAGEBOT_OPS__PORT="0",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(settings)
    return env


def only_line(stderr: str) -> str:
    """The one line on stderr (asserts there is exactly one)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def run_imagebot(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`python -m imagebot <args>` in tmp_path with `env`, JSON logs, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "imagebot", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
        cwd=tmp_path,  # no config.toml there
        env=env,
    )
