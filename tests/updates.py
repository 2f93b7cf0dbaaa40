"""Builders of Update dicts shaped like the ones Telegram sends, for feeding the bot in tests."""

from __future__ import annotations

import copy
import ipaddress
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

if TYPE_CHECKING:
    from telegram import Bot, Update

    from tests.fakes.telegram_api import SentMessage

BOT_USERNAME = "imagebot_test_bot"
DEFAULT_USER_ID = 1001
DEFAULT_CHAT_ID = 1001


class _Sequence:
    """A process-wide id counter that can also be moved past an id chosen by hand."""

    def __init__(self, first: int) -> None:
        self.last = first - 1

    def next(self) -> int:
        self.last += 1
        return self.last

    def claim(self, value: int | None) -> int:
        """Use `value` if given (and never hand it out later), else the next id."""
        if value is None:
            return self.next()
        self.last = max(self.last, value)
        return value


# Telegram starts update ids at some positive number; message ids are shared with the fake
# Telegram so the bot's and the users' messages never collide in a chat.
_update_ids = _Sequence(700_000)
_message_ids = _Sequence(1)
_callback_ids = _Sequence(1)


def next_update_id() -> int:
    """A fresh update_id, higher than every earlier one."""
    return _update_ids.next()


def next_message_id() -> int:
    """A fresh message_id (used by the fake Telegram for the bot's messages too)."""
    return _message_ids.next()


def last_message_id() -> int:
    """The highest message_id handed out so far."""
    return _message_ids.last


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of MessageEntity offsets and lengths."""
    return len(text.encode("utf-16-le")) // 2


def user(user_id: int = DEFAULT_USER_ID, username: str = "alice") -> dict[str, Any]:
    """A User dict for a human."""
    return {
        "id": user_id,
        "is_bot": False,
        "first_name": username.capitalize(),
        "username": username,
        "language_code": "en",
    }


def chat(
    chat_id: int = DEFAULT_CHAT_ID, chat_type: str | None = None, username: str = "alice"
) -> dict[str, Any]:
    """A Chat dict; the type defaults to private for positive ids, supergroup for negative."""
    kind = chat_type or ("private" if chat_id > 0 else "supergroup")
    if kind == "private":
        return {
            "id": chat_id,
            "type": kind,
            "first_name": username.capitalize(),
            "username": username,
        }
    return {"id": chat_id, "type": kind, "title": "Test group"}


def _command_entities(text: str) -> list[dict[str, Any]]:
    if not text.startswith("/"):
        return []
    token = text.split(maxsplit=1)[0]
    return [{"type": "bot_command", "offset": 0, "length": utf16_len(token)}]


def _message(
    *,
    chat_id: int,
    user_id: int,
    chat_type: str | None,
    message_id: int | None,
    reply_to: dict[str, Any] | None,
    username: str,
    **fields: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": _message_ids.claim(message_id),
        "from": user(user_id, username),
        "chat": chat(chat_id, chat_type, username),
        "date": int(time.time()),
    }
    if reply_to is not None:
        message["reply_to_message"] = _without_reply(reply_to)
    message.update({key: value for key, value in fields.items() if value is not None})
    return message


def _update(message: dict[str, Any], update_id: int | None) -> dict[str, Any]:
    return {"update_id": _update_ids.claim(update_id), "message": message}


def _without_reply(message: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(message)
    out.pop("reply_to_message", None)
    return out


def _caption_fields(caption: str | None) -> dict[str, Any]:
    if caption is None:
        return {}
    entities = _command_entities(caption)
    return {"caption": caption, "caption_entities": entities or None}


def command(
    text: str,
    *,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    reply_to: dict[str, Any] | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A message update carrying a /command (entity length counts any @botname suffix)."""
    if not text.startswith("/"):
        raise ValueError("a command starts with '/'")
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=reply_to,
        username=username,
        text=text,
        entities=_command_entities(text),
    )
    return _update(message, update_id)


