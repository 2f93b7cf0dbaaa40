"""PostgreSQL restarted under load (`pg_ctl -m immediate`, i.e. a server crash): the bot
answers /healthz 503 while the server is away, reconnects by itself, and loses nothing it
acknowledged; Telegram's webhook retries fill the gap."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import updates
from tests.crash_harness import FINAL_STATUSES, Daemon, count_by, query
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.pgcluster import Cluster, start_cluster

CHATS = (501, 502, 503)


@pytest.fixture
def own_cluster(pg_cluster: Cluster) -> Iterator[Cluster]:
    """A cluster of this test's own (the session's is not restarted under other tests)."""
    cluster = start_cluster()
    assert cluster is not None
    try:
        yield cluster
    finally:
        cluster.destroy()


async def healthz(port: int) -> tuple[int, str]:
    """/healthz's status and body (0 and the error when it did not answer)."""
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return 0, repr(exc)


async def healthz_status(port: int) -> int:
    return (await healthz(port))[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_server_crash_under_load_loses_nothing_acknowledged(
    tmp_path: Path,
    own_cluster: Cluster,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
) -> None:
    """Updates keep coming while PostgreSQL crashes and restarts: /healthz says 503 while it is
    away and 200 after, every update ends acknowledged with exactly one job, every job ends
    final, and no prompt was created at the vendor twice."""
    rng = random.Random(15)
    replicate.latency_s = 0.2
    url = own_cluster.create_db()
    bot = Daemon(tmp_path, telegram, replicate, fal, database=url, runner={"max_running": 4})
    sent: dict[int, str] = {}
    stop = asyncio.Event()

    async def load() -> None:
        for n in range(1, 61):  # bounded: 60 updates, 20 per second
            if stop.is_set():
                return
            chat = rng.choice(CHATS)
            update = updates.command(f"/generate pg {n}", chat_id=chat, user_id=chat)
            sent[update["update_id"]] = f"pg {n}"
            telegram.push_update(update)
            await asyncio.sleep(0.05)

    try:
        await bot.start()
        feeder = asyncio.create_task(load())
        await wait_until(lambda: len(sent) >= 15, within=20)
        await asyncio.to_thread(own_cluster.stop, "immediate")
        statuses: list[int] = []

        async def saw_503() -> bool:
            statuses.append(await healthz_status(bot.ops_port))
            return statuses[-1] == 503

        for _ in range(20):  # bounded poll (each try waits at most ~10 s)
            if await saw_503():
                break
        assert 503 in statuses, statuses
        await asyncio.sleep(1.0)  # the server stays away a while, updates keep arriving
        await asyncio.to_thread(own_cluster.start)
        for _ in range(40):
            status, body = await healthz(bot.ops_port)
            if status == 200:
                break
            await asyncio.sleep(0.25)
        assert status == 200, f"{body}; log: {bot.log_tail(30)}"
        await feeder
        wanted = set(sent)
        await wait_until(lambda: wanted <= telegram.webhook_acked_update_ids, within=60)
        try:
            await bot.wait_jobs(
                lambda rows: (
                    {r["update_id"] for r in rows} >= wanted
                    and all(r["status"] in FINAL_STATUSES for r in rows)
                ),
                within=60,
            )
        except AssertionError:
            rows = bot.jobs()
            open_updates = query(url, "SELECT update_id FROM inbox WHERE processed_at IS NULL")
            states = count_by(f"{r['status']}/{r['phase']}" for r in rows)
            raise AssertionError(
                f"jobs {states}; open updates {[r['update_id'] for r in open_updates]}; "
                f"log: {bot.log_tail(20)}"
            ) from None
        code, _ = await bot.terminate()
    finally:
        stop.set()
        await bot.close()
    assert code == 0
    jobs = bot.jobs()
    per_update = count_by(str(r["update_id"]) for r in jobs)
    assert sorted(int(u) for u in per_update) == sorted(sent)
    assert all(n == 1 for n in per_update.values())
    creates = count_by(str(c.params["input"]["prompt"]) for c in replicate.creates)
    assert all(n == 1 for n in creates.values()), creates
    outcomes = count_by(r["status"] if r["status"] != "failed" else r["error_code"] for r in jobs)
    # A job whose vendor create was in flight when the server died may end as submit_unknown
    # (never resubmitted); every other job succeeds.
    assert set(outcomes) <= {"succeeded", "submit_unknown"}, outcomes
    print("pg restart outcomes:", outcomes, "healthz seen:", statuses)  # noqa: T201


async def test_after_connections_are_cut_one_write_fails_not_one_per_writer(pg_url: str) -> None:
    """The server drops every connection (what a restart does): the write that finds out
    fails, and every writer after it, whatever its lane, checks its own connection first and
    commits; /healthz's write check is back to ok at once (it used to fail once per writer
    connection, each one's first transaction after the restart, seven times in all)."""
    import psycopg

    from imagebot.store.db import INTERACTIVE, NORMAL, PACING, URGENT, Database, is_storage_fault

    db = Database(pg_url)
    await db.open()
    try:
        await db.run(
            lambda conn: conn.execute("CREATE TABLE touched (lane TEXT, n INTEGER)"),
        )
        lanes = {"urgent": URGENT, "interactive": INTERACTIVE, "normal": NORMAL, "pacing": PACING}

        async def write_everywhere(round_: int) -> None:
            for name, priority in lanes.items():
                for _ in range(3):  # round robin: every writer of a lane with several
                    await db.execute_write(
                        "INSERT INTO touched (lane, n) VALUES (?, ?)",
                        (name, round_),
                        priority=priority,
                    )
            await db.write_aside(
                lambda conn: conn.execute("INSERT INTO touched VALUES ('aside', ?)", (round_,))
            )

        await write_everywhere(1)  # every writer has its connection now
        with psycopg.connect(pg_url, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert cut is not None and cut[0] >= 7
        with pytest.raises(Exception) as found:  # noqa: PT011 - what psycopg raises varies
            await db.execute_write("INSERT INTO touched VALUES ('finder', 2)", priority=URGENT)
        assert is_storage_fault(found.value) and not db.writes.ok
        await write_everywhere(2)
        assert db.writes.ok
        rows = await db.fetchall(
            "SELECT lane, count(*) AS n FROM touched WHERE n = 2 GROUP BY lane"
        )
        assert {r["lane"]: r["n"] for r in rows} == {
            "urgent": 3,
            "interactive": 3,
            "normal": 3,
            "pacing": 3,
            "aside": 1,
        }
    finally:
        await db.close()


async def test_a_write_stalled_inside_its_transaction_is_ended_by_the_server(
    pg_url: str,
) -> None:
    """A writer that stops between two statements of a transaction (a frozen process) for
    longer than `stalled_after_s` loses its session: nothing of the transaction is kept, its
    locks are gone at once for everyone else, the failure is a storage fault (retried like a
    restart), and the next write commits on a new connection."""
    import psycopg

    from imagebot.store.db import Database, is_storage_fault

    db = Database(pg_url, stalled_after_s=0.5)
    await db.open()
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE touched (n INTEGER)"))

        def stalls(conn: Any) -> None:
            conn.execute("INSERT INTO touched VALUES (1)")
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('jobs:claim'))")
            time.sleep(1.5)  # the stall: no statement, the transaction open
            conn.execute("INSERT INTO touched VALUES (2)")

        def wait_for_the_lock() -> float:
            """Seconds another session waits for the stalled writer's advisory lock."""
            with psycopg.connect(pg_url, autocommit=True) as other:
                other.execute("SET lock_timeout = '5s'")
                started = time.monotonic()
                other.execute("SELECT pg_advisory_xact_lock(hashtext('jobs:claim'))")
                return time.monotonic() - started

        stalled = asyncio.ensure_future(db.write(stalls))
        held = "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        await wait_until(lambda: bool(query(pg_url, held)), within=5)
        waited_s = await asyncio.to_thread(wait_for_the_lock)
        with pytest.raises(Exception) as found:  # noqa: PT011 - what psycopg raises varies
            await stalled
        assert is_storage_fault(found.value)
        # held until the server ended the session (0.5 s), not until the stall ended (1.5 s)
        assert 0.2 < waited_s < 1.2, waited_s
        await db.execute_write("INSERT INTO touched VALUES (3)")
        rows = await db.fetchall("SELECT n FROM touched ORDER BY n")
        assert [r["n"] for r in rows] == [3]
    finally:
        await db.close()


def test_a_writer_in_backoff_tries_at_once_when_another_has_connected(pg_url: str) -> None:
    """A writer link waiting out its reconnect backoff connects at once when another link of
    the database has connected meanwhile (the server is back): its writes do not keep failing
    for up to two seconds after the server returned."""
    from imagebot.store.db import StoreUnavailable
    from imagebot.store.postgresql import _Breaks, _Link

    with socket.socket() as spare:  # a loopback port nobody listens on: refused at once
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    breaks = _Breaks()
    away = _Link(f"postgresql://postgres@127.0.0.1:{dead_port}/x", "away", breaks)
    back = _Link(pg_url, "back", breaks)
    with pytest.raises(StoreUnavailable, match="unreachable: "):
        away.get()
    with pytest.raises(StoreUnavailable, match=r"\(retrying\)"):
        away.get()  # in its backoff: not even tried
    back.get()  # another writer connected: the server is up
    try:
        with pytest.raises(StoreUnavailable, match="unreachable: "):
            away.get()  # tried again at once (this URL still leads nowhere)
    finally:
        back.drop()
