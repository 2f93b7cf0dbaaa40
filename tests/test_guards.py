"""Guardrails through the real Application: access, rate, caps, spend, concurrency, retries,
timeouts and Telegram's flood control, all decided from the store."""

from __future__ import annotations

from typing import Any

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import backdate
from tests.support import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID
GROUP = -100_777


def backdate_jobs(app: Any, seconds: float) -> None:
    """Move every job's creation time into the past, as if the user had waited."""
    backdate(db_path(app), "jobs", "created_at", seconds)


async def test_refused_user_is_told_their_id_once(bot, telegram: FakeTelegram) -> None:
    """Not on the allowlist: one polite refusal with the numeric id, then silence for the
    window; no job is made."""
    async with bot(access={"open": False, "users": [5]}) as app:
        telegram.push_update(updates.command("/generate a fox", user_id=4242, chat_id=4242))
        await wait_until(lambda: len(telegram.texts(4242)) == 1)
        telegram.push_update(updates.command("/generate again", user_id=4242, chat_id=4242))
        telegram.push_update(updates.command("/usage", user_id=4242, chat_id=4242))
        telegram.push_update(updates.command("/help"))  # someone else, to know the bot caught up
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
    (refusal,) = telegram.texts(4242)
    assert "4242" in refusal and "private" in refusal
    assert rows(db_path(app)) == []


async def test_start_tells_a_refused_user_their_id(bot, telegram: FakeTelegram) -> None:
    """/start always answers, and a refused user learns the id to send the operator."""
    async with bot(access={"open": False}):
        telegram.push_update(updates.command("/start", user_id=31337, chat_id=31337))
        await wait_until(lambda: len(telegram.texts(31337)) == 1)
    assert "31337" in telegram.texts(31337)[0]


async def test_group_allowlist_and_mention(bot, telegram: FakeTelegram) -> None:
    """In a group, only /generate@bot is answered; members of an allowlisted group may use it."""
    async with bot(access={"open": False, "chats": [GROUP]}) as app:
        telegram.push_update(updates.command("/generate plain", chat_id=GROUP, user_id=77))
        telegram.push_update(
            updates.command("/generate@imagebot_test_bot addressed", chat_id=GROUP, user_id=77)
        )
        await wait_until(lambda: len(telegram.photos(GROUP)) == 1)
    (job,) = rows(db_path(app))
    assert job["prompt"] == "addressed"
    assert job["user_id"] == 77 and job["chat_type"] == "supergroup"


