"""Leases across processes (issue 16): one poller at a time with failover, setWebhook once per
cluster, a worker-only process that takes no updates, and what /healthz and /metrics tell an
operator about the processes sharing one PostgreSQL database."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import updates
from tests.conftest import WEBHOOK_SECRET, SettingsFactory, running
from tests.crash_harness import (
    WEBHOOK_PATH,
    Daemon,
    MakeDaemon,
    environment,
    query,
    run_imagebot,
)
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import ops_get

LEASE_S = 6.0
HEARTBEAT_S = 1.0
FAST_CLUSTER = {"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S}
FIRST_CHAT = 7_100


def _node(
    tmp_path: Path,
    name: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
    **sections: Any,
) -> Daemon:
    """One imagebot process of a cluster: its own directory and ports, the shared database."""
    home = tmp_path / name
    home.mkdir()
    cluster = {**FAST_CLUSTER, **sections.pop("cluster", {})}
    return Daemon(home, telegram, replicate, fal, database=pg_url, cluster=cluster, **sections)


def _node_id(daemon: Daemon) -> str:
    """The node id the daemon's current run registered under."""
    return str(daemon.log_events("node_started")[-1]["node"])


def _start(chat: int) -> dict[str, Any]:
    return updates.command("/start", chat_id=chat, user_id=chat)


def _replies(telegram: FakeTelegram, chats: range) -> dict[int, int]:
    return {chat: len(telegram.messages(chat)) for chat in chats}


