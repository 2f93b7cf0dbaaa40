"""Telegram outages: made results wait (without a provider slot, across restarts) and are
delivered once Telegram is back; only `delivery.retry_window_s` ends them (issue 13)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import aiohttp

from tests import updates
from tests.conftest import running
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import query

CHAT = updates.DEFAULT_CHAT_ID
# Longer runs for RELIABILITY.md figures: OUTAGE_S=60 OUTAGE_JOBS=20 pytest -k without_holding
OUTAGE_S = float(os.environ.get("OUTAGE_S", "3"))
OUTAGE_JOBS = int(os.environ.get("OUTAGE_JOBS", "2"))
log = logging.getLogger(__name__)
# What a result, a status line and a failure notice need; getMe/getUpdates keep working.
SENDS = frozenset(
    {"sendMessage", "sendPhoto", "editMessageText", "deleteMessage", "sendChatAction"}
)
# Short everything: the old give-up (runner.max_attempts quick tries) is over in well under a
# second, and a job past generate.timeout_s + stale_slack_s would be swept after 2 s.
FAST = {
    "runner": {"max_running": 1, "sweep_interval_s": 0.2, "stale_slack_s": 0},
    "generate": {"timeout_s": 2},
    "delivery": {
        "retry_base_s": 0.2,
        "retry_max_s": 0.5,
        "check_interval_s": 0.2,
        "retry_window_s": 600,
    },
}


def rows(app: Any) -> list[Any]:
    return query(str(app.services.settings.storage.database), "SELECT * FROM jobs ORDER BY id")


async def ops_get(app: Any, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def parked(app: Any, count: int) -> bool:
    found = rows(app)
    waiting = [r for r in found if r["status"] == "running" and r["deliver_after"]]
    return len(waiting) == count


async def test_results_wait_out_a_telegram_outage_without_holding_a_slot(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Telegram answers 502 to every send for longer than the old give-up time and the sweep's
    deadline: every job (max_running=1) gets made, each parks and frees its slot for the
    next, /healthz and /metrics show the deliveries waiting, nothing fails; when Telegram is
    back the chat gets exactly one photo per job and the vendor saw one create per job."""
    n = OUTAGE_JOBS
    async with bot(**FAST) as app:
        telegram.outage(502, SENDS)
        outage_started = time.monotonic()
        for k in range(n):
            telegram.push_update(updates.command(f"/generate fox number {k:03d}"))
        # Job k+1 can only reach the vendor after job k let its slot go.
        await wait_until(lambda: parked(app, n), within=20 + 2 * n)
        assert len(replicate.creates) == n
        # (the last park's row commits a moment before its run lets the slot go)
        await wait_until(lambda: app.services.runner.running_count == 0, within=5)
        # Outlast the sweep (deadline 2 s + slack 0) and many retry rounds.
        first_tries = rows(app)[0]["delivery_attempts"]
        await wait_until(lambda: rows(app)[0]["delivery_attempts"] >= first_tries + 5, within=20)
        await wait_until(
            lambda: time.monotonic() - outage_started > OUTAGE_S, within=OUTAGE_S + 10
        )
        status, health = await ops_get(app, "/healthz")
        _, metrics = await ops_get(app, "/metrics")
        during = rows(app)
        telegram.end_outage()
        outage_s = time.monotonic() - outage_started
        back = time.monotonic()
        await wait_until(lambda: len(telegram.photos(CHAT)) >= n, within=20 + n)
        delivered_after_s = time.monotonic() - back
        await wait_until(lambda: all(r["phase"] == "done" for r in rows(app)), within=10 + n)
        final = rows(app)
    assert [r["status"] for r in during] == ["running"] * n
    assert all(r["phase"] in ("fetched", "delivering") for r in during)
    assert status == 200 and f'"deliveries_waiting": {n}' in health
    assert f"imagebot_deliveries_waiting {n}.0" in metrics
    assert [r["status"] for r in final] == ["succeeded"] * n
    assert [r["deliver_after"] for r in final] == [None] * n
    captions = sorted(p.caption or "" for p in telegram.photos(CHAT))
    assert [c.split("fox number ")[1][:3] for c in captions] == [f"{k:03d}" for k in range(n)]
    assert len(replicate.creates) == n
    assert not any("failed" in t for t in telegram.texts(CHAT))
    log.info(
        "outage %.1f s, %d jobs, all delivered %.2f s after Telegram came back",
        outage_s,
        n,
        delivered_after_s,
    )


