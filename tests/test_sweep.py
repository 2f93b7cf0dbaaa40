"""The stale-job sweep: a job running past its deadline plus slack is failed, told and released,
even when no task is working on it any more (issue 5)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import aiohttp

from imagebot.clock import iso, utcnow
from tests import updates
from tests.conftest import REPLICATE_TOKEN
from tests.crash_harness import write
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import query

CHAT = updates.DEFAULT_CHAT_ID
SWEEP = {"runner": {"sweep_interval_s": 0.2, "stale_slack_s": 0}, "generate": {"timeout_s": 2}}


def rows(app: Any, sql: str = "SELECT * FROM jobs ORDER BY id") -> list[Any]:
    return query(str(app.services.settings.storage.database), sql)


async def create_prediction(replicate: FakeReplicate, prompt: str) -> str:
    """A prediction at the fake Replicate that will not finish during the test."""
    replicate.next_behaviours.append({"latency_s": 600})
    url = f"{replicate.url}/v1/models/black-forest-labs/flux-schnell/predictions"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url,
            json={"input": {"prompt": prompt}},
            headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 201
        return str((await resp.json())["id"])


async def insert_orphan(app: Any, prediction_id: str, deadline_in_s: float, prompt: str) -> int:
    """A `running` job at the vendor that no task of this process works on (as if its task
    vanished), with its deadline `deadline_in_s` from now."""
    now = utcnow()
    sql = (
        "INSERT INTO jobs (kind, status, phase, update_id, chat_id, user_id, chat_type, prompt,"
        " provider, params, provider_request_id, attempts, created_at, started_at,"
        " submitted_at, deadline_at, updated_at) VALUES ('generate', 'running', 'submitted',"
        " ?, ?, ?, 'private', ?, 'replicate', ?, ?, 1, ?, ?, ?, ?, ?)"
    )
    params = (
        updates.next_update_id(),
        CHAT,
        CHAT,
        prompt,
        json.dumps({"num_outputs": 1}),
        prediction_id,
        iso(now),
        iso(now),
        iso(now),
        iso(now + timedelta(seconds=deadline_in_s)),
        iso(now),
    )
    db = str(app.services.settings.storage.database)
    (job_id,) = await asyncio.to_thread(write, db, [(sql, params)])
    return job_id


async def usage_line(telegram: FakeTelegram) -> str:
    """Ask /usage and return its 'Generate' line. (The runner adopts the ownerless jobs the
    tests insert and may post their status lines meanwhile: the answer is found by its
    heading, not taken as the chat's last text.)"""
    before = len(telegram.texts(CHAT))
    telegram.push_update(updates.command("/usage"))

    def answers() -> list[str]:
        return [t for t in telegram.texts(CHAT)[before:] if t.startswith("Today (UTC):")]

    await wait_until(lambda: bool(answers()))
    (text,) = answers()
    return text.splitlines()[1]


async def test_sweep_fails_overdue_job_whose_task_is_gone(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A running job past deadline + slack with no task is failed by the periodic sweep: the
    prediction is canceled at Replicate, the user is told, and the quota unit comes back;
    a running job whose deadline is still ahead is left alone."""
    async with bot(**SWEEP) as app:
        stale_id = await create_prediction(replicate, "stuck forever")
        ahead_id = await create_prediction(replicate, "still has time")
        stale = await insert_orphan(app, stale_id, deadline_in_s=1.0, prompt="stuck forever")
        ahead = await insert_orphan(app, ahead_id, deadline_in_s=300, prompt="still has time")
        assert await usage_line(telegram) == "• Generate: 2 of 50 used, 48 left"
        await wait_until(lambda: rows(app)[0]["status"] == "failed", within=10)
        await wait_until(
            lambda: any(t.startswith(f"Sorry, job {stale} failed") for t in telegram.texts(CHAT))
        )
        released = await usage_line(telegram)
        # One more sweep: nothing changes for the failed job or the one with time left.
        await app.services.runner.sweep()
        stale_row, ahead_row = rows(app)
    assert released == "• Generate: 1 of 50 used, 49 left"
    assert (stale_row["id"], stale_row["status"], stale_row["error_code"]) == (
        stale,
        "failed",
        "timeout",
    )
    assert stale_row["phase"] == "done" and stale_row["finished_at"]
    assert (ahead_row["id"], ahead_row["status"]) == (ahead, "running")
    assert replicate.predictions[stale_id].canceled
    assert not replicate.predictions[ahead_id].canceled
    assert len(replicate.cancels) == 1
    told = [t for t in telegram.texts(CHAT) if t.startswith(f"Sorry, job {stale} failed")]
    assert told == [
        f"Sorry, job {stale} failed: it took too long, so I stopped it.\n"
        "It didn't count against your daily limit."
    ]
    assert len(replicate.creates) == 2  # only the two this test made: nothing resubmitted


async def test_sweep_fails_job_stuck_at_the_vendor_with_its_task(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job whose prediction never finishes is failed by its deadline (timeout), canceled at
    the vendor and its user told once, whether its own wait or the sweep gets there first."""
    replicate.latency_s = 600
    async with bot(**SWEEP) as app:
        telegram.push_update(updates.command("/generate never ready"))
        await wait_until(lambda: bool(rows(app)) and rows(app)[0]["status"] == "failed", within=15)
        await wait_until(
            lambda: any(t.startswith("Sorry, job 1 failed") for t in telegram.texts(CHAT))
        )
        (row,) = rows(app)
    assert row["error_code"] == "timeout"
    assert len(replicate.creates) == 1
    assert replicate.last_prediction.canceled
    assert len([t for t in telegram.texts(CHAT) if t.startswith("Sorry, job 1 failed")]) == 1
    assert telegram.photos(CHAT) == []
