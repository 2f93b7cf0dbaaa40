"""The fake Telegram server, driven through PTB's real telegram.Bot over loopback HTTP."""

from __future__ import annotations

import os

os.environ["PTB_TIMEDELTA"] = "true"  # RetryAfter.retry_after as timedelta, no deprecation warning

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, InputMediaPhoto
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, RetryAfter

from tests import updates
from tests.fakes.images import image_size, make_image
from tests.fakes.telegram_api import NOT_MODIFIED, FakeTelegram

CHAT = 4242


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def make_bot(fake: FakeTelegram, token: str | None = None) -> Bot:
    return Bot(
        token or fake.token,
        base_url=f"{fake.url}/bot",
        base_file_url=f"{fake.url}/file/bot",
    )


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with make_bot(fake) as real_bot:
        yield real_bot


class Receiver:
    """A tiny webhook endpoint on 127.0.0.1 that can be told to fail."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, object], str | None, str]] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        secret = request.headers.get("X-Telegram-Bot-Api-Secret-Token")
        self.received.append((body, secret, request.headers.get("Content-Type", "")))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.stop()


async def test_get_me_returns_the_configured_bot(bot: Bot, fake: FakeTelegram) -> None:
    """getMe (sent by Bot.initialize) answers with the fake's username and id."""
    me = await bot.get_me()
    assert me.username == "imagebot_test_bot"
    assert me.id == fake.bot_id
    assert me.is_bot
    assert fake.calls_of("getMe")


async def test_wrong_token_is_unauthorized(fake: FakeTelegram) -> None:
    """A bot with another token gets 401, which PTB raises as InvalidToken."""
    with pytest.raises(InvalidToken):
        async with make_bot(fake, token="999:wrong"):
            pass


async def test_send_message_and_reply(bot: Bot, fake: FakeTelegram) -> None:
    """sendMessage records the text and markup; a reply carries reply_to_message."""
    markup = InlineKeyboardMarkup([[InlineKeyboardButton("again", callback_data="again")]])
    first = await bot.send_message(CHAT, "hello", reply_markup=markup)
    second = await bot.send_message(CHAT, "a reply", reply_to_message_id=first.message_id)
    assert first.chat.type == "private"
    assert first.from_user is not None
    assert first.from_user.username == "imagebot_test_bot"
    assert first.reply_markup == markup
    assert second.reply_to_message is not None
    assert second.reply_to_message.message_id == first.message_id
    assert second.message_id > first.message_id
    assert fake.texts(CHAT) == ["hello", "a reply"]
    sent = fake.messages(CHAT)
    assert sent[1].reply_to_message_id == first.message_id
    assert sent[0].reply_markup == markup.to_dict()
    assert fake.calls_of("sendMessage")[0].params["chat_id"] == CHAT


async def test_reply_to_missing_message_is_refused_unless_allowed(bot: Bot) -> None:
    """Replying to an unknown message fails unless allow_sending_without_reply is set."""
    missing = updates.last_message_id() + 1000
    with pytest.raises(BadRequest, match=r"(?i)message to be replied not found"):
        await bot.send_message(CHAT, "x", reply_to_message_id=missing)
    sent = await bot.send_message(
        CHAT, "x", reply_to_message_id=missing, allow_sending_without_reply=True
    )
    assert sent.reply_to_message is None


async def test_text_limits(bot: Bot) -> None:
    """Empty and over-long texts get Telegram's 400 answers."""
    with pytest.raises(BadRequest, match=r"(?i)message text is empty"):
        await bot.send_message(CHAT, " ")
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(CHAT, "x" * 4097)
    with pytest.raises(BadRequest, match=r"(?i)message caption is too long"):
        await bot.send_photo(CHAT, make_image(), caption="c" * 1025)


