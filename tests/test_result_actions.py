"""⤴ Upscale, 🗑 Delete and /history (issue 17), through the real bot and the vendor fakes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from imagebot import texts
from imagebot.bot.callbacks import parse_button_data
from tests import updates
from tests.conftest import SettingsFactory, running
from tests.crash_harness import MakeDaemon
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.support import answer_text, db_path, rows

CHAT = updates.DEFAULT_CHAT_ID
ALICE, BOB, ADMIN = 11, 22, 99
GROUP = -100_900
UPSCALE = {"model": "acme/upscaler", "params": {"scale": 4}, "daily_cap": 5}
GROUP_SETTINGS: dict[str, Any] = {
    "telegram": {"groups_require_mention": False},
    "access": {"open": True, "admins": [ADMIN]},
}


def press(
    telegram: FakeTelegram, on: SentMessage, data: str, user_id: int = CHAT
) -> dict[str, Any]:
    update = updates.callback_query(data, message=updates.bot_message_dict(on), user_id=user_id)
    telegram.push_update(update)
    return update


def buttons(message: SentMessage) -> list[str]:
    markup = message.reply_markup or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


async def answered(telegram: FakeTelegram, update: dict[str, Any]) -> str:
    await wait_until(lambda: answer_text(telegram, update) is not None)
    return str(answer_text(telegram, update))


async def generated(app: Any, telegram: FakeTelegram, chat: int = CHAT, **kw: Any) -> SentMessage:
    """/generate a fox; its photo once the job succeeded."""
    before = len(telegram.photos(chat))
    telegram.push_update(updates.command("/generate a fox", chat_id=chat, **kw))
    await wait_until(lambda: len(telegram.photos(chat)) == before + 1)
    await wait_until(lambda: all(r["status"] == "succeeded" for r in rows(db_path(app))))
    return telegram.photos(chat)[-1]


# -- ⤴ Upscale ------------------------------------------------------------------------------


async def test_upscale_sends_the_result_to_the_upscaler_and_returns_a_file(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """⤴ Upscale under a result: Replicate is asked with [upscale]'s model and params and the
    result's own bytes (a data URI, no prompt, no Telegram URL), and the larger image comes
    back as a file replying to the result, with only 🗑 Delete under it."""
    async with bot(upscale=UPSCALE) as app:
        result = await generated(app, telegram)
        assert "u:1:0" in buttons(result) and "d:1" in buttons(result)
        original = replicate.output_bytes(replicate.last_prediction.id)[0]
        replicate.next_behaviours.append({"image_size": (256, 192)})
        press(telegram, result, "u:1:0")
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1, within=10)
        await wait_until(lambda: rows(db_path(app))[-1]["status"] == "succeeded")
        jobs = rows(db_path(app))
    create = replicate.creates[-1]
    assert create.path == "/v1/models/acme/upscaler/predictions"
    given = dict(create.params["input"])
    image = given.pop("image")
    assert given == {"scale": 4}  # no prompt, no Telegram file URL
    assert image.startswith("data:image/png;base64,")
    assert base64.b64decode(image.partition(",")[2]) == original
    (document,) = telegram.documents(CHAT)
    assert document.file_bytes == replicate.output_bytes(replicate.last_prediction.id)[0]
    assert document.reply_to_message_id == result.message_id
    assert buttons(document) == ["d:2"]
    up = jobs[-1]
    assert (up["kind"], up["parent_job_id"], up["source_index"]) == ("upscale", 1, 0)
    assert up["provider"] == "replicate" and up["prompt"] == "a fox"
    assert json.loads(up["result_file_ids"]) == [document.file_id]
    assert len(replicate.creates) == 2


async def test_upscale_resumes_after_a_restart_mid_wait(
    make_settings: SettingsFactory, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A restart while the upscale prediction runs: the saved prediction is polled, not created
    again, and the file arrives once."""
    settings = make_settings(upscale=UPSCALE)
    async with running(settings) as app:
        result = await generated(app, telegram)
        replicate.next_behaviours.append({"latency_s": 2.5})
        press(telegram, result, "u:1:0")
        await wait_until(
            lambda: len(jobs := rows(db_path(app))) == 2 and jobs[-1]["provider_request_id"]
        )
    up = rows(db_path(app))[-1]
    assert (up["kind"], up["status"], up["phase"]) == ("upscale", "running", "submitted")
    async with running(settings) as app:
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1, within=15)
        await wait_until(lambda: rows(db_path(app))[-1]["status"] == "succeeded")
    assert len(replicate.creates) == 2  # the generation and ONE upscale
    assert rows(db_path(app))[-1]["provider_request_id"] == replicate.last_prediction.id


