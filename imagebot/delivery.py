"""Everything sent to a chat: status messages, results (photo, album or document), texts.

Telegram errors are translated once, here, into DeliveryError with a stable code and the
decision whether sending again may help.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from telegram import (
    Bot,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from imagebot import texts
from imagebot.buttondata import Button, ButtonData
from imagebot.errors import DeliveryError
from imagebot.models import ImageFile
from imagebot.ratelimit import TelegramRateLimiter

PHOTO_MAX_BYTES = 10 * 1000 * 1000
PHOTO_MAX_SIDES = 10_000
PHOTO_MAX_RATIO = 20
ALBUM_MAX = 10


def fits_as_photo(image: ImageFile) -> bool:
    """Telegram's sendPhoto limits: 10 MB, width + height <= 10000, aspect ratio <= 20."""
    if len(image.data) > PHOTO_MAX_BYTES or image.width + image.height > PHOTO_MAX_SIDES:
        return False
    short, long = sorted((max(1, image.width), max(1, image.height)))
    return long / short <= PHOTO_MAX_RATIO and image.mime in ("image/jpeg", "image/png")


@contextlib.contextmanager
def telegram_errors() -> Iterator[None]:
    """Map telegram.error to DeliveryError (PTB's tree: Forbidden, BadRequest, NetworkError)."""
    try:
        yield
    except Forbidden as exc:
        raise DeliveryError(exc.message, "blocked") from exc
    except RetryAfter as exc:
        raise DeliveryError(exc.message, "flood", is_retryable=True) from exc
    except BadRequest as exc:
        text = exc.message.lower()
        if "chat not found" in text:
            raise DeliveryError(exc.message, "chat_not_found") from exc
        if "message is not modified" in text:  # an edit to the text already shown
            raise DeliveryError(exc.message, "not_modified") from exc
        raise DeliveryError(exc.message, "bad_request") from exc
    except NetworkError as exc:  # TimedOut included
        raise DeliveryError(exc.message, "network", is_retryable=True) from exc
    except TelegramError as exc:
        raise DeliveryError(exc.message, "telegram_error") from exc


def result_keyboard(
    job_id: int, image_count: int, *, upscale: bool = False
) -> InlineKeyboardMarkup:
    """🔁 Again / ✏️ Edit this / 📎 Original, then ⤴ Upscale (when offered) and 🗑 Delete;
    their data names the job, which lives in SQLite."""
    if image_count <= 1:
        return InlineKeyboardMarkup(
            [
                [
                    InlineKeyboardButton(texts.BUTTON_AGAIN, callback_data=f"a:{job_id}"),
                    InlineKeyboardButton(texts.BUTTON_EDIT, callback_data=f"e:{job_id}:0"),
                    InlineKeyboardButton(texts.BUTTON_ORIGINAL, callback_data=f"o:{job_id}:0"),
                ],
                *_more_rows(job_id, image_count, upscale),
            ]
        )
    rows = [
        [
            InlineKeyboardButton(texts.BUTTON_AGAIN, callback_data=f"a:{job_id}"),
            InlineKeyboardButton(texts.BUTTON_ORIGINAL, callback_data=f"o:{job_id}:*"),
        ],
        [
            InlineKeyboardButton(f"✏️ {n + 1}", callback_data=f"e:{job_id}:{n}")
            for n in range(image_count)
        ],
        *_more_rows(job_id, image_count, upscale),
    ]
    return InlineKeyboardMarkup(rows)


def _more_rows(job_id: int, image_count: int, upscale: bool) -> list[list[InlineKeyboardButton]]:
    """Issue 17's rows under a result: ⤴ Upscale per image (when offered), 🗑 Delete."""
    delete = InlineKeyboardButton(
        texts.BUTTON_DELETE, callback_data=ButtonData(Button.DELETE, job_id).encode()
    )
    rows: list[list[InlineKeyboardButton]] = []
    if upscale and image_count <= 1:
        up = ButtonData(Button.UPSCALE, job_id, 0).encode()
        rows.append([InlineKeyboardButton(texts.BUTTON_UPSCALE, callback_data=up), delete])
        return rows
    if upscale:
        rows.append(
            [
                InlineKeyboardButton(
                    f"⤴ {n + 1}", callback_data=ButtonData(Button.UPSCALE, job_id, n).encode()
                )
                for n in range(image_count)
            ]
        )
    rows.append([delete])
    return rows


def upscaled_keyboard(job_id: int) -> InlineKeyboardMarkup:
    """Under an upscaled file: only 🗑 Delete."""
    data = ButtonData(Button.DELETE, job_id).encode()
    return InlineKeyboardMarkup([[InlineKeyboardButton(texts.BUTTON_DELETE, callback_data=data)]])


