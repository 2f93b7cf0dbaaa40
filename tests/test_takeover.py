"""Jobs across processes (issue 16) on one PostgreSQL database: the global cap measured at the
vendor, takeover of a killed process's jobs by phase, and a frozen process that wakes after
its jobs were taken over. Real bots (in-process and daemon subprocesses) against the fakes;
the three-process round-robin test is tests/test_cluster.py."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from imagebot.store.postgresql import connect
from tests import updates
from tests.conftest import SettingsFactory, running
from tests.crash_harness import Daemon, query
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CHAT = updates.DEFAULT_CHAT_ID
LEASE_S = 6.0
# short leases so takeovers happen within a test; tend (and so the periodic claim) often
CLUSTER = {"lease_s": LEASE_S, "heartbeat_s": 1.0}
FAST_TEND = {"check_interval_s": 0.3}
MakeDaemon = Callable[..., Daemon]


@pytest.fixture
async def daemons(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> AsyncIterator[MakeDaemon]:
    """`daemons("a")` makes a daemon of its own directory on the test's PostgreSQL database,
    polling, with short leases and one results directory for all; all killed at teardown."""
    made: list[Daemon] = []

    def make(name: str, **sections: Any) -> Daemon:
        where = tmp_path / name
        where.mkdir()
        config: dict[str, Any] = {
            "storage": {"results_dir": str(tmp_path / "results")},
            "cluster": CLUSTER,
            "delivery": FAST_TEND,
        }
        config.update(sections)
        made.append(
            Daemon(where, telegram, replicate, fal, mode="polling", database=pg_url, **config)
        )
        return made[-1]

    yield make
    for one in made:
        await one.close()


def jobs(pg_url: str) -> list[Any]:
    return query(pg_url, "SELECT * FROM jobs ORDER BY id")


def running_on(node: str | None, candidates: list[Daemon]) -> Daemon:
    """The daemon whose node id (`<host>-<pid>-<hex>`) is `node`."""
    for one in candidates:
        if node and one.proc is not None and f"-{one.proc.pid}-" in node:
            return one
    raise AssertionError(f"no daemon runs as {node}")


async def wait_rows(pg_url: str, predicate: Callable[[list[Any]], bool], within: float) -> None:
    await wait_until(lambda: predicate(jobs(pg_url)), within=within, interval=0.05)


def chat_snapshot(telegram: FakeTelegram) -> list[tuple[Any, ...]]:
    """What the chat shows: every message with its text and whether it was deleted."""
    return [
        (m.message_id, m.kind, getattr(m, "text", None), m.deleted)
        for m in telegram.messages(CHAT, include_deleted=True)
    ]


async def test_two_bots_share_max_running_exactly(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    pg_url: str,
) -> None:
    """Two bot processes on one database with max_running = 3: twelve requests never have
    more than 3 predictions open at the vendor at once, both processes run some, and every
    photo arrives once."""
    replicate.latency_s = 0.8
    settings = make_settings(
        storage={"database": pg_url},
        runner={"max_running": 3},
        cluster=CLUSTER,
        delivery=FAST_TEND,
        limits={"rate_per_minute": 1000},
    )
    async with running(settings) as first, running(settings) as second:
        for n in range(12):
            telegram.push_update(updates.command(f"/generate picture {n}"))
        await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 12, within=40)
        nodes = {first.services.cluster.node_id, second.services.cluster.node_id}
    rows = jobs(pg_url)
    assert [r["status"] for r in rows] == ["succeeded"] * 12
    assert len(replicate.creates) == 12
    assert replicate.max_open() <= 3
    assert {r["owner"] for r in rows} == nodes  # the work spread over both
    print(f"max open predictions: {replicate.max_open()} (cap 3)")  # noqa: T201


async def test_killed_process_job_is_polled_and_delivered_by_another(
    daemons: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate, pg_url: str
) -> None:
    """kill -9 the process running a submitted job: another process takes it over within the
    lease, polls the saved prediction (one create at the vendor in all), and the photo
    arrives once."""
    replicate.latency_s = LEASE_S + 4
    pair = [daemons("a"), daemons("b")]
    for one in pair:
        await one.start()
    telegram.push_update(updates.command("/generate a long painting"))
    await wait_rows(pg_url, lambda r: bool(r) and r[0]["phase"] == "submitted", within=20)
    owner = jobs(pg_url)[0]["owner"]
    victim = running_on(owner, pair)
    survivor = next(one for one in pair if one is not victim)
    await victim.kill()
    killed_at = time.monotonic()
    await wait_rows(pg_url, lambda r: r[0]["owner"] not in (None, owner), within=LEASE_S + 15)
    taken_s = time.monotonic() - killed_at
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=30)
    await wait_rows(pg_url, lambda r: r[0]["status"] == "succeeded", within=10)
    (row,) = jobs(pg_url)
    assert running_on(row["owner"], [survivor]) is survivor
    assert len(replicate.creates) == 1 and row["rescues"] == 1
    assert replicate.last_prediction.polls > 0
    assert survivor.log_events("job_adopted")
    print(f"takeover after kill -9: {taken_s:.1f} s (lease {LEASE_S} s)")  # noqa: T201


async def test_killed_mid_submit_ends_submit_unknown_elsewhere(
    daemons: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate, pg_url: str
) -> None:
    """kill -9 the process whose create is in flight (the id never saved): the process that
    takes it over does not create it again; the job fails submit_unknown and the user is
    told."""
    pair = [daemons("a"), daemons("b")]
    for one in pair:
        await one.start()
    replicate.delay_next("create", 2.0)
    telegram.push_update(updates.command("/generate lost in the post"))
    await wait_rows(pg_url, lambda r: bool(r) and r[0]["phase"] == "submitting", within=20)
    victim = running_on(jobs(pg_url)[0]["owner"], pair)
    await victim.kill()
    await wait_rows(pg_url, lambda r: r[0]["status"] == "failed", within=LEASE_S + 20)
    (row,) = jobs(pg_url)
    assert row["error_code"] == "submit_unknown"
    await telegram.wait_for(
        lambda: any(t.startswith("Sorry, job 1 failed") for t in telegram.texts(CHAT)),
        within=10,
    )
    # the kill may come before or after the create reached the vendor: never a second one
    assert len(replicate.creates) <= 1
    assert telegram.photos(CHAT) == []


async def test_frozen_process_wakes_and_sends_nothing_for_a_taken_job(
    daemons: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate, pg_url: str
) -> None:
    """SIGSTOP the process running a job past its lease: another takes the job over and
    delivers it; after SIGCONT the woken process finds it was declared dead, sends nothing
    more to the chat and changes nothing in the job's row."""
    replicate.latency_s = LEASE_S + 3
    pair = [daemons("a"), daemons("b")]
    for one in pair:
        await one.start()
    telegram.push_update(updates.command("/generate a frozen lake"))
    await wait_rows(pg_url, lambda r: bool(r) and r[0]["phase"] == "submitted", within=20)
    owner = jobs(pg_url)[0]["owner"]
    zombie = running_on(owner, pair)
    survivor = next(one for one in pair if one is not zombie)
    assert zombie.proc is not None
    zombie.proc.send_signal(signal.SIGSTOP)
    try:
        await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=LEASE_S + 30)
        await wait_rows(pg_url, lambda r: r[0]["phase"] == "done", within=10)
        before_row = dict(jobs(pg_url)[0])
        before_chat = chat_snapshot(telegram)
    finally:
        zombie.proc.send_signal(signal.SIGCONT)
    await wait_until(lambda: bool(zombie.log_events("node_rejoined")), within=15)
    # its job's run woke too: it paused as untrusted, stopped at its first (fenced) write,
    # or was dropped (alone, or with the node's other runs)
    stopped = ("runs_dropped", "job_run_dropped", "job_left_running", "job_paused_untrusted")
    await wait_until(
        lambda: any(zombie.log_events(event) for event in stopped),
        within=10,
    )
    assert zombie.running  # it carries on as a fresh node
    assert chat_snapshot(telegram) == before_chat
    assert dict(jobs(pg_url)[0]) == before_row
    assert running_on(before_row["owner"], [survivor]) is survivor
    assert len(replicate.creates) == 1 and len(telegram.photos(CHAT)) == 1