async def test_parked_result_survives_refused_connections_and_a_restart(
    make_settings, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Telegram refuses connections (its listener is gone) when the result is ready, the bot
    restarts during the outage, Telegram comes back answering 502 for a while: the job waits
    across the restart and is delivered once afterwards, with one create at the vendor."""
    settings = make_settings(**FAST)
    port = telegram.port
    async with running(settings) as app:
        replicate.latency_s = 1.0
        telegram.push_update(updates.command("/generate patient fox"))
        await wait_until(lambda: bool(rows(app)) and rows(app)[0]["status"] == "running")
        await telegram.stop()  # connection refused from now on
        await wait_until(lambda: parked(app, 1), within=20)
    assert telegram.photos(CHAT) == []
    telegram.outage(502, SENDS)
    await telegram.start(port=port)
    async with running(settings) as app:
        tries = rows(app)[0]["delivery_attempts"]
        await wait_until(lambda: rows(app)[0]["delivery_attempts"] >= tries + 2, within=20)
        assert rows(app)[0]["status"] == "running"
        telegram.end_outage()
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=20)
        await wait_until(lambda: rows(app)[0]["phase"] == "done", within=10)
        (row,) = rows(app)
    assert row["status"] == "succeeded"
    assert len(telegram.photos(CHAT)) == 1
    assert len(replicate.creates) == 1


async def test_window_over_fails_delivery_gave_up_and_returns_the_quota(
    bot, telegram: FakeTelegram
) -> None:
    """With a short delivery.retry_window_s and photos still refused (502), the job ends failed
    `delivery_gave_up`, the user is told in the status line, and the quota unit returns."""
    short = {**FAST, "delivery": {**FAST["delivery"], "retry_window_s": 1.0}}
    async with bot(**short) as app:
        telegram.outage(502, frozenset({"sendPhoto"}))
        telegram.push_update(updates.command("/generate never shown"))
        await wait_until(lambda: bool(rows(app)) and rows(app)[0]["status"] == "failed", within=20)
        await wait_until(lambda: rows(app)[0]["phase"] == "done", within=10)
        (row,) = rows(app)
        before = len(telegram.texts(CHAT))
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: len(telegram.texts(CHAT)) > before)
        usage = telegram.texts(CHAT)[-1]
    assert row["error_code"] == "delivery_gave_up"
    assert row["delivery_attempts"] == 0 and row["deliver_after"] is None
    assert telegram.photos(CHAT) == []
    told = [t for t in telegram.texts(CHAT) if t.startswith("Sorry, job 1 failed")]
    assert told == [
        "Sorry, job 1 failed: Telegram couldn't take the result for a long time, so I stopped "
        "trying.\nIt didn't count against your daily limit."
    ]
    assert "• Generate: 0 of 50 used, 50 left" in usage


async def test_blocked_chat_still_ends_the_job_at_once(bot, telegram: FakeTelegram) -> None:
    """A refusal that cannot heal (the user blocked the bot: 403) fails the job at once, as
    before: it is not parked and nothing waits."""
    async with bot(**FAST) as app:
        telegram.fail_method("sendPhoto", 403, "Forbidden: bot was blocked by the user")
        telegram.push_update(updates.command("/generate for nobody"))
        await wait_until(lambda: bool(rows(app)) and rows(app)[0]["status"] == "failed", within=20)
        (row,) = rows(app)
    assert row["error_code"] == "blocked"
    assert row["delivery_attempts"] == 0 and row["deliver_after"] is None


async def test_failure_notice_waits_for_telegram_and_arrives_once(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job that fails at the vendor while Telegram is down keeps its failure notice waiting
    (notices_waiting in /healthz) and the user gets it exactly once when Telegram is back."""
    async with bot(**FAST) as app:
        telegram.outage(502, SENDS)
        replicate.next_behaviours.append(
            {"outcome": "failed", "error_text": "NSFW content detected"}
        )
        telegram.push_update(updates.command("/generate doomed"))
        await wait_until(lambda: bool(rows(app)) and rows(app)[0]["status"] == "failed", within=20)
        await wait_until(lambda: bool(rows(app)[0]["deliver_after"]), within=10)
        tries = rows(app)[0]["delivery_attempts"]
        await wait_until(lambda: rows(app)[0]["delivery_attempts"] >= tries + 2, within=20)
        _, health = await ops_get(app, "/healthz")
        telegram.end_outage()
        await wait_until(lambda: rows(app)[0]["phase"] == "done", within=20)
    assert '"notices_waiting": 1' in health
    told = [t for t in telegram.texts(CHAT) if t.startswith("Sorry, job 1 failed")]
    assert len(told) == 1