def choice_rows(job_id: int, shapes: Sequence[str]) -> list[list[InlineKeyboardButton]]:
    """Under a result: one button per shape (the same prompt again in that shape), and
    🎨 Remix (a new description, the same style, shape and count)."""
    rows: list[list[InlineKeyboardButton]] = []
    if shapes:
        rows.append(
            [
                InlineKeyboardButton(
                    texts.shape_label(name),
                    callback_data=ButtonData(Button.SHAPE, job_id, name=name).encode(),
                )
                for name in shapes[:8]  # a keyboard row holds at most 8 buttons
            ]
        )
    rows.append(
        [
            InlineKeyboardButton(
                texts.BUTTON_REMIX, callback_data=ButtonData(Button.REMIX, job_id).encode()
            )
        ]
    )
    return rows


def _with_rows(
    keyboard: InlineKeyboardMarkup, rows: Sequence[Sequence[InlineKeyboardButton]]
) -> InlineKeyboardMarkup:
    if not rows:
        return keyboard
    return InlineKeyboardMarkup([*keyboard.inline_keyboard, *rows])


def cancel_keyboard(job_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(texts.BUTTON_CANCEL, callback_data=f"x:{job_id}")]]
    )


def _reply_to(message_id: int | None) -> ReplyParameters | None:
    # A deleted command must not make the result fail: send it without the reply then.
    if message_id is None:
        return None
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


@dataclass(frozen=True, slots=True)
class Sent:
    """What a result delivery produced: message ids, and file_ids of the photos (for edits)."""

    message_ids: list[int]
    file_ids: list[str]


def _photo_file_id(message: Message) -> str:
    if message.photo:
        return max(message.photo, key=lambda p: p.width * p.height).file_id
    if message.document:
        return message.document.file_id
    return ""


