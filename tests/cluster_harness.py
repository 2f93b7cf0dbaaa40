"""Several real `imagebot` processes on one PostgreSQL database, the fakes in the test process.

A `Cluster` is N `Daemon`s (tests/crash_harness.py) that share one `storage.database` URL and
one configuration apart from their listen ports (port 0, read back from each log) and their
results directories. In webhook mode Telegram's webhook URL, and the completion-hint URL the
vendors call, is a `Balancer`: a round-robin reverse proxy in front of the daemons' webhook
ports, as nginx would be (`proxy_next_upstream error timeout http_502 http_503 http_504`, one
failure takes an upstream out for `fail_timeout_s`). An update counts as acknowledged only when
the fake Telegram got a 2xx for it, whichever daemon answered.

Helpers kill (SIGKILL), freeze (SIGSTOP) and thaw (SIGCONT) one daemon; read the shared store
through tests/storeview.py; and count what the fakes saw: vendor creates per prompt, the peak of
concurrently open predictions, photos delivered per prompt (duplicates included). Cluster
settings (`[cluster] lease_s`, `heartbeat_s`) are written only when imagebot's Settings know the
section, so the harness runs against any state of the cluster core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from imagebot.config import Settings
from tests import storeview
from tests.crash_harness import FINAL_STATUSES, WEBHOOK_PATH, Daemon, count_by
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import deep_merge, toml_dumps

LEASE_S = 6.0  # cluster.lease_s in these tests: a dead node is noticed within seconds
HEARTBEAT_S = 1.0
# Answers that make the balancer try the next daemon (nginx's proxy_next_upstream set).
RETRY_STATUSES = frozenset({0, 502, 503, 504})
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}
)


def cluster_supported() -> bool:
    """Whether this imagebot has the `[cluster]` settings (the cluster core landed)."""
    return "cluster" in Settings.model_fields


def cluster_section(**values: Any) -> dict[str, Any]:
    """`{"cluster": {...}}` with the test lease and heartbeat (and `values`), or {} when the
    Settings have no such section yet; only the keys the section knows are kept."""
    if not cluster_supported():
        return {}
    wanted = {"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S, **values}
    annotation = Settings.model_fields["cluster"].annotation
    known = getattr(annotation, "model_fields", None)
    if known is not None:
        wanted = {k: v for k, v in wanted.items() if k in known}
    return {"cluster": wanted}


@dataclass
class Attempt:
    """One request the balancer forwarded to one daemon."""

    path: str
    daemon: int  # index in Cluster.daemons
    status: int  # HTTP status, 0 for a connection error or timeout
    at: float  # time.time() when it was answered


class Balancer:
    """Round-robin reverse proxy on its own loopback port in front of the cluster's daemons.

    A daemon that is down (no port), refuses, times out or answers 502/503/504 is skipped for
    `fail_timeout_s` and the request goes to the next one; when none answers, 502 (Telegram's
    fake then retries later). `prefer(path)` may name the daemons to try first (a test routing
    a completion hint to a particular process)."""

    def __init__(self, ports: Callable[[], Sequence[int | None]]) -> None:
        self.ports = ports
        self.attempt_timeout_s = 3.0
        self.fail_timeout_s = 5.0
        self.prefer: Callable[[str], Sequence[int]] | None = None
        self.attempts: list[Attempt] = []
        self._down_until: dict[int, float] = {}
        self._next = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port: int = self._sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        connector = aiohttp.TCPConnector(limit=200)
        self._session = aiohttp.ClientSession(connector=connector)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._sock.close()

    def order(self, path: str) -> list[int]:
        """The daemons to try for one request: preferred first, then round robin from the
        next in turn; daemons marked down go last (tried only when the others failed)."""
        count = len(self.ports())
        if count == 0:
            return []
        start = self._next % count
        self._next += 1
        turn = [(start + i) % count for i in range(count)]
        preferred = [i for i in (self.prefer(path) if self.prefer else ()) if 0 <= i < count]
        turn = preferred + [i for i in turn if i not in preferred]
        now = time.monotonic()
        up = [i for i in turn if self._down_until.get(i, 0.0) <= now]
        return up + [i for i in turn if i not in up]

    def served(self, path_part: str = WEBHOOK_PATH) -> dict[int, int]:
        """Requests (whose path contains `path_part`) each daemon answered with a 2xx."""
        counts: dict[int, int] = {}
        for a in self.attempts:
            if path_part in a.path and 200 <= a.status < 300:
                counts[a.daemon] = counts.get(a.daemon, 0) + 1
        return counts

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        ports = self.ports()
        for index in self.order(request.path):
            port = ports[index] if index < len(ports) else None
            if port is None or self._session is None:
                continue
            status, answer, kept = 0, b"", {}
            try:
                async with self._session.request(
                    request.method,
                    f"http://127.0.0.1:{port}{request.path_qs}",
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.attempt_timeout_s),
                ) as resp:
                    answer = await resp.read()
                    status = resp.status
                    kept = {
                        k: v
                        for k, v in resp.headers.items()
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
                    }
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = 0
            self.attempts.append(Attempt(request.path, index, status, time.time()))
            if status in RETRY_STATUSES:
                self._down_until[index] = time.monotonic() + self.fail_timeout_s
                continue
            self._down_until.pop(index, None)
            return web.Response(status=status, body=answer, headers=kept)
        return web.Response(status=502)


class Cluster:
    """N daemons on one PostgreSQL database behind one Balancer."""

    def __init__(
        self,
        tmp_path: Path,
        telegram: FakeTelegram,
        replicate: FakeReplicate,
        fal: FakeFal,
        database: str,
        /,
        *,
        size: int = 3,
        mode: str = "webhook",
        cluster: dict[str, Any] | None = None,
        **sections: Any,
    ) -> None:
        assert storeview.is_pg(database), "a cluster needs a PostgreSQL database URL"
        self.telegram = telegram
        self.replicate = replicate
        self.fal = fal
        self.database = database
        self.mode = mode
        self.daemons: list[Daemon] = []
        self.balancer = Balancer(lambda: [d.webhook_port for d in self.daemons])
        self.killed_at: dict[int, float] = {}  # daemon index -> time.time() of its SIGKILL
        self.frozen_at: dict[int, float] = {}
        self.thawed_at: dict[int, float] = {}
        shared = deep_merge(
            {"webhook": {"url": f"{self.balancer.url}{WEBHOOK_PATH}"}},
            cluster_section(**(cluster or {})),
        )
        config = deep_merge(shared, sections)
        for n in range(size):
            node_dir = tmp_path / f"node{n}"
            node_dir.mkdir(parents=True, exist_ok=True)
            daemon = Daemon(node_dir, telegram, replicate, fal, mode=mode, database=database)
            # (not as keyword sections: "telegram", "replicate" and "fal" name the fakes there)
            daemon.config = deep_merge(daemon.config, config)
            daemon.config_path.write_text(toml_dumps(daemon.config), encoding="utf-8")
            self.daemons.append(daemon)

    # -- processes -------------------------------------------------------------------------

    async def start(self, *indexes: int, wait: bool = True) -> None:
        """Start the given daemons (all when none given) at the same time."""
        await self.balancer.start()
        chosen = indexes or tuple(range(len(self.daemons)))
        await asyncio.gather(*(self.daemons[i].start(wait=wait) for i in chosen))

    async def kill(self, index: int) -> float:
        """SIGKILL one daemon; returns the moment (time.time()) it was sent."""
        daemon = self.daemons[index]
        assert daemon.proc is not None
        self.killed_at[index] = time.time()
        await daemon.kill()
        return self.killed_at[index]

    def freeze(self, index: int) -> float:
        """SIGSTOP one daemon (a VM paused, a process swapped out): it holds its sockets and
        its database connections but runs no code until thawed."""
        daemon = self.daemons[index]
        assert daemon.proc is not None and daemon.running
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        self.frozen_at[index] = time.time()
        return self.frozen_at[index]

    def thaw(self, index: int) -> float:
        """SIGCONT a frozen daemon."""
        daemon = self.daemons[index]
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGCONT)
        self.thawed_at[index] = time.time()
        return self.thawed_at[index]

    async def close(self) -> None:
        """Teardown: every daemon gone (a frozen one is killed as it is), the balancer shut."""
        for index, daemon in enumerate(self.daemons):
            if daemon.running and index in self.frozen_at and index not in self.thawed_at:
                with contextlib.suppress(ProcessLookupError):
                    assert daemon.proc is not None
                    os.kill(daemon.proc.pid, signal.SIGCONT)
            await daemon.close()
        await self.balancer.stop()

    def pids(self) -> dict[int, int]:
        """pid -> daemon index, over every daemon started (killed ones included)."""
        return {d.proc.pid: i for i, d in enumerate(self.daemons) if d.proc is not None}

    def logs(self, event: str) -> list[tuple[int, dict[str, Any]]]:
        """(daemon index, entry) of every log line with `event`, over all daemons."""
        return [(i, e) for i, d in enumerate(self.daemons) for e in d.log_events(event)]

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- node{i}:\n{d.log_tail(lines)}" for i, d in enumerate(self.daemons))

    # -- the shared store ------------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return storeview.query(self.database, sql, params)

    def jobs(self) -> list[Any]:
        return self.daemons[0].jobs()

    def has_column(self, table: str, column: str) -> bool:
        rows = self.query(
            "SELECT 1 AS one FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
            (table, column),
        )
        return bool(rows)

    def has_table(self, table: str) -> bool:
        return table in storeview.tables(self.database)

    def node_pid(self, node_id: str | None) -> int | None:
        """The pid of a node id (the nodes table, else `<host>-<pid>-<hex>`)."""
        if not node_id:
            return None
        if self.has_table("nodes"):
            rows = self.query("SELECT pid FROM nodes WHERE id = ?", (node_id,))
            if rows and rows[0]["pid"] is not None:
                return int(rows[0]["pid"])
        parts = node_id.rsplit("-", 2)
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None

    def daemon_of_node(self, node_id: str | None) -> int | None:
        pid = self.node_pid(node_id)
        return None if pid is None else self.pids().get(pid)

    def runner_of(self, job_id: int) -> int | None:
        """The daemon that holds the job: its owner in the store when jobs have owners, else
        the last daemon whose log says it started the job."""
        if self.has_column("jobs", "owner"):
            rows = self.query("SELECT owner FROM jobs WHERE id = ?", (job_id,))
            if rows and rows[0]["owner"]:
                return self.daemon_of_node(str(rows[0]["owner"]))
        found: tuple[str, int] | None = None
        for index, entry in self.logs("job_started"):
            if entry.get("job_id") == job_id:
                stamp = str(entry.get("timestamp", ""))
                if found is None or stamp >= found[0]:
                    found = (stamp, index)
        return None if found is None else found[1]

    def lease_holder(self, name: str) -> int | None:
        """The daemon holding a live lease `name` (the leases table), or None."""
        if not self.has_table("leases"):
            return None
        rows = self.query("SELECT holder FROM leases WHERE name = ?", (name,))
        if not rows or not rows[0]["holder"]:
            return None
        return self.daemon_of_node(str(rows[0]["holder"]))

    async def wait_jobs(self, predicate: Callable[[list[Any]], bool], within: float) -> None:
        await wait_until(lambda: predicate(self.jobs()), within=within, interval=0.1)

    def all_final(self) -> bool:
        return all(r["status"] in FINAL_STATUSES for r in self.jobs())

    # -- what the fakes saw ----------------------------------------------------------------

    def creates_by_prompt(self) -> dict[str, int]:
        """Vendor creates (Replicate) per prompt, refused and faulted ones included."""
        return count_by(
            str(c.params.get("input", {}).get("prompt")) for c in self.replicate.creates
        )

    def photos_by_prompt(self, prompts: Sequence[str]) -> dict[str, int]:
        """Photo messages at Telegram whose caption names each prompt (duplicates counted)."""
        counts = dict.fromkeys(prompts, 0)
        for message in self.telegram.all_sent(include_deleted=True):
            if message.kind not in ("photo", "media_group_photo") or not message.caption:
                continue
            for prompt in prompts:
                if prompt in message.caption:
                    counts[prompt] += 1
        return counts

    def max_open(self) -> int:
        """The most predictions open at the fake vendor at one moment so far."""
        return self.replicate.max_open()