async def test_send_photo_then_download_the_same_bytes(bot: Bot, fake: FakeTelegram) -> None:
    """An uploaded photo gets a file_id whose getFile + download return the uploaded bytes."""
    data = make_image(80, 60)
    message = await bot.send_photo(CHAT, data, caption="done", filename="out.png")
    largest = max(message.photo, key=lambda p: p.width * p.height)
    assert (largest.width, largest.height) == (80, 60)
    assert message.caption == "done"
    tg_file = await bot.get_file(largest.file_id)
    assert bytes(await tg_file.download_as_bytearray()) == data
    assert fake.file_downloads == [fake.files[largest.file_id].file_path]
    assert fake.photos(CHAT)[0].file_bytes == data
    upload = fake.calls_of("sendPhoto")[0].params["_files"]["photo"]
    assert upload == ("out.png", "image/png", data)
    # Sending the same file_id again reuses the stored file.
    again = await bot.send_photo(CHAT, largest.file_id)
    assert again.photo[-1].file_unique_id == largest.file_unique_id


async def test_bad_photo_dimensions_are_refused(bot: Bot, fake: FakeTelegram) -> None:
    """A photo with an aspect ratio over 20 gets PHOTO_INVALID_DIMENSIONS and no message."""
    with pytest.raises(BadRequest, match=r"(?i)PHOTO_INVALID_DIMENSIONS"):
        await bot.send_photo(CHAT, make_image(420, 20))
    assert fake.messages(CHAT) == []


async def test_user_file_and_size_limit(bot: Bot, fake: FakeTelegram) -> None:
    """add_file registers a user's file; a claimed size over 20 MB gets 'file is too big'."""
    data = make_image(30, 20)
    small = fake.add_file(data)
    tg_file = await bot.get_file(small)
    assert bytes(await tg_file.download_as_bytearray()) == data
    big = fake.add_file(b"x", file_size=25_000_000)
    with pytest.raises(BadRequest, match=r"(?i)file is too big"):
        await bot.get_file(big)


async def test_send_media_group_of_two_photos(bot: Bot, fake: FakeTelegram) -> None:
    """sendMediaGroup returns one Message per photo, sharing a media_group_id."""
    images = [make_image(40, 30, (10, 20, 30)), make_image(50, 40, (90, 80, 70))]
    media = [InputMediaPhoto(images[0], caption="first"), InputMediaPhoto(images[1])]
    messages = await bot.send_media_group(CHAT, media)
    assert len(messages) == 2
    assert messages[0].media_group_id is not None
    assert messages[0].media_group_id == messages[1].media_group_id
    assert messages[0].caption == "first"
    assert [image_size(m.file_bytes or b"") for m in fake.photos(CHAT)] == [(40, 30), (50, 40)]
    tg_file = await bot.get_file(messages[1].photo[-1].file_id)
    assert bytes(await tg_file.download_as_bytearray()) == images[1]
    with pytest.raises(BadRequest):
        await bot.send_media_group(CHAT, [InputMediaPhoto(images[0])])


async def test_edit_message_text_and_not_modified(bot: Bot, fake: FakeTelegram) -> None:
    """Editing changes the text; editing to the same content is 'message is not modified'."""
    sent = await bot.send_message(CHAT, "Generating…")
    edited = await bot.edit_message_text("Done", chat_id=CHAT, message_id=sent.message_id)
    assert not isinstance(edited, bool)
    assert edited.text == "Done"
    assert edited.edit_date is not None
    assert fake.texts(CHAT) == ["Done"]
    assert fake.messages(CHAT)[0].edits[0]["text"] == "Done"
    with pytest.raises(BadRequest) as info:
        await bot.edit_message_text("Done", chat_id=CHAT, message_id=sent.message_id)
    # PTB drops the "Bad Request: " prefix and capitalizes the rest.
    assert info.value.message == NOT_MODIFIED.removeprefix("Bad Request: ").capitalize()
    with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
        await bot.edit_message_text("x", chat_id=CHAT, message_id=sent.message_id + 10_000)