# a session that holds an advisory lock (the reaper's, the claim's) and waits for another lock
LOCK_HOLDER_WAITING = (
    "SELECT DISTINCT held.pid FROM pg_locks held JOIN pg_locks waiting"
    " ON waiting.pid = held.pid AND NOT waiting.granted"
    " WHERE held.locktype = 'advisory' AND held.granted"
)


def session_state(pg_url: str, pid: int) -> str | None:
    rows = query(pg_url, "SELECT state FROM pg_stat_activity WHERE pid = ?", (pid,))
    return str(rows[0]["state"]) if rows else None


async def test_a_process_frozen_inside_a_transaction_does_not_hold_up_the_takeover(
    daemons: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate, pg_url: str
) -> None:
    """SIGSTOP a process in the middle of a write transaction that holds a cluster-wide lock
    (the test catches it there: a table lock of its own stops the transaction's next
    statement). The server ends that session within a third of the lease, so its locks go:
    a second process starts, takes the frozen one's job over and delivers it; after SIGCONT
    the frozen process finds its connection gone, sends nothing and carries on."""
    replicate.latency_s = LEASE_S + 3
    zombie = daemons("a")
    await zombie.start()
    telegram.push_update(updates.command("/generate a frozen pond"))
    await wait_rows(pg_url, lambda r: bool(r) and r[0]["phase"] == "submitted", within=20)
    assert zombie.proc is not None
    with connect(pg_url) as blocker, blocker.transaction():
        blocker.execute("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
        # the leader's reap (every heartbeat) takes its lock, then reads nodes: stuck
        await wait_until(lambda: bool(query(pg_url, LOCK_HOLDER_WAITING)), within=10)
        (pid,) = {row["pid"] for row in query(pg_url, LOCK_HOLDER_WAITING)}
        zombie.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # its statement ends now, on the server; the session waits for a client that is frozen
        await wait_until(lambda: session_state(pg_url, pid) == "idle in transaction", within=1)
        survivor = daemons("b")
        await survivor.start()  # its start-up reap takes the same lock
        await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=LEASE_S + 30)
        delivered_s = time.monotonic() - frozen_at
        await wait_rows(pg_url, lambda r: r[0]["phase"] == "done", within=10)
        assert session_state(pg_url, pid) is None  # the server ended the frozen session
        before_row = dict(jobs(pg_url)[0])
        before_chat = chat_snapshot(telegram)
    finally:
        zombie.proc.send_signal(signal.SIGCONT)
    await wait_until(lambda: bool(zombie.log_events("node_rejoined")), within=15)
    assert zombie.running
    assert chat_snapshot(telegram) == before_chat
    assert dict(jobs(pg_url)[0]) == before_row
    assert running_on(before_row["owner"], [survivor]) is survivor
    assert len(replicate.creates) == 1
    print(f"delivered {delivered_s:.1f} s after the freeze (lease {LEASE_S} s)")  # noqa: T201