async def test_rate_limit_and_its_reset(bot, telegram: FakeTelegram) -> None:
    """The third request in a minute is refused with when to retry; once the minute has
    passed (rows backdated), requests are accepted again."""
    async with bot(limits={"rate_per_minute": 2}) as app:
        for n in range(3):
            telegram.push_update(updates.command(f"/generate fox {n}"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await wait_until(lambda: any("Easy there" in t for t in telegram.texts(CHAT)))
        backdate_jobs(app, 61)
        telegram.push_update(updates.command("/generate fox later"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3)
    (refusal,) = [t for t in telegram.texts(CHAT) if "Easy there" in t]
    assert "at most 2 requests a minute" in refusal and "Try again in" in refusal
    assert [r["prompt"] for r in rows(db_path(app))] == ["fox 0", "fox 1", "fox later"]


async def test_admin_bypasses_limits(bot, telegram: FakeTelegram) -> None:
    """An admin is held by neither the minute limit nor the daily cap."""
    async with bot(
        access={"open": False, "admins": [CHAT]},
        limits={"rate_per_minute": 1},
        generate={"daily_cap": 1},
    ) as app:
        for n in range(3):
            telegram.push_update(updates.command(f"/generate boss {n}"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3)
    assert len(rows(db_path(app))) == 3


async def test_daily_cap_refunds_failures_and_survives_restart(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A failed job gives its unit back; at the cap the user is told when it resets; a restart
    does not reset the count (it lives in the store)."""
    replicate.next_behaviours.append({"outcome": "failed"})
    async with bot(generate={"daily_cap": 1}) as app:
        telegram.push_update(updates.command("/generate first try"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        telegram.push_update(updates.command("/generate second try"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    async with bot(generate={"daily_cap": 1}):
        telegram.push_update(updates.command("/generate third try"))
        await wait_until(lambda: any("You've used all" in t for t in telegram.texts(CHAT)))
    cap_text = next(t for t in telegram.texts(CHAT) if "You've used all" in t)
    assert "all 1 image generations for today" in cap_text and "00:00 UTC" in cap_text
    assert [(r["prompt"], r["status"]) for r in rows(db_path(app))] == [
        ("first try", "failed"),
        ("second try", "succeeded"),
    ]
    assert len(replicate.creates) == 2


async def test_queue_position_is_shown(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With max_running=1, waiting jobs are answered with their place in line (not with
    "Generating…" edited a moment later) and run in FIFO order."""
    replicate.latency_s = 1.2
    async with bot(runner={"max_running": 1}) as app:
        for n in range(3):
            telegram.push_update(updates.command(f"/generate queued {n}"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3, within=20)
        # PostgreSQL: each place was read by the job's creation and used by its handler
        # (none left over); SQLite keeps none.
        assert [app.services.store.placed(job_id) for job_id in (1, 2, 3)] == [None] * 3
    sent = [call.params.get("text", "") for call in telegram.calls_of("sendMessage")]
    assert [text for text in sent if "(job " in text] == [
        "Generating… (job 1)",
        "You're next in line. (job 2)",
        "You're #2 in line. (job 3)",
    ]
    assert [p.caption for p in telegram.photos(CHAT)] == ["queued 0", "queued 1", "queued 2"]
    starts = [r["started_at"] for r in rows(db_path(app))]
    assert starts == sorted(starts)


async def test_spend_cap_refuses_and_logs(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """When today's estimated spend would pass the cap, new jobs are refused clearly."""
    async with bot(
        limits={"daily_spend_usd": 0.005}, generate={"cost_per_image_usd": 0.003}
    ) as app:
        telegram.push_update(updates.command("/generate within budget"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(updates.command("/generate over budget"))
        await wait_until(lambda: any("budget" in t for t in telegram.texts(CHAT)))
    assert len(rows(db_path(app))) == 1
    assert len(replicate.creates) == 1


async def test_control_characters_are_refused(bot, telegram: FakeTelegram) -> None:
    """A prompt with control characters is refused with a hint; no job."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a\x1b[31m red fox"))
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
    assert "control characters" in telegram.texts(CHAT)[0]
    assert rows(db_path(app)) == []


async def test_retry_after_429_on_create(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 429 on create is retried after the vendor's Retry-After; the row records 2 attempts."""
    replicate.fail_next(
        "create", 429, {"detail": "Request was throttled."}, headers={"Retry-After": "1"}
    )
    async with bot() as app:
        telegram.push_update(updates.command("/generate patient fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    (row,) = rows(db_path(app))
    assert row["status"] == "succeeded" and row["attempts"] == 2
    first, second = replicate.creates
    assert second.at - first.at >= 0.95
    assert len(replicate.predictions) == 1


async def test_status_poll_500_is_retried(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """5xx on status polls is retried (fewer than max_attempts in a row) and the job succeeds
    with one create."""
    replicate.latency_s = 0.4
    replicate.fail_next("get", 500, {"detail": "boom"}, times=2)
    async with bot() as app:
        telegram.push_update(updates.command("/generate sturdy fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    (row,) = rows(db_path(app))
    assert row["status"] == "succeeded" and row["poll_failures"] == 0
    assert len(replicate.creates) == 1
    assert len(replicate.calls_of("get")) >= 3


async def test_status_poll_500_gives_up_after_max_attempts(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Three failed polls in a row fail the job with a friendly message."""
    replicate.latency_s = 5
    replicate.fail_next("get", 503, {"detail": "down"}, times=20)
    async with bot() as app:
        telegram.push_update(updates.command("/generate unlucky fox"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
    (row,) = rows(db_path(app))
    assert row["status"] == "failed" and row["error_code"] == "provider_unavailable"
    assert len(replicate.calls_of("get")) == 3


async def test_permanent_422_is_not_retried(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 422 on create fails at once (one call) with a specific message."""
    replicate.fail_next(
        "create", 422, {"title": "Input validation failed", "detail": "bad input", "status": 422}
    )
    async with bot() as app:
        telegram.push_update(updates.command("/generate invalid fox"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
    (row,) = rows(db_path(app))
    assert row["status"] == "failed" and row["error_code"] == "invalid_input"
    assert row["attempts"] == 1
    assert len(replicate.creates) == 1
    assert "didn't accept this request" in telegram.texts(CHAT)[0]


async def test_timeout_cancels_at_the_vendor(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Past generate.timeout_s the job fails as a timeout and the prediction is canceled."""
    replicate.latency_s = 30  # the user is told long before the vendor would finish
    async with bot(generate={"timeout_s": 1}) as app:
        telegram.push_update(updates.command("/generate eternal fox"))
        await wait_until(lambda: any("took too long" in t for t in telegram.texts(CHAT)))
    (row,) = rows(db_path(app))
    assert row["status"] == "failed" and row["error_code"] == "timeout"
    assert len(replicate.cancels) == 1
    assert replicate.last_prediction.canceled


async def test_telegram_429_is_waited_out(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Telegram answering 429 with retry_after delays the photo; it is not dropped."""
    telegram.fail_method("sendPhoto", 429, "Too Many Requests: retry after 1", retry_after=1)
    async with bot() as app:
        telegram.push_update(updates.command("/generate crowded fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    first, second = telegram.calls_of("sendPhoto")
    assert second.at - first.at >= 1.0
    assert rows(db_path(app))[0]["status"] == "succeeded"


async def test_blocked_user_ends_job_cleanly(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A user who blocked the bot: the job ends failed with the reason, and no retry storm."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate lonely fox"))
        await wait_until(lambda: len(replicate.creates) == 1)
        telegram.forbid_chat(CHAT)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "failed")
    (row,) = rows(db_path(app))
    assert row["error_code"] == "blocked"
    assert len(telegram.calls_of("sendPhoto")) == 1


async def test_unknown_command_and_plain_text(bot, telegram: FakeTelegram) -> None:
    """An unknown command gets a short hint; plain text in private gets the help text."""
    async with bot():
        telegram.push_update(updates.command("/dance"))
        telegram.push_update(updates.text_message("hello bot"))
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
    hint, help_text = telegram.texts(CHAT)
    assert hint == "I don't know /dance. Try /help."
    assert "/generate" in help_text
