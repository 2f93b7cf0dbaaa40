"""/edit in all its ways in: a captioned photo, a reply to a photo, a conversation, ✏️ Edit this.

Every way ends in `request_job`, the same path as /generate. The photo is remembered only as a
Telegram file_id; the worker downloads its bytes (the file URL carries the bot token).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from telegram import ForceReply, Message, Update
from telegram.ext import (
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    ConversationHandler,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.warnings import PTBUserWarning

from imagebot import texts
from imagebot.bot.callbacks import Button, checked
from imagebot.bot.context import BotContext
from imagebot.bot.requests import (
    EditInput,
    command_argument,
    ensure_access,
    is_addressed,
    reply,
    request_job,
)
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.media import TELEGRAM_DOWNLOAD_LIMIT
from imagebot.models import JobKind

log = get_logger(__name__)

WAIT_PHOTO, WAIT_INSTRUCTION = range(2)
END = ConversationHandler.END

NEW = filters.UpdateType.MESSAGE
MEDIA = filters.PHOTO | filters.Document.ALL
UNSUPPORTED = filters.Sticker.ALL | filters.ANIMATION | filters.VIDEO | filters.VIDEO_NOTE
EDIT_CAPTION = filters.CaptionRegex(re.compile(r"^\s*/edit(@\w+)?(\s|$)", re.IGNORECASE))


def pick_input(message: Message | None) -> EditInput | str | None:
    """The photo to edit in a message: an EditInput, a text saying why not, or None (no media)."""
    if message is None:
        return None
    if message.sticker or message.animation or message.video or message.video_note:
        return texts.EDIT_UNSUPPORTED_MEDIA
    if message.photo:
        fitting = [p for p in message.photo if (p.file_size or 0) <= TELEGRAM_DOWNLOAD_LIMIT]
        if not fitting:
            return texts.EDIT_FILE_TOO_BIG
        best = max(fitting, key=lambda p: p.width * p.height)
        return EditInput(best.file_id, best.file_size, best.width, best.height)
    if message.document:
        doc = message.document
        if doc.file_size and doc.file_size > TELEGRAM_DOWNLOAD_LIMIT:
            return texts.EDIT_FILE_TOO_BIG
        # The bytes decide whether it is an image (the worker checks them), not the MIME type,
        # but a file that says it is a video or audio is refused at once.
        if (doc.mime_type or "").startswith(("video/", "audio/")):
            return texts.EDIT_UNSUPPORTED_MEDIA
        return EditInput(doc.file_id, doc.file_size)
    return None


def _state(context: BotContext, update: Update) -> dict[str, Any]:
    chat = update.effective_chat
    key = f"edit:{chat.id if chat else 0}"
    data: dict[str, Any] = context.user_data.setdefault(key, {})  # type: ignore[union-attr]
    return data


def _clear(context: BotContext, update: Update) -> None:
    chat = update.effective_chat
    if context.user_data is not None:
        context.user_data.pop(f"edit:{chat.id if chat else 0}", None)


async def _ask(update: Update, context: BotContext, text: str) -> None:
    """Ask the next question; in a group, as a forced reply so privacy mode lets it through."""
    chat = update.effective_chat
    if chat is None:
        return
    message = update.effective_message
    markup = ForceReply(selective=True) if chat.type != "private" else None
    try:
        await context.services.delivery.send_text(
            chat.id,
            text,
            reply_to=message.message_id if message and markup else None,
            markup=markup,
        )
    except DeliveryError as exc:
        log.warning("edit_question_failed", error_code=exc.code)


async def _finish(update: Update, context: BotContext, photo: EditInput, instruction: str) -> int:
    _clear(context, update)
    await request_job(update, context, JobKind.EDIT, instruction, edit_input=photo)
    return END


async def _with_photo(
    update: Update, context: BotContext, picked: EditInput | str | None, instruction: str
) -> int:
    """Shared by every entry: refuse bad media, ask what is missing, or create the job."""
    if isinstance(picked, str):
        await reply(update, context, picked)
        return END
    state = _state(context, update)
    if picked is None:
        state["instruction"] = instruction
        await _ask(update, context, texts.EDIT_ASK_PHOTO)
        return WAIT_PHOTO
    if instruction.strip():
        return await _finish(update, context, picked, instruction)
    state["photo"] = picked
    await _ask(update, context, texts.EDIT_ASK_INSTRUCTION)
    return WAIT_INSTRUCTION


async def start_edit(update: Update, context: BotContext) -> int:
    """/edit [instruction], alone or as a reply to a photo."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return END
    if not await ensure_access(update, context):
        return END
    picked = pick_input(message.reply_to_message)
    return await _with_photo(update, context, picked, command_argument(message.text))


