"""This process among the others on one database (issue 16): its id and roles, its heartbeat,
and the leases that make cluster-wide chores run once.

Every process ("node") writes a heartbeat every `cluster.heartbeat_s` on the database clock;
one silent for `cluster.lease_s` is dead and its work is handed on (ClusterStore.reap). Leases
(`maintenance`, `poller`) are held by one live node at a time and renewed with the heartbeat.
Two rules keep a process that was frozen (SIGSTOP, a VM pause, a long GC) from doing harm when
it wakes:
- trust window: a node whose last heartbeat is older than two thirds of the lease (by its own
  monotonic clock, which keeps counting while it is frozen) is not `trusted`: it holds no
  lease and starts no side effect until a heartbeat succeeds again;
- a heartbeat that finds the node was silent past the lease fails: the node drops everything
  it was running (`on_lost` callbacks; its jobs' fence tokens moved on anyway) and registers
  afresh.

On SQLite there is one process (the file is locked), so it simply holds every lease its roles
allow; the same code runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

from imagebot.config import Settings
from imagebot.logs import get_logger
from imagebot.store.cluster import ClusterStore, Peer, Reaped
from imagebot.store.db import Database, is_storage_fault

log = get_logger(__name__)

MAINTENANCE = "maintenance"  # sweep, prune, reaping, queue refresh, setWebhook, reconciliation
POLLER = "poller"  # getUpdates: Telegram allows one consumer at a time
_TRUST_FRACTION = 2 / 3

LeaseHook = Callable[[str, bool], Awaitable[None]]
LostHook = Callable[[], Awaitable[None]]


def new_node_id() -> str:
    """`<host>-<pid>-<4 hex>`: readable in /healthz and /jobs, new at every start."""
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


class Cluster:
    """This node: registration, heartbeat, leases, peers."""

    def __init__(self, settings: Settings, db: Database, *, node_id: str | None = None) -> None:
        self.settings = settings
        self.config = settings.cluster
        self.db = db
        self.store = ClusterStore(db)
        self.node_id = node_id or new_node_id()
        self.roles = frozenset(self.config.roles)
        self.ops_port: int | None = None
        self._held: dict[str, float] = {}  # lease name -> monotonic time it was last renewed
        self._terms: dict[str, int] = {}
        self._last_beat = 0.0  # monotonic time of the last heartbeat that succeeded
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lease_hooks: list[LeaseHook] = []
        self._lost_hooks: list[LostHook] = []
        self._tick_hooks: list[Callable[[], Awaitable[None]]] = []
        self.started = False

    # -- what this node is ------------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def shared(self) -> bool:
        """Other processes may share the database (PostgreSQL)."""
        return self.db.shared

    def leases_wanted(self) -> list[str]:
        wanted = []
        if self.has_role("maintenance"):
            wanted.append(MAINTENANCE)
        if self.has_role("intake") and self.settings.telegram.mode == "polling":
            wanted.append(POLLER)
        return wanted

    @property
    def trusted(self) -> bool:
        """The last heartbeat is recent enough that no other node can have taken this one's
        work: side effects (vendor calls, sends) may start."""
        window = self.config.lease_s * _TRUST_FRACTION
        return self.started and time.monotonic() - self._last_beat < window

    def holds(self, name: str) -> bool:
        """This node holds lease `name` now (renewed within the trust window)."""
        renewed = self._held.get(name)
        window = self.config.lease_s * _TRUST_FRACTION
        return renewed is not None and time.monotonic() - renewed < window

    def term(self, name: str) -> int | None:
        return self._terms.get(name) if self.holds(name) else None

    # -- hooks ------------------------------------------------------------------------------

    def on_lease(self, hook: LeaseHook) -> None:
        """`hook(name, held)` when this node gains or loses a lease."""
        self._lease_hooks.append(hook)

    def on_lost(self, hook: LostHook) -> None:
        """`hook()` when this node finds it was declared dead: drop every run, write nothing."""
        self._lost_hooks.append(hook)

    def on_tick(self, hook: Callable[[], Awaitable[None]]) -> None:
        """`hook()` after every heartbeat (reaping, adopting orphaned updates, ...)."""
        self._tick_hooks.append(hook)

    # -- life -------------------------------------------------------------------------------

    async def start(self, ops_port: int | None = None) -> None:
        """Register and take the leases this node may hold (first try at once)."""
        self.ops_port = ops_port
        if not self.shared:
            # The file is this process's alone (locked): any other row is a run that died.
            await self.store.forget_others(self.node_id)
        await self._register()
        self.started = True
        log.info(
            "node_started",
            node=self.node_id,
            roles=sorted(self.roles),
            shared_store=self.shared,
            lease_s=self.config.lease_s,
        )
        await self._renew_leases()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cluster")

    async def _register(self) -> None:
        await self.store.register(
            self.node_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            roles=sorted(self.roles),
            ops_port=self.ops_port,
        )
        self._last_beat = time.monotonic()

    async def stop(self) -> None:
        """A clean stop: leases and the node's row go at once, so others need not wait."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.started:
            return
        self.started = False
        for name in list(self._held):
            await self._set_held(name, None)
        try:
            await self.store.remove(self.node_id)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            log.warning("node_remove_failed", node=self.node_id, error=str(exc))
        log.info("node_stopped", node=self.node_id)

    def poke(self) -> None:
        """Run the next heartbeat now (tests, or a lease just resigned elsewhere)."""
        self._wake.set()

    async def _loop(self) -> None:
        interval = self.config.heartbeat_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_storage_fault(exc):
                    log.exception("cluster_tick_failed")
                else:
                    log.warning("heartbeat_failed", node=self.node_id, error=str(exc))

    async def beat(self) -> None:
        """One heartbeat: renew (or find this node was declared dead), renew leases, run the
        tick hooks."""
        alive = await self.store.heartbeat(self.node_id, self.config.lease_s)
        if not alive:
            log.error(
                "node_declared_dead",
                node=self.node_id,
                silent_s=round(time.monotonic() - self._last_beat, 1),
            )
            for name in list(self._held):
                await self._set_held(name, None)
            for hook in self._lost_hooks:
                await hook()
            await self._register()
            log.info("node_rejoined", node=self.node_id)
        else:
            self._last_beat = time.monotonic()
        await self._renew_leases()
        for tick in self._tick_hooks:
            await tick()

    async def _renew_leases(self) -> None:
        for name in self.leases_wanted():
            try:
                term = await self.store.acquire(name, self.node_id, self.config.lease_s)
            except Exception as exc:
                if not is_storage_fault(exc):
                    raise
                log.warning("lease_renew_failed", lease=name, error=str(exc))
                continue
            await self._set_held(name, term)

    async def _set_held(self, name: str, term: int | None) -> None:
        had = name in self._held
        if term is None:
            self._held.pop(name, None)
            self._terms.pop(name, None)
            if had:
                log.info("lease_lost", lease=name, node=self.node_id)
                with contextlib.suppress(Exception):
                    await self.store.resign(name, self.node_id)
                await self._tell(name, held=False)
            return
        self._held[name] = time.monotonic()
        self._terms[name] = term
        if not had:
            log.info("lease_taken", lease=name, node=self.node_id, term=term)
            await self._tell(name, held=True)

    async def _tell(self, name: str, *, held: bool) -> None:
        for hook in self._lease_hooks:
            try:
                await hook(name, held)
            except Exception:
                log.exception("lease_hook_failed", lease=name, held=held)

    # -- reads ------------------------------------------------------------------------------

    async def peers(self) -> list[Peer]:
        return await self.store.peers(self.config.lease_s)

    async def reap(self) -> Reaped:
        """Hand on dead nodes' work (the maintenance leader, every heartbeat; and every node
        once at start-up)."""
        reaped = await self.store.reap(self.config.lease_s)
        if reaped.dead_nodes or reaped.jobs_freed or reaped.holds_released:
            log.warning(
                "nodes_reaped",
                dead=list(reaped.dead_nodes),
                jobs_freed=list(reaped.jobs_freed),
                holds_released=reaped.holds_released,
            )
        return reaped

    async def adopt_updates(self) -> list[int]:
        """Unprocessed updates no live node is handling, now this node's to replay."""
        return await self.store.adopt_updates(self.node_id, self.config.lease_s)