async def test_poller_failover_after_kill(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """Two polling processes: only the poller lease's holder calls getUpdates; after kill -9
    the other polls within lease_s + heartbeat_s, and every update sent before and during the
    gap is answered exactly once, never two getUpdates at a time."""
    first = _node(tmp_path, "a", telegram, replicate, fal, pg_url, mode="polling")
    second = _node(tmp_path, "b", telegram, replicate, fal, pg_url, mode="polling")
    try:
        await first.start()
        await second.start()
        await wait_until(lambda: bool(first.log_events("polling_started")), within=10)
        before = range(FIRST_CHAT, FIRST_CHAT + 5)
        for chat in before:
            telegram.push_update(_start(chat))
        await wait_until(lambda: all(_replies(telegram, before).values()), within=15)
        # and closed in the inbox (a kill between a reply and its record is the documented
        # at-least-once window, replayed by the survivor: not what this test is about)
        await wait_until(
            lambda: len(query(pg_url, "SELECT 1 FROM inbox WHERE processed_at IS NOT NULL")) == 5,
            within=10,
        )
        assert not second.log_events("polling_started")

        killed_at = time.time()
        await first.kill()
        during = range(FIRST_CHAT + 5, FIRST_CHAT + 10)
        for chat in during:
            telegram.push_update(_start(chat))
        # bounded by the lease plus a heartbeat, with room for a loaded machine
        await wait_until(
            lambda: any(c.at > killed_at for c in telegram.calls_of("getUpdates")),
            within=LEASE_S + HEARTBEAT_S + 10,
        )
        took_over = min(c.at for c in telegram.calls_of("getUpdates") if c.at > killed_at)
        await wait_until(lambda: all(_replies(telegram, during).values()), within=15)
        # a handler closes its update in the inbox just after its reply: wait for the record
        # too (bounded), then read it
        closed = "SELECT 1 FROM inbox WHERE processed_at IS NOT NULL"
        await wait_until(lambda: len(query(pg_url, closed)) >= 10, within=10)
        b_id = _node_id(second)
        rows = query(pg_url, "SELECT update_id, processed_at, received_by FROM inbox")
    finally:
        await first.close()
        await second.close()
    print(f"poller failover: first getUpdates {took_over - killed_at:.2f} s after kill -9")  # noqa: T201
    every = range(FIRST_CHAT, FIRST_CHAT + 10)
    assert _replies(telegram, every) == dict.fromkeys(every, 1)
    assert len(rows) == 10 and all(row["processed_at"] is not None for row in rows)
    late = sorted(rows, key=lambda row: row["update_id"])[5:]
    assert {row["received_by"] for row in late} == {b_id}
    assert telegram.get_updates_max_in_flight == 1
    assert telegram.poll_conflicts == 0
    assert len(second.log_events("polling_started")) == 1


async def test_set_webhook_once_for_two_webhook_processes(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """Two webhook processes behind one public URL: setWebhook is called once (by the
    maintenance lease's holder), both listen and answer updates; when the holder dies the
    other takes the lease and sets the webhook again."""
    first = _node(tmp_path, "a", telegram, replicate, fal, pg_url)
    public = first.config["webhook"]["url"]
    second = _node(tmp_path, "b", telegram, replicate, fal, pg_url, webhook={"url": public})
    try:
        await first.start()
        await second.start()
        assert len(telegram.calls_of("setWebhook")) == 1
        assert telegram.webhook is not None and telegram.webhook.url == public
        answers = []
        for chat, daemon in ((FIRST_CHAT, first), (FIRST_CHAT + 1, second)):
            url = f"http://127.0.0.1:{daemon.webhook_port}{WEBHOOK_PATH}"
            answers.append((await updates.post_webhook(url, _start(chat), WEBHOOK_SECRET))[0])
        chats = range(FIRST_CHAT, FIRST_CHAT + 2)
        await wait_until(lambda: all(_replies(telegram, chats).values()), within=15)
        assert len(telegram.calls_of("setWebhook")) == 1

        killed_at = time.time()
        await first.kill()
        await wait_until(
            lambda: len(telegram.calls_of("setWebhook")) == 2, within=LEASE_S + HEARTBEAT_S + 10
        )
        again = telegram.calls_of("setWebhook")[1]
    finally:
        await first.close()
        await second.close()
    print(f"webhook re-set by the new leader {again.at - killed_at:.2f} s after kill")  # noqa: T201
    assert answers == [200, 200]
    assert _replies(telegram, chats) == dict.fromkeys(chats, 1)
    assert again.params["url"] == public


async def test_worker_only_process_takes_no_updates(
    bot: Callable[..., Any], telegram: FakeTelegram
) -> None:
    """A process with only the worker role opens no webhook port, sets no webhook and, in
    polling mode, never calls getUpdates: the update stays with Telegram."""
    async with bot(telegram={"mode": "webhook"}, cluster={"roles": ["worker"]}) as app:
        status, health = await ops_get(app, "/healthz")
        assert app.services.intake.webhook_port is None
    assert status == 200 and health["node"]["roles"] == ["worker"]
    assert health["node"]["leases"] == []
    assert telegram.calls_of("setWebhook") == []

    async with bot(cluster={"roles": ["worker"], **FAST_CLUSTER}) as app:
        telegram.push_update(_start(FIRST_CHAT))
        beats = app.services.cluster
        ticks: list[float] = []
        beats.on_tick(lambda: _note(ticks))
        await wait_until(lambda: len(ticks) >= 3, within=15)  # three heartbeats went by
    assert telegram.calls_of("getUpdates") == []
    assert telegram.calls_of("deleteWebhook") == []
    assert telegram.pending_update_count == 1
    assert telegram.messages(FIRST_CHAT) == []


async def _note(ticks: list[float]) -> None:
    ticks.append(time.monotonic())


def test_roles_flag_in_check_config(tmp_path: Path, telegram: FakeTelegram) -> None:
    """`imagebot check-config --roles worker,intake` shows the roles this process would take
    (in the canonical order), and an unknown role is refused naming cluster.roles."""
    env = environment(tmp_path, telegram.url)
    shown = run_imagebot(tmp_path, env, "check-config", "--roles", "worker,intake")
    bad = run_imagebot(tmp_path, env, "check-config", "--roles", "poller")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["cluster"]["roles"] == ["intake", "worker"]
    assert bad.returncode == 2
    assert "cluster.roles" in bad.stderr and "poller" in bad.stderr


def _families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def _metrics(app: Any) -> dict[str, list[Any]]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}/metrics") as resp,
    ):
        return _families(await resp.text())


