"""The cluster core on either store: nodes and heartbeats on the database clock, one lease
holder at a time, a node that was silent past its lease told so, and reaping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from imagebot.cluster import MAINTENANCE, Cluster
from imagebot.config import Settings
from imagebot.store.db import connect_store
from imagebot.store.migrate import migrate
from tests import storeview

LEASE = {"heartbeat_s": 0.3, "lease_s": 0.9}


@asynccontextmanager
async def node(
    settings: Settings, *, roles: list[str] | None = None, start: bool = True
) -> AsyncIterator[Cluster]:
    """A Cluster on its own connection to the test's store, as another process would have."""
    if roles is not None:
        settings = settings.model_copy(
            update={"cluster": settings.cluster.model_copy(update={"roles": roles})}
        )
    db = connect_store(settings.storage.database)
    await db.open()
    await migrate(db)
    cluster = Cluster(settings, db)
    try:
        if start:
            await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
        await db.close()


async def test_one_holder_and_a_clean_stop_hands_the_lease_on(
    make_settings: Callable[..., Settings], pg_url: str
) -> None:
    """Two nodes on PostgreSQL: the first takes the maintenance lease, the second does not
    get it while the first renews, and gets it at its next heartbeat once the first stops
    cleanly (its row goes and its lease expires at once: no wait for the lease to run out)."""
    settings = make_settings(cluster=LEASE, storage={"database": pg_url})
    async with node(settings) as first:
        assert first.holds(MAINTENANCE)
        async with node(settings) as second:
            await second.beat()
            assert not second.holds(MAINTENANCE)
            assert {p.id for p in await second.peers()} == {first.node_id, second.node_id}
            await first.stop()
            await second.beat()
            assert second.holds(MAINTENANCE)
            holders = storeview.query(
                pg_url, "SELECT holder, term FROM leases WHERE name = 'maintenance'"
            )
            assert [(r[0], r[1]) for r in holders] == [(second.node_id, 2)]


async def test_a_silent_node_loses_its_lease_and_is_told_it_was_declared_dead(
    make_settings: Callable[..., Settings], pg_url: str
) -> None:
    """On PostgreSQL, a node that stops beating (frozen) is not trusted once two thirds of
    the lease passed, another node takes the lease after it ran out, and the frozen node's
    next heartbeat fails: its on_lost hooks run (it drops its work) and it registers afresh."""
    settings = make_settings(cluster=LEASE, storage={"database": pg_url})
    lost: list[str] = []
    async with node(settings) as frozen:
        assert frozen._task is not None
        frozen._task.cancel()  # its heartbeat stops, as a SIGSTOP would stop it

        async def on_lost() -> None:
            lost.append(frozen.node_id)

        frozen.on_lost(on_lost)
        async with node(settings, start=False) as other:
            await other.start()
            assert not other.holds(MAINTENANCE)
            await asyncio.sleep(LEASE["lease_s"] + 0.2)
            assert not frozen.trusted and not frozen.holds(MAINTENANCE)
            await other.beat()
            assert other.holds(MAINTENANCE)
            assert [p.id for p in await other.peers()] == [other.node_id]
            await frozen.beat()
            assert lost == [frozen.node_id]
            assert frozen.trusted and not frozen.holds(MAINTENANCE)
            assert {p.id for p in await other.peers()} == {frozen.node_id, other.node_id}


async def test_reap_frees_a_dead_nodes_running_jobs_and_holds(
    make_settings: Callable[..., Settings], store_target: str
) -> None:
    """Jobs a dead node ran lose their owner, their fence token moves on and the rescue is
    counted; a job it created held is released; a live node's jobs are left alone."""
    settings = make_settings(cluster=LEASE)
    async with node(settings) as live:
        rows: list[tuple[Any, ...]] = [
            (1, "running", "submitted", "dead-node", None),
            (2, "queued", "new", "dead-node", "2999-01-01T00:00:00.000Z"),
            (3, "running", "submitted", live.node_id, None),
        ]
        for job_id, status, phase, owner, held in rows:
            storeview.execute(
                store_target,
                "INSERT INTO jobs (id, kind, status, phase, update_id, chat_id, user_id,"
                " chat_type, prompt, provider, params, created_at, updated_at, owner,"
                " held_until) VALUES (?, 'generate', ?, ?, ?, 5, 5, 'private', 'p', 'replicate',"
                " '{}', '2026-12-03T00:00:00.000Z', '2026-12-03T00:00:00.000Z', ?, ?)",
                (job_id, status, phase, 100 + job_id, owner, held),
            )
        reaped = await live.reap()
        assert reaped.jobs_freed == (1,) and reaped.holds_released == 1
        after = storeview.query(
            store_target,
            "SELECT id, owner, lease_token, rescues, held_until FROM jobs ORDER BY id",
        )
        assert [tuple(r) for r in after] == [
            (1, None, 1, 1, None),
            (2, None, 0, 0, None),
            (3, live.node_id, 0, 0, None),
        ]
        assert (await live.reap()).jobs_freed == ()  # nothing twice


async def test_roles_decide_which_leases_a_node_wants(
    make_settings: Callable[..., Settings],
) -> None:
    """A worker-only node never holds the maintenance lease, even alone; the poller lease is
    wanted only by an intake node in polling mode."""
    settings = make_settings(cluster=LEASE)
    async with node(settings, roles=["worker"]) as worker:
        await worker.beat()
        assert not worker.holds(MAINTENANCE) and worker.leases_wanted() == []
    async with node(settings, roles=["intake"]) as intake:
        assert intake.leases_wanted() == ["poller"]  # the fixture's bots poll by default


async def test_a_restart_on_sqlite_takes_over_at_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """On SQLite (one process per file) a new run forgets the previous run's node and leases,
    even unexpired ones a crash left: it holds the maintenance lease at once and reaping frees
    the previous run's jobs without waiting out the lease."""
    database = str(tmp_path / "one.db")
    settings = make_settings(cluster={"lease_s": 30.0}, storage={"database": database})
    async with node(settings) as crashed:
        assert crashed._task is not None
        crashed._task.cancel()
        crashed.started = False  # gone without a clean stop: its rows stay
        storeview.execute(
            database,
            "INSERT INTO jobs (kind, status, phase, update_id, chat_id, user_id, chat_type,"
            " prompt, provider, params, created_at, updated_at, owner) VALUES ('generate',"
            " 'running', 'submitted', 1, 5, 5, 'private', 'p', 'replicate', '{}',"
            " '2026-12-03T00:00:00.000Z', '2026-12-03T00:00:00.000Z', ?)",
            (crashed.node_id,),
        )
        async with node(settings) as restarted:
            assert restarted.holds(MAINTENANCE)
            assert (await restarted.reap()).jobs_freed == (1,)
