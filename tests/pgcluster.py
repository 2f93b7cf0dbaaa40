"""A throw-away PostgreSQL cluster for tests and the benchmark (Debian's `postgresql` binaries).

initdb into a temporary directory, `pg_ctl start` on an OS-picked loopback port with the unix
socket in that directory, and always torn down (`stop()`, registered with atexit and on
SIGTERM/SIGINT by the caller's normal interpreter shutdown). The server refuses to run as
root, so as root every command runs through `runuser -u postgres --` and the directory is
handed to `postgres` first (SCALE_OUT.md §6).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN_DIRS = tuple(
    sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
)
ENABLE_HINT = (
    "PostgreSQL half skipped: no PostgreSQL server binaries (initdb, pg_ctl) found; "
    "install them with `apt-get install -y postgresql` to run it"
)


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when the server is not installed."""
    override = os.environ.get("IMAGEBOT_PG_BIN")
    candidates = [Path(override)] if override else list(PG_BIN_DIRS)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


_START_TRIES = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One running server; `url(db)` names a database on it, `create_db()` makes a fresh one."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="imagebot-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "log"
        self.port = 0
        self.running = False
        self._names = itertools.count(1)
        self._as_postgres = os.geteuid() == 0
        atexit.register(self.destroy)

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return [*prefix, *args]

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            self._cmd(*args),
            check=True,
            cwd="/",
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )

    def options(self) -> str:
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            f"-k {self.root}",
            "-c max_connections=200",
        ]
        if not self.durable:
            # Tests only: the cluster is thrown away, so crash safety of the disk is moot.
            opts += ["-c fsync=off", "-c full_page_writes=off"]
        return " ".join(opts)

    def start(self) -> None:
        # PostgreSQL must be told its port before it starts (it cannot bind port 0), so a
        # fresh cluster picks a free one; if something takes it in between, it picks again.
        fresh = not self.port
        for attempt in itertools.count(1):
            if fresh:
                self.port = _free_port()
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    self.options(),
                    "start",
                )
            except subprocess.CalledProcessError:
                if not fresh or attempt >= _START_TRIES:
                    raise
                continue
            break
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        self.running = False
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart_immediate(self) -> None:
        """Crash the server (`-m immediate`: no shutdown checkpoint) and start it again."""
        self.stop("immediate")
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_db(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_db(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.url(), autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(*, durable: bool = False) -> Cluster | None:
    """A started cluster, or None when the binaries are missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return None
    cluster = Cluster(bin_dir, durable=durable)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
