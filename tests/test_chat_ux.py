"""The chat experience through the real Application: progress, cancel, buttons, captions,
/usage — what the user sees in the chat."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.storeview import execute
from tests.support import answer, button_data, db_path, press, rows

CHAT = updates.DEFAULT_CHAT_ID


def status_message(telegram: FakeTelegram, chat: int = CHAT) -> SentMessage:
    """The bot's first text message in the chat: the "Generating…" status line."""
    return next(m for m in telegram.messages(chat, include_deleted=True) if m.kind == "text")


async def test_progress_edits_are_throttled_and_action_renewed(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """While the provider works the status shows elapsed time (at most one edit per interval)
    and 'sending photo' is renewed; the status line goes once the photo arrives."""
    replicate.latency_s = 4.5
    async with bot(progress={"edit_interval_s": 1, "chat_action_interval_s": 1}):
        telegram.push_update(updates.command("/generate a slow sunrise"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=15)
        await wait_until(lambda: status_message(telegram).deleted)
    status = status_message(telegram)
    texts = [e["text"] for e in status.edits]
    assert 1 <= len(texts) <= 5
    assert all(t.startswith("Generating… ") and t.endswith("s (job 1)") for t in texts)
    times = [e["at"] for e in status.edits]
    assert all(b - a >= 0.9 for a, b in pairwise(times))
    assert status.deleted
    actions = telegram.chat_actions(CHAT)
    assert len(actions) >= 3
    assert {a for a, _ in actions} == {"upload_photo"}
    gaps = [b - a for (_, a), (_, b) in pairwise(actions)]
    assert all(g >= 0.9 for g in gaps)


async def test_cancel_command_cancels_at_vendor_and_refunds(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/cancel stops the running job, cancels the prediction, and the unit comes back."""
    replicate.latency_s = 20
    async with bot(generate={"daily_cap": 1}) as app:
        telegram.push_update(updates.command("/generate never mind"))
        await wait_until(lambda: len(replicate.predictions) == 1)
        telegram.push_update(updates.command("/cancel"))
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "canceled")
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
    assert replicate.last_prediction.canceled
    assert len(replicate.cancels) == 1
    assert status_message(telegram).text.startswith("Canceled (job 1)")
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Generate: 0 of 1 used, 1 left" in usage


async def test_cancel_button_only_for_the_owner(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """The ✖ button on the status message: another user is told no, the owner cancels."""
    replicate.latency_s = 20
    group = -100_500
    async with bot(telegram={"groups_require_mention": False}) as app:
        telegram.push_update(updates.command("/generate group art", chat_id=group, user_id=11))
        await wait_until(lambda: len(replicate.predictions) == 1)
        status = status_message(telegram, group)
        assert button_data(status) == ["x:1"]
        stranger = press(telegram, status, "x:1", user_id=22)
        await wait_until(lambda: answer(telegram, stranger) is not None)
        owner = press(telegram, status, "x:1", user_id=11)
        await wait_until(lambda: answer(telegram, owner) is not None)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "canceled")
    assert answer(telegram, stranger)["text"] == "That isn't your request."
    assert answer(telegram, owner)["text"] == "Canceled."
    assert len(replicate.cancels) == 1


def statuses(app: Any) -> dict[str, str]:
    return {r["prompt"]: r["status"] for r in rows(db_path(app))}


async def test_queued_job_can_be_canceled(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job still waiting in line is canceled without ever reaching the vendor."""
    replicate.latency_s = 3
    async with bot(runner={"max_running": 1}) as app:
        telegram.push_update(updates.command("/generate first"))
        await wait_until(lambda: len(replicate.creates) == 1)  # the one slot is taken
        telegram.push_update(updates.command("/generate second", user_id=2, chat_id=2))
        await wait_until(lambda: len(rows(db_path(app))) == 2)
        telegram.push_update(updates.command("/cancel", user_id=2, chat_id=2))
        await wait_until(lambda: statuses(app)["second"] == "canceled")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
    assert len(replicate.creates) == 1
    assert replicate.creates[0].params["input"]["prompt"] == "first"
    assert statuses(app) == {"first": "succeeded", "second": "canceled"}


async def test_result_buttons_work_after_restart(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """Under a result: 🔁 Again makes a new job with the same prompt, 📎 Original sends the
    full file as a document without a provider call, ✏️ Edit this edits that very photo —
    and all of it still works after a restart (the data lives in SQLite)."""
    async with bot():
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    result = telegram.photos(CHAT)[0]
    # then 🗑 Delete, the shape row and 🎨 Remix (see test_creative.py, test_result_actions.py)
    assert button_data(result)[:4] == ["a:1", "e:1:0", "o:1:0", "d:1"]
    original_bytes = replicate.output_bytes(replicate.last_prediction.id)[0]

    async with bot() as app:
        q_original = press(telegram, result, "o:1:0")
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1)
        assert len(replicate.creates) == 1  # no provider call for the original
        q_again = press(telegram, result, "a:1")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        q_edit = press(telegram, result, "e:1:0")
        await wait_until(lambda: any("What should I change" in t for t in telegram.texts(CHAT)))
        telegram.push_update(updates.text_message("make it blue"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3)

    document = telegram.documents(CHAT)[0]
    assert document.file_bytes == original_bytes
    assert document.reply_to_message_id == result.message_id
    jobs = rows(db_path(app))
    assert [(j["kind"], j["prompt"], j["parent_job_id"]) for j in jobs] == [
        ("generate", "a red fox", None),
        ("generate", "a red fox", 1),
        ("edit", "make it blue", None),
    ]
    assert jobs[2]["input_file_id"] == result.file_id
    assert fal.last_request.received_images == [telegram.file_bytes(result.file_id)]
    for query in (q_original, q_again, q_edit):
        assert answer(telegram, query) is not None


async def test_again_counts_against_the_cap(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """🔁 Again goes through every guard: at the daily cap it is refused."""
    async with bot(generate={"daily_cap": 1}) as app:
        telegram.push_update(updates.command("/generate only once"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        press(telegram, telegram.photos(CHAT)[0], "a:1")
        await wait_until(lambda: any("You've used all" in t for t in telegram.texts(CHAT)))
    assert len(rows(db_path(app))) == 1


async def test_expired_and_unknown_buttons_are_answered(bot, telegram: FakeTelegram) -> None:
    """A press on a button whose job is gone, or on garbage data, gets a short answer."""
    async with bot():
        telegram.push_update(updates.command("/help"))
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
        message = telegram.messages(CHAT)[0]
        queries = [
            press(telegram, message, data) for data in ("a:999", "o:999:0", "e:999:0", "zzz")
        ]
        await wait_until(lambda: all(answer(telegram, q) for q in queries))
    for query in queries:
        assert answer(telegram, query)["text"] == "This button has expired."


async def test_original_gone_after_retention(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """When the stored result was pruned, 📎 Original says so instead of failing silently."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate ephemeral"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        results_dir = app.services.settings.storage.results_dir
        for path in results_dir.glob("*"):
            path.unlink()
        execute(db_path(app), "DELETE FROM result_blobs")  # where PostgreSQL keeps them
        query = press(telegram, telegram.photos(CHAT)[0], "o:1:0")
        await wait_until(lambda: answer(telegram, query) is not None)
    assert answer(telegram, query)["text"] == "The original file isn't kept any more."
    assert telegram.documents(CHAT) == []


async def test_caption_is_trimmed_to_telegram_limit(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A prompt longer than a caption may be is trimmed to 1024 characters with an ellipsis."""
    prompt = "a very detailed scene " * 90
    async with bot(limits={"max_prompt_chars": 4000}):
        telegram.push_update(updates.command(f"/generate {prompt}"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    caption = telegram.photos(CHAT)[0].caption or ""
    assert len(caption) <= 1024
    assert caption.endswith("…")
    assert caption.startswith("a very detailed scene a very")
    assert replicate.creates[0].params["input"]["prompt"] == prompt.strip()


async def test_caption_keeps_markup_literal(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Markup-looking text in a prompt is shown as typed, never parsed as formatting."""
    async with bot():
        telegram.push_update(updates.command("/generate <b>bold</b> *stars* _under_"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    assert telegram.photos(CHAT)[0].caption == "<b>bold</b> *stars* _under_"


async def test_usage_numbers(bot, telegram: FakeTelegram, replicate: FakeReplicate) -> None:
    """/usage counts today's charged jobs per operation; failures don't count."""
    replicate.next_behaviours.append({"outcome": "failed"})
    async with bot(generate={"daily_cap": 10}, edit={"daily_cap": 5}):
        telegram.push_update(updates.command("/generate fails"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        telegram.push_update(updates.command("/generate works"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Generate: 1 of 10 used, 9 left" in usage
    assert "Edit: 0 of 5 used, 5 left" in usage


async def test_several_outputs_arrive_as_an_album(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """num_outputs = 3: one album with the caption on the first photo, then the buttons."""
    async with bot(generate={"params": {"num_outputs": 3}}) as app:
        telegram.push_update(updates.command("/generate three foxes"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "succeeded")
    photos = telegram.photos(CHAT)
    assert len({p.media_group_id for p in photos}) == 1
    assert [p.caption for p in photos] == ["three foxes", None, None]
    buttons = [m for m in telegram.messages(CHAT) if m.reply_markup and m.kind == "text"]
    assert button_data(buttons[-1]) == [
        *["a:1", "o:1:*", "e:1:0", "e:1:1", "e:1:2", "d:1"],
        *["h:1:square", "h:1:portrait", "h:1:landscape", "r:1"],
    ]