class Delivery:
    """Sends to Telegram through the bot (and so through its rate limiter)."""

    def __init__(self, bot: Bot) -> None:
        self.bot = bot

    def expect_send(self, chat_id: int) -> None:
        """A message to `chat_id` follows shortly, whatever the work before it comes to (a
        request's answer while its job is being made): its rate-limit slot may be asked for
        now, alongside that work (TelegramRateLimiter.reserve_ahead)."""
        limiter = getattr(self.bot, "rate_limiter", None)
        if isinstance(limiter, TelegramRateLimiter):
            limiter.reserve_ahead(chat_id)

    async def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: int | None = None,
        markup: InlineKeyboardMarkup | ForceReply | None = None,
    ) -> Message:
        with telegram_errors():
            return await self.bot.send_message(
                chat_id,
                texts.utf16_trim(text, texts.TEXT_LIMIT),
                reply_parameters=_reply_to(reply_to),
                reply_markup=markup,
            )

    async def edit_text(
        self,
        chat_id: int,
        message_id: int,
        text: str,
        markup: InlineKeyboardMarkup | None = None,
    ) -> bool:
        """Edit a status message; False if it is gone. 'Not modified' counts as done."""
        try:
            with telegram_errors():
                await self.bot.edit_message_text(
                    texts.utf16_trim(text, texts.TEXT_LIMIT),
                    chat_id=chat_id,
                    message_id=message_id,
                    reply_markup=markup,
                )
        except DeliveryError as exc:
            if exc.code == "not_modified":
                return True
            if exc.code == "bad_request":
                return False
            raise
        return True

    async def delete(self, chat_id: int, message_id: int) -> bool:
        try:
            with telegram_errors():
                return bool(await self.bot.delete_message(chat_id, message_id))
        except DeliveryError as exc:
            if exc.code == "bad_request":
                return False
            raise

    async def chat_action(self, chat_id: int) -> None:
        with telegram_errors():
            await self.bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)

    async def send_results(
        self,
        chat_id: int,
        job_id: int,
        images: Sequence[ImageFile],
        *,
        caption: str,
        reply_to: int | None,
        extra_rows: Sequence[Sequence[InlineKeyboardButton]] = (),
        spoiler: bool = False,
        upscale: bool = False,
        as_documents: bool = False,
    ) -> Sent:
        """One photo with buttons; an album and a button message for several; documents for
        images over the photo limits. `extra_rows` go under the usual buttons; `spoiler`
        hides every photo until tapped (documents cannot be hidden). `as_documents`: every
        image as a file (an upscale, at full resolution) with only 🗑 Delete under it."""
        if as_documents:
            return await self._send_files(chat_id, job_id, images, caption, reply_to)
        photos = [img for img in images if fits_as_photo(img)]
        documents = [img for img in images if not fits_as_photo(img)]
        message_ids: list[int] = []
        file_ids: list[str] = []
        keyboard = _with_rows(result_keyboard(job_id, len(images), upscale=upscale), extra_rows)
        hidden = True if spoiler else None  # None: the parameter is not sent at all
        with telegram_errors():
            if len(images) == 1:
                image = images[0]
                name = f"imagebot-{job_id}.{image.extension}"
                if photos:
                    message = await self.bot.send_photo(
                        chat_id,
                        image.data,
                        filename=name,
                        caption=caption,
                        reply_parameters=_reply_to(reply_to),
                        reply_markup=keyboard,
                        has_spoiler=hidden,
                    )
                else:
                    message = await self.bot.send_document(
                        chat_id,
                        image.data,
                        filename=name,
                        caption=caption,
                        reply_parameters=_reply_to(reply_to),
                        reply_markup=keyboard,
                    )
                return Sent([message.message_id], [_photo_file_id(message)])
            for start in range(0, len(photos), ALBUM_MAX):
                chunk = photos[start : start + ALBUM_MAX]
                first_caption = caption if not message_ids else None
                if len(chunk) == 1:  # an album needs at least two items
                    message = await self.bot.send_photo(
                        chat_id,
                        chunk[0].data,
                        filename=f"imagebot-{job_id}-{start}.{chunk[0].extension}",
                        caption=first_caption,
                        reply_parameters=_reply_to(reply_to),
                        has_spoiler=hidden,
                    )
                    sent: Sequence[Message] = (message,)
                else:
                    sent = await self.bot.send_media_group(
                        chat_id,
                        [
                            InputMediaPhoto(
                                img.data,
                                filename=f"imagebot-{job_id}-{start + n}.{img.extension}",
                                caption=first_caption if n == 0 else None,
                                has_spoiler=hidden,
                            )
                            for n, img in enumerate(chunk)
                        ],
                        reply_parameters=_reply_to(reply_to),
                    )
                message_ids += [m.message_id for m in sent]
                file_ids += [_photo_file_id(m) for m in sent]
            for n, img in enumerate(documents):
                message = await self.bot.send_document(
                    chat_id,
                    img.data,
                    filename=f"imagebot-{job_id}-d{n}.{img.extension}",
                    caption=caption if not message_ids else None,
                    reply_parameters=_reply_to(reply_to),
                )
                message_ids.append(message.message_id)
                file_ids.append(_photo_file_id(message))
            buttons = await self.bot.send_message(
                chat_id, texts.many_results(job_id, len(images)), reply_markup=keyboard
            )
            message_ids.append(buttons.message_id)
        return Sent(message_ids, file_ids)

    async def _send_files(
        self,
        chat_id: int,
        job_id: int,
        images: Sequence[ImageFile],
        caption: str,
        reply_to: int | None,
    ) -> Sent:
        message_ids: list[int] = []
        file_ids: list[str] = []
        with telegram_errors():
            for n, img in enumerate(images):
                last = n == len(images) - 1
                message = await self.bot.send_document(
                    chat_id,
                    img.data,
                    filename=f"imagebot-{job_id}-{n + 1}.{img.extension}",
                    caption=caption if n == 0 else None,
                    reply_parameters=_reply_to(reply_to),
                    reply_markup=upscaled_keyboard(job_id) if last else None,
                )
                message_ids.append(message.message_id)
                file_ids.append(_photo_file_id(message))
        return Sent(message_ids, file_ids)

    async def resend(
        self, chat_id: int, file_ids: Sequence[str], *, as_documents: bool, reply_to: int | None
    ) -> list[int]:
        """Send results again by their Telegram file_ids (/history): nothing is uploaded.
        A file_id Telegram keeps as a document (an image over the photo limits) is sent as
        one when sending it as a photo is refused."""
        sent: list[int] = []
        with telegram_errors():
            for file_id in file_ids:
                message: Message | None = None
                if not as_documents:
                    try:
                        message = await self.bot.send_photo(
                            chat_id, file_id, reply_parameters=_reply_to(reply_to)
                        )
                    except BadRequest:
                        message = None
                if message is None:
                    message = await self.bot.send_document(
                        chat_id, file_id, reply_parameters=_reply_to(reply_to)
                    )
                sent.append(message.message_id)
        return sent

    async def send_document(
        self, chat_id: int, data: bytes, filename: str, *, reply_to: int | None = None
    ) -> Message:
        with telegram_errors():
            return await self.bot.send_document(
                chat_id, data, filename=filename, reply_parameters=_reply_to(reply_to)
            )