@pytest.mark.slow
async def test_upscale_resumes_after_kill_9_mid_wait(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """kill -9 while the upscale prediction runs (the real daemon): after the restart the saved
    prediction is polled, not created again, and the file arrives once."""
    bot = daemon(upscale=UPSCALE)
    await bot.start()
    telegram.push_update(updates.command("/generate a fox"))
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=15)
    await bot.wait_jobs(lambda r: r[0]["status"] == "succeeded")
    replicate.next_behaviours.append({"latency_s": 3.0})
    press(telegram, telegram.photos(CHAT)[0], "u:1:0")
    await bot.wait_jobs(lambda r: len(r) == 2 and r[1]["provider_request_id"] is not None)
    await bot.kill()
    assert (bot.job(2)["status"], bot.job(2)["phase"]) == ("running", "submitted")
    await bot.start()
    await telegram.wait_for(lambda: len(telegram.documents(CHAT)) == 1, within=20)
    await bot.wait_jobs(lambda r: r[1]["status"] == "succeeded")
    assert len(replicate.creates) == 2  # the generation and ONE upscale
    assert bot.job(2)["provider_request_id"] == replicate.last_prediction.id
    assert len(telegram.documents(CHAT)) == 1


async def test_upscale_counts_against_its_own_cap(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """[upscale] daily_cap = 0 switches it off: the press is refused in words, no vendor call."""
    async with bot(upscale={**UPSCALE, "daily_cap": 0}) as app:
        result = await generated(app, telegram)
        press(telegram, result, "u:1:0")
        await wait_until(lambda: "Upscale is switched off on this bot." in telegram.texts(CHAT))
        jobs = rows(db_path(app))
    assert len(replicate.creates) == 1
    assert [j["kind"] for j in jobs] == ["generate"]


async def test_no_upscale_button_without_a_model(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With upscale.model empty there is no ⤴ button, and forged ⤴ data makes nothing."""
    async with bot() as app:
        result = await generated(app, telegram)
        assert not [d for d in buttons(result) if d.startswith("u:")]
        forged = press(telegram, result, "u:1:0")
        assert await answered(telegram, forged) == texts.BUTTON_EXPIRED  # not on the message
        jobs = rows(db_path(app))
    assert len(jobs) == 1 and len(replicate.creates) == 1


# -- 🗑 Delete ------------------------------------------------------------------------------


async def test_delete_by_requester_or_admin_only(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """In a group a stranger's 🗑 is refused with a short notice and deletes nothing (nor does
    his ⤴ upscale anything); the requester's deletes the result and the row records who; an
    admin may delete another member's result."""
    async with bot(**GROUP_SETTINGS, upscale=UPSCALE) as app:
        first = await generated(app, telegram, chat=GROUP, user_id=ALICE)
        second = await generated(app, telegram, chat=GROUP, user_id=ALICE)
        stranger = press(telegram, first, "d:1", BOB)
        stranger_up = press(telegram, first, "u:1:0", BOB)
        assert await answered(telegram, stranger) == texts.NOT_YOUR_JOB
        assert await answered(telegram, stranger_up) == texts.NOT_YOUR_JOB
        assert not first.deleted and rows(db_path(app))[0]["deleted_at"] is None
        mine = press(telegram, first, "d:1", ALICE)
        assert await answered(telegram, mine) == texts.DELETED
        admin = press(telegram, second, "d:2", ADMIN)
        assert await answered(telegram, admin) == texts.DELETED
        jobs = rows(db_path(app))
    assert first.deleted and second.deleted
    assert (jobs[0]["deleted_by"], jobs[1]["deleted_by"]) == (ALICE, ADMIN)
    assert jobs[0]["deleted_at"] and jobs[1]["deleted_at"]
    assert len(jobs) == 2 and len(replicate.creates) == 2  # the stranger's ⤴ made nothing
    # the press's answer popped up as an alert for the stranger only
    alerts = {r["callback_query_id"]: r.get("show_alert") for r in telegram.answered_callbacks}
    assert alerts[stranger["callback_query"]["id"]] is True


async def test_delete_removes_every_message_of_a_multi_image_result(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Two images (an album and its button message): 🗑 removes all three messages."""
    async with bot(generate={"params": {"num_outputs": 2}}) as app:
        telegram.push_update(updates.command("/generate two foxes"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "succeeded")
        keyboard = next(m for m in telegram.messages(CHAT) if "d:1" in buttons(m))
        update = press(telegram, keyboard, "d:1")
        assert await answered(telegram, update) == texts.DELETED
        (job,) = rows(db_path(app))
    assert telegram.photos(CHAT) == []
    gone = json.loads(job["delivered_message_ids"])
    assert len(gone) == 3
    assert all(m.deleted for m in telegram.messages(CHAT, True) if m.message_id in gone)


# -- /history -------------------------------------------------------------------------------


async def test_history_lists_and_resends_from_file_ids(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/history lists the last finished jobs (when, kind, prompt, status) with a button each;
    pressing one sends the result again by its Telegram file_id: nothing uploaded, no provider
    call, no new job, no quota used."""
    async with bot() as app:
        result = await generated(app, telegram)
        replicate.next_behaviours.append({"outcome": "failed"})
        telegram.push_update(updates.command("/generate a broken fox"))
        await wait_until(lambda: rows(db_path(app))[-1]["status"] == "failed")
        telegram.push_update(updates.command("/history"))
        await wait_until(lambda: any("last requests" in t for t in telegram.texts(CHAT)))
        listing = next(m for m in telegram.messages(CHAT) if "last requests" in (m.text or ""))
        files_before, calls_before = len(telegram.files), len(replicate.calls)
        jobs_before = [dict(r) for r in rows(db_path(app))]
        update = press(telegram, listing, "g:1")
        assert await answered(telegram, update) == texts.HISTORY_SENDING
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        usage_after = [dict(r) for r in rows(db_path(app))]
    assert buttons(listing) == ["g:1"]  # the failed job has nothing to send again
    text = listing.text or ""
    assert "“a broken fox” (failed)" in text and "“a fox” (done)" in text
    assert text.index("a broken fox") < text.index("“a fox”")  # newest first
    assert "UTC" in text and "Generate" in text
    again = telegram.photos(CHAT)[-1]
    assert again.file_id == result.file_id
    assert again.reply_to_message_id == listing.message_id
    assert len(telegram.files) == files_before  # nothing was uploaded
    assert len(replicate.calls) == calls_before  # no provider call
    assert usage_after == jobs_before  # no job, nothing counted
    assert all(parse_button_data(d) is not None for d in buttons(listing))


async def test_history_resends_an_upscale_as_a_file_and_refuses_strangers(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """An upscaled result comes back from /history as the same file (by file_id); a stranger
    pressing the requester's /history entry, or a /history entry naming someone else's job,
    gets a short answer and nothing is sent."""
    async with bot(**GROUP_SETTINGS, upscale=UPSCALE) as app:
        result = await generated(app, telegram, chat=GROUP, user_id=ALICE)
        press(telegram, result, "u:1:0", ALICE)
        await wait_until(lambda: len(telegram.documents(GROUP)) == 1, within=10)
        await wait_until(lambda: rows(db_path(app))[-1]["status"] == "succeeded")
        telegram.push_update(updates.command("/history", chat_id=GROUP, user_id=ALICE))
        await wait_until(lambda: any("last requests" in t for t in telegram.texts(GROUP)))
        listing = next(m for m in telegram.messages(GROUP) if "last requests" in (m.text or ""))
        assert buttons(listing) == ["g:2", "g:1"]
        stranger = press(telegram, listing, "g:2", BOB)
        assert await answered(telegram, stranger) == texts.NOT_YOUR_JOB
        forged = press(telegram, listing, "g:3", ALICE)  # not on the message
        assert await answered(telegram, forged) == texts.BUTTON_EXPIRED
        files_before = len(telegram.files)
        mine = press(telegram, listing, "g:2", ALICE)
        assert await answered(telegram, mine) == texts.HISTORY_SENDING
        await wait_until(lambda: len(telegram.documents(GROUP)) == 2)
    first, second = telegram.documents(GROUP)
    assert second.file_id == first.file_id and second.method == "sendDocument"
    assert len(telegram.files) == files_before
    assert len(telegram.photos(GROUP)) == 1


async def test_history_says_so_when_telegram_lost_the_file(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A recorded file_id Telegram no longer knows: the press is answered with a notice, the
    provider is not asked, and nothing is made."""
    async with bot() as app:
        result = await generated(app, telegram)
        assert result.file_id is not None
        telegram.files.pop(result.file_id)
        telegram.push_update(updates.command("/history"))
        await wait_until(lambda: any("last requests" in t for t in telegram.texts(CHAT)))
        listing = telegram.messages(CHAT)[-1]
        update = press(telegram, listing, "g:1")
        assert await answered(telegram, update) == texts.HISTORY_GONE
        jobs = rows(db_path(app))
    assert len(telegram.photos(CHAT)) == 1
    assert len(jobs) == 1 and len(replicate.creates) == 1


async def test_history_empty(bot, telegram: FakeTelegram) -> None:
    """/history with nothing finished yet says so in words, with an example."""
    async with bot():
        telegram.push_update(updates.command("/history"))
        await wait_until(lambda: texts.HISTORY_EMPTY in telegram.texts(CHAT))