async def caption_edit(update: Update, context: BotContext) -> int:
    """A photo (or image file) sent with the caption /edit <instruction>."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return END
    if not await ensure_access(update, context):
        return END
    return await _with_photo(
        update, context, pick_input(message), command_argument(message.caption)
    )


async def edit_this(update: Update, context: BotContext) -> int | None:
    """✏️ Edit this under a result: that result is the photo; ask for the instruction."""
    query = update.callback_query
    # The gate (callbacks.py) answered and stopped a refused press before it got here.
    press = checked(context, Button.EDIT)
    if query is None or press is None:
        return None
    file_ids = press.job.result_file_ids
    index = press.data.index or 0
    if index >= len(file_ids) or not file_ids[index]:
        await query.answer(texts.BUTTON_EXPIRED)
        return END
    await query.answer()
    if not await ensure_access(update, context):
        return END
    return await _with_photo(update, context, EditInput(file_ids[index]), "")


async def got_photo(update: Update, context: BotContext) -> int | None:
    message = update.effective_message
    picked = pick_input(message)
    if not isinstance(picked, EditInput):
        await reply(update, context, picked or texts.EDIT_WRONG_KIND)
        return None  # stay in the current state
    state = _state(context, update)
    caption = command_argument(message.caption) if message else ""
    instruction = caption or str(state.get("instruction") or "")
    return await _with_photo(update, context, picked, instruction)


async def got_instruction(update: Update, context: BotContext) -> int:
    message = update.effective_message
    photo = _state(context, update).get("photo")
    if message is None or not isinstance(photo, EditInput):
        return END
    return await _finish(update, context, photo, message.text or "")


async def wrong_kind(update: Update, context: BotContext) -> int | None:
    """Anything else while waiting: a hint, and the conversation stays where it was."""
    waiting_photo = "photo" not in _state(context, update)
    await reply(update, context, texts.EDIT_WRONG_KIND if waiting_photo else texts.EDIT_NEED_TEXT)
    return None


async def unsupported(update: Update, context: BotContext) -> int | None:
    await reply(update, context, texts.EDIT_UNSUPPORTED_MEDIA)
    return None


async def cancel_edit(update: Update, context: BotContext) -> int:
    _clear(context, update)
    await reply(update, context, texts.EDIT_CANCELED)
    return END


async def timed_out(update: object, context: BotContext) -> None:
    if isinstance(update, Update):
        _clear(context, update)
        await reply(update, context, texts.EDIT_TIMED_OUT)


async def stray_media(update: Update, context: BotContext) -> None:
    """A photo, sticker or video in a private chat outside any edit: say what to do with it."""
    message = update.effective_message
    picked = pick_input(message)
    text = texts.PHOTO_HINT if isinstance(picked, EditInput) else str(picked)
    document = message.document if message else None
    if (
        isinstance(picked, EditInput)
        and document
        and not (document.mime_type or "").startswith("image/")
    ):
        # Only a hint: if it is edited anyway, the worker checks the bytes themselves.
        text = texts.EDIT_NOT_IMAGE_FILE
    await reply(update, context, text)


def stray_media_handler() -> BaseHandler[Update, Any, Any]:
    return MessageHandler(NEW & filters.ChatType.PRIVATE & (MEDIA | UNSUPPORTED), stray_media)


def conversation(timeout_s: float) -> ConversationHandler[Any]:
    """/edit's ways in and its two waits; a conversation idle for `timeout_s` ends."""
    entry_points: list[BaseHandler[Update, Any, Any]] = [
        CommandHandler("edit", start_edit, filters=NEW),
        # Videos and GIFs captioned /edit come in too, to be told what can be edited.
        MessageHandler(NEW & (MEDIA | UNSUPPORTED) & EDIT_CAPTION, caption_edit),
        CallbackQueryHandler(edit_this, pattern=f"^{Button.EDIT.value}:"),
    ]
    not_command = NEW & ~filters.COMMAND
    states: dict[object, list[BaseHandler[Update, Any, Any]]] = {
        WAIT_PHOTO: [
            MessageHandler(NEW & UNSUPPORTED, unsupported),
            MessageHandler(NEW & MEDIA, got_photo),
            MessageHandler(not_command, wrong_kind),
        ],
        WAIT_INSTRUCTION: [
            MessageHandler(not_command & filters.TEXT, got_instruction),
            MessageHandler(NEW & UNSUPPORTED, unsupported),
            MessageHandler(NEW & MEDIA, got_photo),
            MessageHandler(not_command, wrong_kind),
        ],
        ConversationHandler.TIMEOUT: [TypeHandler(Update, timed_out)],
    }
    with warnings.catch_warnings():
        # The ✏️ button is only an entry point; per-message tracking is not what we want.
        warnings.filterwarnings("ignore", message=".*per_message.*", category=PTBUserWarning)
        return ConversationHandler(
            entry_points=entry_points,
            states=states,
            fallbacks=[CommandHandler("cancel", cancel_edit, filters=NEW)],
            conversation_timeout=timeout_s,
            allow_reentry=True,
            name="edit",
        )
