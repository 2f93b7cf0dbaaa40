"""End to end through the real app lifecycle: Telegram update in, photo out, store and /jobs."""

from __future__ import annotations

import json

import aiohttp

from imagebot.models import JobStatus
from tests import updates
from tests.conftest import BOT_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import execute
from tests.support import db_path, ops_get, rows, webhook_url

CHAT = updates.DEFAULT_CHAT_ID


async def test_generate_by_polling(bot, telegram: FakeTelegram, replicate: FakeReplicate) -> None:
    """/generate from getUpdates: "Generating…" answers the command, then a photo replies to it,
    the status message goes away, and the job row and /jobs/{id} show it succeeded."""
    async with bot() as app:
        update = updates.command("/generate a red fox")
        telegram.push_update(update)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        # The status line goes once the row says succeeded (the photo is sent just before).
        await wait_until(lambda: telegram.messages(CHAT, include_deleted=True)[0].deleted)
        status, job = await ops_get(app, "/jobs/1")

    command_id = update["message"]["message_id"]
    sent = telegram.messages(CHAT, include_deleted=True)
    # A loaded machine may have shown "Generating… 2 s (job 1)" by then.
    assert (sent[0].text or "").startswith("Generating…")
    assert (sent[0].text or "").endswith("(job 1)")
    assert sent[0].reply_to_message_id == command_id
    assert sent[0].deleted  # the status line is removed once the image is there
    photo = telegram.photos(CHAT)[0]
    assert photo.reply_to_message_id == command_id
    assert photo.caption == "a red fox"
    assert replicate.creates[0].params["input"]["prompt"] == "a red fox"
    assert "webhook" not in replicate.creates[0].params  # polling mode: no completion hints
    assert len(replicate.creates) == 1
    assert status == 200
    assert job["status"] == "succeeded"
    assert job["prompt"] == "a red fox"
    assert job["provider_request_id"] == replicate.last_prediction.id
    assert job["delivered_message_ids"] == [photo.message_id]
    (row,) = rows(db_path(app))
    assert row["status"] == "succeeded"
    assert row["chat_id"] == CHAT
    assert row["command_message_id"] == command_id
    assert row["status_message_id"] == sent[0].message_id
    assert row["started_at"] and row["finished_at"] and row["created_at"].endswith("Z")
    assert json.loads(row["delivered_message_ids"]) == [photo.message_id]
    assert telegram.confirmed_update_ids >= {update["update_id"]}


async def test_generate_by_webhook(bot, telegram: FakeTelegram, replicate: FakeReplicate) -> None:
    """Webhook mode: setWebhook is called with the secret and explicit allowed_updates; a POST
    with the secret is answered 200 with an empty body and ends as a photo."""
    async with bot(telegram={"mode": "webhook"}) as app:
        assert telegram.webhook is not None
        assert telegram.webhook.secret_token == WEBHOOK_SECRET
        assert telegram.webhook.allowed_updates == [
            "message",
            "callback_query",
            "pre_checkout_query",
        ]
        update = updates.command("/generate@imagebot_test_bot a lighthouse at dawn")
        status, body = await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        assert (status, body) == (200, "")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    assert telegram.photos(CHAT)[0].caption == "a lighthouse at dawn"
    assert [r["status"] for r in rows(db_path(app))] == ["succeeded"]