def text_message(
    text: str,
    *,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    reply_to: dict[str, Any] | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A plain text message update (no entities)."""
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=reply_to,
        username=username,
        text=text,
    )
    return _update(message, update_id)


def photo_sizes(
    file_id: str, width: int = 640, height: int = 480, file_size: int = 12345
) -> list[dict[str, Any]]:
    """PhotoSize variants like Telegram's: smaller previews first, `file_id` itself last.

    The previews get derived file_ids (`<file_id>-s90`, `-m320`) the fake does not know, so a
    bot that downloads a preview instead of the largest size fails loudly.
    """
    sizes: list[dict[str, Any]] = []
    longest = max(width, height)
    for tag, side in (("s", 90), ("m", 320)):
        if longest > side:
            scale = side / longest
            sizes.append(
                {
                    "file_id": f"{file_id}-{tag}{side}",
                    "file_unique_id": f"{file_id[-8:]}-{tag}",
                    "width": max(1, round(width * scale)),
                    "height": max(1, round(height * scale)),
                    "file_size": max(1, round(file_size * scale * scale)),
                }
            )
    sizes.append(
        {
            "file_id": file_id,
            "file_unique_id": f"{file_id[-8:]}-x",
            "width": width,
            "height": height,
            "file_size": file_size,
        }
    )
    return sizes


def photo_message(
    file_id: str,
    *,
    width: int = 640,
    height: int = 480,
    file_size: int = 12345,
    caption: str | None = None,
    sizes: list[tuple[str, int, int, int]] | None = None,
    media_group_id: str | None = None,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    reply_to: dict[str, Any] | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A photo message update; `sizes` = [(file_id, w, h, bytes), ...] overrides the variants."""
    photo = photo_sizes(file_id, width, height, file_size)
    if sizes:
        keys = ("file_id", "width", "height", "file_size")
        photo = [dict(zip(keys, size, strict=True)) for size in sizes]
        for variant in photo:
            variant["file_unique_id"] = f"{variant['file_id'][-8:]}-u"
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=reply_to,
        username=username,
        photo=photo,
        media_group_id=media_group_id,
        **_caption_fields(caption),
    )
    return _update(message, update_id)


def document_message(
    file_id: str,
    mime_type: str = "image/png",
    file_name: str = "image.png",
    file_size: int = 12345,
    caption: str | None = None,
    *,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    reply_to: dict[str, Any] | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A document message update (e.g. an image sent uncompressed as a file)."""
    document = {
        "file_id": file_id,
        "file_unique_id": f"{file_id[-8:]}-d",
        "file_name": file_name,
        "mime_type": mime_type,
        "file_size": file_size,
    }
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=reply_to,
        username=username,
        document=document,
        **_caption_fields(caption),
    )
    return _update(message, update_id)


def sticker_message(
    file_id: str = "sticker-file-1",
    *,
    emoji: str = "🙂",
    width: int = 512,
    height: int = 512,
    is_animated: bool = False,
    is_video: bool = False,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A sticker message update."""
    sticker = {
        "file_id": file_id,
        "file_unique_id": f"{file_id[-8:]}-k",
        "type": "regular",
        "width": width,
        "height": height,
        "is_animated": is_animated,
        "is_video": is_video,
        "emoji": emoji,
        "file_size": 20_000,
    }
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=None,
        username=username,
        sticker=sticker,
    )
    return _update(message, update_id)