async def test_delete_message(bot: Bot, fake: FakeTelegram) -> None:
    """deleteMessage hides the message; deleting or editing it again is 'not found'."""
    sent = await bot.send_message(CHAT, "bye")
    assert await bot.delete_message(CHAT, sent.message_id)
    assert fake.messages(CHAT) == []
    assert fake.messages(CHAT, include_deleted=True)[0].deleted
    with pytest.raises(BadRequest, match=r"(?i)message to delete not found"):
        await bot.delete_message(CHAT, sent.message_id)
    with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
        await bot.edit_message_text("x", chat_id=CHAT, message_id=sent.message_id)


async def test_fault_429_raises_retry_after(bot: Bot, fake: FakeTelegram) -> None:
    """A scripted 429 with retry_after surfaces as RetryAfter; the next call succeeds."""
    fake.fail_method("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    with pytest.raises(RetryAfter) as info:
        await bot.send_message(CHAT, "x")
    assert info.value.retry_after == dt.timedelta(seconds=1)
    await bot.send_message(CHAT, "x")
    assert len(fake.calls_of("sendMessage")) == 2
    assert fake.texts(CHAT) == ["x"]


async def test_fault_403_raises_forbidden(bot: Bot, fake: FakeTelegram) -> None:
    """A scripted 403 surfaces as Forbidden with Telegram's description."""
    fake.fail_method("sendphoto", 403, "Forbidden: bot was blocked by the user")
    with pytest.raises(Forbidden, match=r"(?i)bot was blocked by the user"):
        await bot.send_photo(CHAT, make_image())
    assert fake.photos(CHAT) == []


async def test_get_updates_long_poll_and_offset(bot: Bot, fake: FakeTelegram) -> None:
    """A long poll returns as soon as an update is pushed; a higher offset confirms it."""
    update = updates.command("/start")
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_for(lambda: bool(fake.calls_of("getUpdates")), within=2)
    fake.push_update(update)
    got = await asyncio.wait_for(poll, 2)
    assert [u.update_id for u in got] == [update["update_id"]]
    assert got[0].message is not None
    assert got[0].message.text == "/start"
    # Not confirmed yet: polling again without offset returns it again.
    assert [u.update_id for u in await bot.get_updates()] == [update["update_id"]]
    assert await bot.get_updates(offset=update["update_id"] + 1) == ()
    assert update["update_id"] in fake.confirmed_update_ids
    assert fake.pending_update_count == 0


async def test_get_updates_conflicts_with_webhook(bot: Bot, receiver: Receiver) -> None:
    """getUpdates is refused with 409 while a webhook is set."""
    await bot.set_webhook(receiver.url)
    with pytest.raises(Conflict):
        await bot.get_updates()
    await bot.delete_webhook()
    assert await bot.get_updates() == ()


async def test_set_webhook_refuses_non_loopback(bot: Bot) -> None:
    """The fake never delivers off the machine: a public webhook URL is a bad webhook."""
    with pytest.raises(BadRequest, match=r"(?i)bad webhook"):
        await bot.set_webhook("https://example.com/hook")


async def test_webhook_delivery_with_secret_and_retry(
    bot: Bot, fake: FakeTelegram, receiver: Receiver
) -> None:
    """A pushed update is POSTed as JSON with the secret header, retried after a 500."""
    fake.webhook_retry_delay = 0.05
    receiver.statuses = [500]
    await bot.set_webhook(receiver.url, secret_token="s3cret-Token_1")
    update = updates.command("/generate a red fox")
    fake.push_update(update)
    await fake.wait_for(lambda: update["update_id"] in fake.webhook_acked_update_ids, 2)
    assert len(receiver.received) == 2
    body, secret, content_type = receiver.received[-1]
    assert body == update
    assert secret == "s3cret-Token_1"
    assert content_type == "application/json"
    assert [status for _, status, _ in fake.webhook_deliveries] == [500, 200]
    info = await bot.get_webhook_info()
    assert info.url == receiver.url
    assert info.pending_update_count == 0
    assert "500" in (info.last_error_message or "")


async def test_webhook_keeps_order_within_a_chat(
    bot: Bot, fake: FakeTelegram, receiver: Receiver
) -> None:
    """Updates of one chat arrive in order, each after the previous one was acknowledged."""
    fake.webhook_retry_delay = 0.02
    receiver.statuses = [503, 503]
    await bot.set_webhook(receiver.url)
    first, second = updates.text_message("one"), updates.text_message("two")
    fake.push_update(first)
    fake.push_update(second)
    await fake.wait_for(lambda: fake.pending_update_count == 0, 2)
    order = [body["update_id"] for body, _, _ in receiver.received]
    assert order == [first["update_id"]] * 3 + [second["update_id"]]


async def test_webhook_waits_for_a_receiver_that_is_down(
    bot: Bot, fake: FakeTelegram, receiver: Receiver
) -> None:
    """Connection errors keep the update pending until the receiver answers again."""
    fake.webhook_retry_delay = 0.02
    await bot.set_webhook(receiver.url)
    await receiver.stop()
    update = updates.text_message("while down")
    fake.push_update(update)
    await fake.wait_for(lambda: len(fake.webhook_deliveries) >= 2, 2)
    assert all(status == 0 for _, status, _ in fake.webhook_deliveries)
    assert fake.pending_update_count == 1
    # Deleting the webhook keeps the update for polling.
    await bot.delete_webhook()
    assert [u.update_id for u in await bot.get_updates()] == [update["update_id"]]


async def test_flood_mode_refuses_second_message_within_a_second(
    bot: Bot, fake: FakeTelegram
) -> None:
    """With flood control on, a second message to one private chat within 1 s gets 429."""
    fake.enforce_flood()
    await bot.send_message(CHAT, "first")
    with pytest.raises(RetryAfter) as info:
        await bot.send_message(CHAT, "second")
    assert info.value.retry_after == dt.timedelta(seconds=1)
    assert fake.flood_429s == 1
    assert fake.texts(CHAT) == ["first"]
    await bot.send_message(CHAT + 1, "another chat is fine")


async def test_chat_action_and_callback_answer(bot: Bot, fake: FakeTelegram) -> None:
    """sendChatAction and answerCallbackQuery are recorded for assertions."""
    assert await bot.send_chat_action(CHAT, "upload_photo")
    assert [action for action, _ in fake.chat_actions(CHAT)] == ["upload_photo"]
    assert await bot.answer_callback_query("cbq-1", text="ok")
    assert fake.answered_callbacks[0]["text"] == "ok"


async def test_update_builders_parse_with_ptb(bot: Bot, fake: FakeTelegram) -> None:
    """The builders produce updates PTB parses, incl. UTF-16 entity lengths and bot replies."""
    command = updates.to_update(updates.command("/édit@imagebot_test_bot 🦊 blue"), bot)
    assert command.message is not None
    assert command.message.entities[0].length == len("/édit@imagebot_test_bot")
    assert command.message.parse_entity(command.message.entities[0]) == "/édit@imagebot_test_bot"
    assert updates.utf16_len("/a🦊") == 4
    sent = await bot.send_photo(CHAT, make_image(), filename="r.png")
    photo = updates.photo_message(
        "user-photo",
        caption="/edit 🦊 make it blue",
        reply_to=updates.bot_message_dict(fake.photos(CHAT)[0]),
        chat_id=CHAT,
    )
    parsed = updates.to_update(photo, bot)
    assert parsed.message is not None
    assert parsed.message.caption_entities[0].length == 5
    assert parsed.message.photo[-1].file_id == "user-photo"
    assert parsed.message.reply_to_message is not None
    assert parsed.message.reply_to_message.message_id == sent.message_id
    press = updates.to_update(
        updates.callback_query("again", message=updates.bot_message_dict(fake.photos(CHAT)[0])),
        bot,
    )
    assert press.callback_query is not None
    assert press.callback_query.data == "again"