async def test_same_update_twice_makes_one_job(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A resent update (same update_id) makes no second job, prediction or photo."""
    async with bot(telegram={"mode": "webhook"}) as app:
        update = updates.command("/generate twin foxes")
        first = await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        second = await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        # Resent again after the job finished, too.
        third = await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        _, listing = await ops_get(app, "/jobs")
    assert first[0] == second[0] == third[0] == 200
    assert len(replicate.creates) == 1
    assert len(telegram.photos(CHAT)) == 1
    generating = [m for m in telegram.messages(CHAT, True) if (m.text or "").startswith("Gener")]
    assert len(generating) == 1
    assert listing["count"] == 1
    (inbox,) = rows(db_path(app), "SELECT * FROM inbox")
    assert inbox["update_id"] == update["update_id"] and inbox["processed_at"]


async def test_webhook_wrong_secret_is_refused(bot, telegram: FakeTelegram) -> None:
    """A POST with a wrong or missing secret gets 403 and nothing is stored or processed."""
    async with bot(telegram={"mode": "webhook"}) as app:
        update = updates.command("/generate sneaky")
        wrong = await updates.post_webhook(webhook_url(app), update, "not-the-secret")
        missing = await updates.post_webhook(webhook_url(app), update, None)
    assert wrong[0] == 403 and missing[0] == 403
    assert rows(db_path(app), "SELECT * FROM inbox") == []
    assert rows(db_path(app)) == []
    assert telegram.messages(CHAT) == []


async def test_webhook_rejects_garbage(bot, telegram: FakeTelegram) -> None:
    """A body that is not an update is answered 400 (with the right secret) and not stored."""
    async with (
        bot(telegram={"mode": "webhook"}) as app,
        aiohttp.ClientSession() as session,
        session.post(
            webhook_url(app),
            data=b"{not json",
            headers={"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET},
        ) as resp,
    ):
        assert resp.status == 400
    assert rows(db_path(app), "SELECT * FROM inbox") == []


async def test_provider_failure_is_told_kindly(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A failed prediction ends the job `failed` with a code, and the chat gets a friendly
    message naming the job, with no vendor internals."""
    replicate.outcome = "failed"
    async with bot() as app:
        telegram.push_update(updates.command("/generate something spicy"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
    (row,) = rows(db_path(app))
    assert row["status"] == "failed"
    assert row["error_code"] == "safety"
    (text,) = telegram.texts(CHAT)
    assert text.startswith("Sorry, job 1 failed: the model refused this request")
    assert "NSFW" not in text and "Traceback" not in text
    assert telegram.photos(CHAT) == []


async def test_empty_and_overlong_prompts_are_refused(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Invalid input gets a reply saying what to fix; nothing is queued or sent to Replicate."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate"))
        telegram.push_update(updates.command("/generate " + "x" * 501))
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
    empty, long = telegram.texts(CHAT)
    assert "Tell me what to draw" in empty
    assert "501 characters; the limit is 500" in long
    assert rows(db_path(app)) == []
    assert replicate.creates == []


async def test_start_and_help(bot, telegram: FakeTelegram) -> None:
    """/start greets and /help lists the commands with examples."""
    async with bot():
        telegram.push_update(updates.command("/start"))
        telegram.push_update(updates.command("/help"))
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2)
    start, help_text = telegram.texts(CHAT)
    assert start.startswith("Hi Alice!")
    assert "/generate" in help_text and "/edit" in help_text and "/usage" in help_text


async def test_restart_polls_the_saved_prediction(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job stopped while its prediction runs is resumed after a restart by polling that
    prediction: no second create, one photo."""
    replicate.latency_s = 3.0
    async with bot() as app:
        telegram.push_update(updates.command("/generate a slow painting"))
        await wait_until(lambda: len(replicate.creates) == 1)
        await wait_until(lambda: rows(db_path(app))[0]["provider_request_id"] is not None)
    (row,) = rows(db_path(app))
    assert row["status"] == "running" and row["phase"] == "submitted"
    assert telegram.photos(CHAT) == []
    async with bot():
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=15)
    assert len(replicate.creates) == 1
    assert replicate.last_prediction.polls >= 1
    (row,) = rows(db_path(app))
    assert row["status"] == "succeeded"
    assert row["provider_request_id"] == replicate.last_prediction.id


async def test_saved_but_unprocessed_update_is_replayed(
    bot, make_settings, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """An update committed to the inbox but not processed (the process died right after the
    ack) is processed at the next start."""
    settings = make_settings()
    update = updates.command("/generate replayed")
    async with bot():
        pass  # create and migrate the database
    execute(
        str(settings.storage.database),
        "INSERT INTO inbox (update_id, kind, received_at, payload) VALUES (?, 'message', ?, ?)",
        (update["update_id"], "2026-01-01T00:00:00.000Z", json.dumps(update)),
    )
    async with bot():
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    assert replicate.creates[0].params["input"]["prompt"] == "replayed"


async def test_token_never_reaches_logs(bot, telegram: FakeTelegram, capsys) -> None:
    """Running a job logs nothing that contains the bot token."""
    from imagebot.logs import configure_logging

    configure_logging(fmt="json", level="DEBUG", secrets=[BOT_TOKEN])
    try:
        async with bot():
            telegram.push_update(updates.command("/generate a red fox"))
            await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    finally:
        out = capsys.readouterr().out
        configure_logging(fmt="console", level="WARNING")
    assert "job_delivered" in out
    assert BOT_TOKEN not in out
    assert BOT_TOKEN.split(":")[1] not in out
    for line in out.splitlines():
        json.loads(line)  # one JSON object per line


async def test_status_counts_in_jobs_listing(bot, telegram: FakeTelegram) -> None:
    """/jobs filters by status and user and caps the page size; unknown ids are 404."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate one"))
        telegram.push_update(updates.command("/generate two", user_id=2002, chat_id=2002))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: len(telegram.photos(2002)) == 1)
        # The photo is sent just before the row says succeeded: wait for both jobs to settle.
        await wait_until(lambda: app.services.runner.running_count == 0)
        _, mine = await ops_get(app, "/jobs?user_id=2002")
        _, done = await ops_get(app, f"/jobs?status={JobStatus.SUCCEEDED.value}&limit=1")
        missing, _ = await ops_get(app, "/jobs/999")
        bad, _ = await ops_get(app, "/jobs?status=weird")
    assert [j["prompt"] for j in mine["jobs"]] == ["two"]
    assert len(done["jobs"]) == 1 and done["next_before"] == done["jobs"][0]["id"]
    assert missing == 404 and bad == 400


async def test_polling_deletes_webhook_and_backs_off(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Polling mode removes any webhook first; a getUpdates error is retried after a pause
    (no spinning), and updates keep flowing afterwards."""
    telegram.fail_method("getUpdates", 502, "Bad Gateway")
    async with bot():
        await wait_until(lambda: len(telegram.calls_of("getUpdates")) >= 2)
        telegram.push_update(updates.command("/generate after the outage"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    first, second = telegram.calls_of("getUpdates")[:2]
    assert second.at - first.at >= 0.9
    assert telegram.calls_of("deleteWebhook")
    assert telegram.calls_of("deleteWebhook")[0].at < first.at


async def test_oversized_result_goes_as_document(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """An output over Telegram's photo limits (aspect ratio > 20) is sent as a document."""
    replicate.image_size = (2100, 100)
    async with bot():
        telegram.push_update(updates.command("/generate a very long banner"))
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1)
    assert telegram.photos(CHAT) == []
    assert telegram.documents(CHAT)[0].caption == "a very long banner"