async def test_cancel_from_another_process_stops_the_owner(
    make_settings: SettingsFactory,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    pg_url: str,
) -> None:
    """A cancel handled by the process that does not run the job ends it at once (the vendor
    is told, the quota unit returns); the process running it stops, and its status line says
    canceled and is never edited back to "working"."""
    replicate.latency_s = 60
    settings = make_settings(
        storage={"database": pg_url},
        cluster=CLUSTER,
        delivery=FAST_TEND,
        runner={"max_running": 1},
    )
    async with running(settings) as first, running(settings) as second:
        telegram.push_update(updates.command("/generate a very slow picture"))
        await wait_rows(pg_url, lambda r: bool(r) and r[0]["phase"] == "submitted", within=20)
        (row,) = jobs(pg_url)
        apps = {app.services.cluster.node_id: app for app in (first, second)}
        owner = apps[row["owner"]]
        (other,) = [app for node, app in apps.items() if node != row["owner"]]
        await wait_until(lambda: owner.services.runner.running_count == 1)
        outcome = await other.services.runner.cancel(row["id"], user_id=row["user_id"])
        assert outcome.name == "CANCELED"
        # the owner's run stops (its next write is refused, or its tend finds the job gone)
        await wait_until(lambda: owner.services.runner.running_count == 0, within=15)
        (row,) = jobs(pg_url)
        status = next(
            m for m in telegram.messages(CHAT) if m.message_id == row["status_message_id"]
        )
        assert status.text is not None and status.text.startswith("Canceled (job 1)")
        assert (row["status"], row["error_code"]) == ("canceled", "canceled")
        assert len(replicate.cancels) >= 1 and replicate.last_prediction.canceled
        assert len(replicate.creates) == 1 and telegram.photos(CHAT) == []