async def test_healthz_and_metrics_of_two_processes(
    make_settings: SettingsFactory, telegram: FakeTelegram, pg_url: str
) -> None:
    """Two processes on one database: each /healthz names its node id, roles and leases and
    lists both live peers; the cluster gauges (queued, ...) come from the leader alone; when
    the leader stops, the other takes both leases, exports them and polls."""
    settings = make_settings(storage={"database": pg_url}, cluster=FAST_CLUSTER)
    leading = running(settings)
    leader = await leading.__aenter__()
    try:
        async with running(settings) as other:
            a, b = leader.services.cluster.node_id, other.services.cluster.node_id
            _, lead_health = await ops_get(leader, "/healthz")
            _, other_health = await ops_get(other, "/healthz")
            lead_metrics = await _metrics(leader)
            other_metrics = await _metrics(other)
            telegram.push_update(updates.command("/generate two processes"))
            await wait_until(lambda: len(telegram.photos(updates.DEFAULT_CHAT_ID)) == 1)
            _, listing = await ops_get(leader, "/jobs")
            _, one = await ops_get(other, f"/jobs/{listing['jobs'][0]['id']}")
            # the leader stops cleanly: its leases go with it, the other takes them over
            await leading.__aexit__(None, None, None)
            leading = None
            await wait_until(
                lambda: (
                    other.services.cluster.holds("maintenance")
                    and other.services.cluster.holds("poller")
                ),
                within=LEASE_S,
            )
            telegram.push_update(_start(FIRST_CHAT))
            await wait_until(lambda: len(telegram.messages(FIRST_CHAT)) == 1, within=10)
            after = await _metrics(other)
            _, after_health = await ops_get(other, "/healthz")
    finally:
        if leading is not None:
            await leading.__aexit__(None, None, None)

    assert lead_health["node"] == {
        "id": a,
        "roles": ["intake", "maintenance", "worker"],
        "leases": ["maintenance", "poller"],
        "trusted": True,
    }
    assert other_health["node"]["id"] == b and other_health["node"]["leases"] == []
    for health in (lead_health, other_health):
        assert [p["id"] for p in health["peers"]] == [a, b]
        assert all(0 <= p["heartbeat_age_s"] < LEASE_S for p in health["peers"])
        assert health["lease_holders"] == {"maintenance": a, "poller": a}
        assert health["status"] == "ok" and "queued" in health and "running" in health
    assert [p["self"] for p in other_health["peers"]] == [False, True]
    assert [p["id"] for p in after_health["peers"]] == [b]

    assert "imagebot_jobs_queued" in lead_metrics
    assert "imagebot_jobs_queued" not in other_metrics
    assert "imagebot_cluster_nodes" not in other_metrics
    assert lead_metrics["imagebot_cluster_nodes"][0].value == 2
    for metrics, node, held in ((lead_metrics, a, 1), (other_metrics, b, 0)):
        (info,) = metrics["imagebot_node_info"]
        assert info.labels == {"node": node, "roles": "intake,maintenance,worker"}
        leases = {s.labels["lease"]: s.value for s in metrics["imagebot_leases_held"]}
        assert leases == {"maintenance": held, "poller": held}
    assert "imagebot_jobs_queued" in after
    assert after["imagebot_cluster_nodes"][0].value == 1

    job = listing["jobs"][0]
    assert job["rescues"] == 0 and "owner" in job
    assert one["id"] == job["id"] and one["rescues"] == 0 and "owner" in one


@pytest.mark.sqlite_only(reason="one process per SQLite file: every other node is a dead run")
async def test_sqlite_restart_after_kill_takes_the_leases_at_once(daemon: MakeDaemon) -> None:
    """On SQLite a restart after kill -9 holds the poller and maintenance leases before it is
    ready (the dead run's leases are let go, not waited out) and polls again."""
    bot = daemon(mode="polling")
    await bot.start()
    await bot.kill()
    await bot.start()
    taken = [e["lease"] for e in bot.log_events("lease_taken")]
    await wait_until(lambda: len(bot.log_events("polling_started")) == 2, within=10)
    assert sorted(taken) == ["maintenance", "maintenance", "poller", "poller"]