def video_message(
    file_id: str = "video-file-1",
    *,
    width: int = 640,
    height: int = 360,
    duration: int = 3,
    file_size: int = 250_000,
    mime_type: str = "video/mp4",
    caption: str | None = None,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A video message update."""
    video = {
        "file_id": file_id,
        "file_unique_id": f"{file_id[-8:]}-v",
        "width": width,
        "height": height,
        "duration": duration,
        "mime_type": mime_type,
        "file_size": file_size,
    }
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=None,
        username=username,
        video=video,
        **_caption_fields(caption),
    )
    return _update(message, update_id)


def animation_message(
    file_id: str = "animation-file-1",
    *,
    width: int = 320,
    height: int = 240,
    duration: int = 2,
    file_size: int = 90_000,
    caption: str | None = None,
    chat_id: int = DEFAULT_CHAT_ID,
    user_id: int = DEFAULT_USER_ID,
    chat_type: str | None = None,
    update_id: int | None = None,
    message_id: int | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A GIF/animation message update (Telegram also fills `document` for these)."""
    animation = {
        "file_id": file_id,
        "file_unique_id": f"{file_id[-8:]}-a",
        "width": width,
        "height": height,
        "duration": duration,
        "file_name": "animation.mp4",
        "mime_type": "video/mp4",
        "file_size": file_size,
    }
    document = {
        key: animation[key]
        for key in ("file_id", "file_unique_id", "file_name", "mime_type", "file_size")
    }
    message = _message(
        chat_id=chat_id,
        user_id=user_id,
        chat_type=chat_type,
        message_id=message_id,
        reply_to=None,
        username=username,
        animation=animation,
        document=document,
        **_caption_fields(caption),
    )
    return _update(message, update_id)


def callback_query(
    data: str,
    *,
    message: dict[str, Any],
    user_id: int = DEFAULT_USER_ID,
    chat_id: int | None = None,
    update_id: int | None = None,
    query_id: str | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A callback_query update for a button press on `message` (a bot message dict)."""
    message_chat = message.get("chat") or {}
    instance_chat = chat_id if chat_id is not None else message_chat.get("id", user_id)
    query = {
        "id": query_id or f"cbq-{_callback_ids.next()}",
        "from": user(user_id, username),
        "chat_instance": f"inst{abs(int(instance_chat))}",
        "data": data,
        "message": copy.deepcopy(message),
    }
    return {"update_id": _update_ids.claim(update_id), "callback_query": query}


def bot_message_dict(sent: SentMessage) -> dict[str, Any]:
    """The Message dict of a message the fake recorded, e.g. for `reply_to=`."""
    return copy.deepcopy(sent.payload)


def to_update(update: dict[str, Any], bot: Bot) -> Update:
    """Parse an Update dict with PTB, bound to `bot` so shortcuts like reply_text work."""
    from telegram import Update

    parsed = Update.de_json(update, bot)
    assert parsed is not None
    return parsed


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"tests only talk to loopback, not {host!r}")


async def post_webhook(
    url: str, update: dict[str, Any], secret: str | None = None, timeout_s: float = 10.0
) -> tuple[int, str]:
    """POST one update to the bot's webhook the way Telegram does; return (status, body)."""
    _check_loopback(url)
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(url, data=json.dumps(update).encode(), headers=headers) as response,
    ):
        return response.status, await response.text()


# -- payments (Telegram Stars) -------------------------------------------------------------


def pre_checkout_query(
    *,
    query_id: str,
    user_id: int = DEFAULT_USER_ID,
    currency: str = "XTR",
    total_amount: int,
    invoice_payload: str,
    update_id: int | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A pre_checkout_query update (it has no chat and no date)."""
    query = {
        "id": query_id,
        "from": user(user_id, username),
        "currency": currency,
        "total_amount": total_amount,
        "invoice_payload": invoice_payload,
    }
    return {"update_id": _update_ids.claim(update_id), "pre_checkout_query": query}


def successful_payment(
    *,
    charge_id: str,
    total_amount: int,
    invoice_payload: str,
    user_id: int = DEFAULT_USER_ID,
    chat_id: int | None = None,
    currency: str = "XTR",
    update_id: int | None = None,
    username: str = "alice",
) -> dict[str, Any]:
    """A message update carrying successful_payment (a service message in the payer's chat)."""
    payment = {
        "currency": currency,
        "total_amount": total_amount,
        "invoice_payload": invoice_payload,
        "telegram_payment_charge_id": charge_id,
        "provider_payment_charge_id": "",
    }
    message = _message(
        chat_id=user_id if chat_id is None else chat_id,
        user_id=user_id,
        chat_type=None,
        message_id=None,
        reply_to=None,
        username=username,
        successful_payment=payment,
    )
    return _update(message, update_id)


def refunded_payment(
    *,
    charge_id: str,
    total_amount: int,
    invoice_payload: str,
    user_id: int = DEFAULT_USER_ID,
    chat_id: int | None = None,
    update_id: int | None = None,
) -> dict[str, Any]:
    """A message update carrying refunded_payment (Bot API 7.7)."""
    refunded = {
        "currency": "XTR",
        "total_amount": total_amount,
        "invoice_payload": invoice_payload,
        "telegram_payment_charge_id": charge_id,
    }
    message = _message(
        chat_id=user_id if chat_id is None else chat_id,
        user_id=user_id,
        chat_type=None,
        message_id=None,
        reply_to=None,
        username="alice",
        refunded_payment=refunded,
    )
    return _update(message, update_id)


async def post_webhook_raw(
    url: str,
    body: bytes,
    secret: bytes | None = None,
    timeout_s: float = 10.0,
) -> int:
    """POST raw bytes to the bot's webhook over a plain socket (so bodies and header bytes no
    HTTP client would send get through, e.g. a secret that is not UTF-8); return the status,
    0 when the server closed the connection without one."""
    import asyncio
    import contextlib

    _check_loopback(url)
    parts = urlsplit(url)
    head = [
        f"POST {parts.path or '/'} HTTP/1.1".encode(),
        f"Host: {parts.hostname}:{parts.port}".encode(),
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
    ]
    if secret is not None:
        head.append(b"X-Telegram-Bot-Api-Secret-Token: " + secret)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port), timeout_s
    )
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        try:
            for start in range(0, len(body), 64 * 1024):
                writer.write(body[start : start + 64 * 1024])
                await asyncio.wait_for(writer.drain(), timeout_s)
        except (ConnectionError, TimeoutError):
            pass  # a server refusing a huge body may close before reading it all
        try:
            status_line = await asyncio.wait_for(reader.readline(), timeout_s)
        except ConnectionError:
            return 0
        fields = status_line.split()
        return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else 0
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
