"""Users who are not allowed cost one saved row per update and at most one refusal notice per
interval, whatever they send; nothing of theirs reaches a vendor or downloads a file."""

from __future__ import annotations

from typing import Any

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows, scrape, value

ALLOWED = updates.DEFAULT_USER_ID
STRANGER = 4242
GROUP = -100_4242  # not on the allowlist: only ALLOWED may use the bot there


def stranger_updates(result: dict[str, Any], job_id: int, file_id: str) -> list[dict[str, Any]]:
    """One of everything a stranger can send: commands, text, media, and presses of every
    button under an allowed user's result in a shared group."""
    me: dict[str, Any] = {"user_id": STRANGER, "chat_id": STRANGER, "username": "mallory"}
    in_group: dict[str, Any] = {"user_id": STRANGER, "chat_id": GROUP, "username": "mallory"}
    bot = "@imagebot_test_bot"
    return [
        updates.command("/start", **me),
        updates.command("/help", **me),
        updates.command("/generate a free fox", **me),
        updates.command("/edit make it night", **me),
        updates.command("/usage", **me),
        updates.command("/cancel", **me),
        updates.command("/whatever", **me),
        updates.text_message("hello?", **me),
        updates.photo_message(file_id, **me),
        updates.photo_message(file_id, caption="/edit make it night", **me),
        updates.document_message(file_id, caption="/edit sharper", **me),
        updates.sticker_message(**me),
        updates.video_message(**me),
        updates.command("/edit make it night", reply_to=result, **in_group),
        updates.command(f"/generate{bot} a group fox", **in_group),
        updates.command(f"/help{bot}", **in_group),
        updates.callback_query(f"a:{job_id}", message=result, **in_group),
        updates.callback_query(f"e:{job_id}:0", message=result, **in_group),
        updates.callback_query(f"o:{job_id}:0", message=result, **in_group),
        updates.callback_query(f"x:{job_id}", message=result, **in_group),
        updates.callback_query("garbage", message=result, **in_group),
    ]


async def test_a_stranger_flood_costs_rows_and_one_notice(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """Three rounds of everything a stranger can send (commands, text, photos, files,
    stickers, button presses on a real result): every update is saved and closed, the stranger
    gets exactly one notice (with their id), every press is answered with a short toast, and
    no vendor call, job or Telegram file download comes of it."""
    async with bot(access={"open": False, "users": [ALLOWED]}) as app:
        path = db_path(app)
        photo = telegram.add_file(b"\x89PNG not really")  # getFile would find it
        telegram.push_update(updates.command("/generate@imagebot_test_bot a fox", chat_id=GROUP))
        await wait_until(lambda: len(telegram.photos(GROUP)) == 1)
        result = updates.bot_message_dict(telegram.photos(GROUP)[0])
        await wait_until(lambda: app.services.runner.running_count == 0)
        vendor_calls = len(replicate.calls) + len(fal.calls)
        sent_before = len(telegram.all_sent(include_deleted=True))
        flood = [u for _ in range(3) for u in stranger_updates(result, 1, photo)]
        for update in flood:
            telegram.push_update(update)
        ids = {u["update_id"] for u in flood}
        presses = [u for u in flood if "callback_query" in u]
        await wait_until(lambda: len(telegram.answered_callbacks) == len(presses))
        await wait_until(
            lambda: all(
                r["processed_at"]
                for r in rows(path, "SELECT * FROM inbox")
                if r["update_id"] in ids
            )
        )
        # Someone allowed is still served afterwards (and shows the bot caught up).
        telegram.push_update(updates.command("/help"))
        await wait_until(lambda: len(telegram.texts(ALLOWED)) == 1)
        samples = await scrape(app)
        sent = telegram.all_sent(include_deleted=True)[sent_before:]

    saved = [r for r in rows(path, "SELECT * FROM inbox") if r["update_id"] in ids]
    notices = [m for m in sent if m.chat_id in (STRANGER, GROUP)]
    print(  # noqa: T201
        f"strangers: {len(flood)} updates sent, {len(saved)} rows saved,"
        f" {len(notices)} notices, {len(telegram.answered_callbacks)} presses answered,"
        f" {len(replicate.calls) + len(fal.calls) - vendor_calls} vendor calls,"
        f" {len(telegram.calls_of('getFile'))} getFile"
    )
    assert len(saved) == len(flood) and all(r["failure"] is None for r in saved)
    (notice,) = notices
    assert str(STRANGER) in (notice.text or "") and "private" in (notice.text or "")
    assert len(replicate.calls) + len(fal.calls) == vendor_calls
    assert telegram.calls_of("getFile") == []
    assert [r["prompt"] for r in rows(path)] == ["a fox"]  # the allowed user's job only
    toasts = {a.get("text") for a in telegram.answered_callbacks}
    assert len(toasts) == 1 and str(STRANGER) in str(toasts.pop())
    assert value(samples, "imagebot_refusals_total", reason="allowlist") >= len(flood) - 3 * 2


async def test_a_strangers_start_greets_once_per_interval(bot, telegram: FakeTelegram) -> None:
    """/start from a stranger gets the greeting with their id once; repeats inside the
    interval (and anything else) stay unanswered; after the interval the notice comes again."""
    async with bot(access={"open": False, "refusal_notice_interval_s": 0}) as app:
        first = updates.command("/start", user_id=STRANGER, chat_id=STRANGER)
        telegram.push_update(first)
        await wait_until(lambda: len(telegram.texts(STRANGER)) == 1)
        # An interval of 0: the next one may be told again.
        telegram.push_update(updates.command("/generate x", user_id=STRANGER, chat_id=STRANGER))
        await wait_until(lambda: len(telegram.texts(STRANGER)) == 2)
    greeting, notice = telegram.texts(STRANGER)
    assert greeting.startswith("Hi Alice!") and str(STRANGER) in greeting
    assert notice.startswith("Sorry, this bot is private") and str(STRANGER) in notice
    assert rows(db_path(app)) == []
