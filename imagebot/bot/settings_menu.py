"""/style and /settings (a user's style, shape and image count), the shape buttons and
🎨 Remix under results, and the reply to a remix question.

Choices are stored per user in the database (store/prefs.py) and resolved into vendor
parameters only when a job is made (choices.py): users see names ("📷 Photo", "Portrait",
"2 images"), never a parameter. Every button here passes the gate in callbacks.py first.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from telegram import ForceReply, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.ext import BaseHandler, CallbackQueryHandler, CommandHandler, MessageHandler, filters

from imagebot import texts
from imagebot.bot.callbacks import Button, Choice, ChoiceData, checked
from imagebot.bot.context import BotContext
from imagebot.bot.requests import EditInput, ensure_access, is_addressed, reply, request_job
from imagebot.choices import Choices
from imagebot.clock import parse_iso, utcnow
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.models import Job
from imagebot.store.prefs import Prefs

log = get_logger(__name__)
_PER_ROW = 3  # style buttons per keyboard row (names can be long)
CHECK = "✓ "


def _mark(label: str, on: bool) -> str:
    return f"{CHECK}{label}" if on else label


def _style_rows(choices: Choices, user_id: int, current: str | None) -> list[list[Any]]:
    buttons = [
        InlineKeyboardButton(
            _mark(style.name, style.id == current),
            callback_data=ChoiceData(Choice.STYLE, user_id, style.id).encode(),
        )
        for style in choices.styles
    ]
    return [buttons[i : i + _PER_ROW] for i in range(0, len(buttons), _PER_ROW)]


def settings_keyboard(choices: Choices, user_id: int, prefs: Prefs) -> InlineKeyboardMarkup:
    """Styles (if any), shapes and image counts (if more than one is allowed), the user's
    current ones ticked."""
    style, shape, count = choices.current(prefs)
    rows = _style_rows(choices, user_id, style.id if style else None)
    ticked_shape = shape or choices.default_shape()
    rows.append(
        [
            InlineKeyboardButton(
                _mark(texts.shape_label(name), name == ticked_shape),
                callback_data=ChoiceData(Choice.SHAPE, user_id, name).encode(),
            )
            for name in list(choices.shapes)[:8]
        ]
    )
    if choices.max_images > 1:
        rows.append(
            [
                InlineKeyboardButton(
                    _mark(str(n), n == count),
                    callback_data=ChoiceData(Choice.COUNT, user_id, str(n)).encode(),
                )
                for n in range(1, choices.max_images + 1)
            ]
        )
    return InlineKeyboardMarkup(rows)


def _settings_text(choices: Choices, prefs: Prefs) -> str:
    style, shape, count = choices.current(prefs)
    return texts.settings_text(
        style.name if style else None,
        shape or choices.default_shape(),
        count,
        choices.max_images,
    )


async def _send_menu(update: Update, context: BotContext, text: str, markup: Any) -> None:
    chat, message = update.effective_chat, update.effective_message
    if chat is None:
        return
    try:
        await context.services.delivery.send_text(
            chat.id, text, reply_to=message.message_id if message else None, markup=markup
        )
    except DeliveryError as exc:
        log.warning("reply_failed", error_code=exc.code)


async def style_command(update: Update, context: BotContext) -> None:
    """/style: the operator's styles as buttons, the user's current one ticked."""
    user = update.effective_user
    if user is None or not is_addressed(update.effective_message, context):
        return
    if not await ensure_access(update, context):
        return
    choices = Choices(context.services.settings)
    if not choices.styles:
        await reply(update, context, texts.NO_STYLES)
        return
    prefs = await context.services.prefs.get(user.id)
    style, _, _ = choices.current(prefs)
    markup = InlineKeyboardMarkup(_style_rows(choices, user.id, style.id if style else None))
    await _send_menu(update, context, texts.STYLE_CHOOSE, markup)


async def settings_command(update: Update, context: BotContext) -> None:
    """/settings: style, shape and image count as buttons."""
    user = update.effective_user
    if user is None or not is_addressed(update.effective_message, context):
        return
    if not await ensure_access(update, context):
        return
    choices = Choices(context.services.settings)
    prefs = await context.services.prefs.get(user.id)
    markup = settings_keyboard(choices, user.id, prefs)
    await _send_menu(update, context, _settings_text(choices, prefs), markup)


def _is_style_menu(message: Message | None) -> bool:
    """A /style message shows style buttons only; /settings shows shapes too."""
    markup = message.reply_markup if message is not None else None
    data = [
        str(b.callback_data) for row in (markup.inline_keyboard if markup else ()) for b in row
    ]
    return bool(data) and all(d.startswith("ps:") for d in data)


async def choose(update: Update, context: BotContext) -> None:
    """A /style or /settings button: store the choice and show it ticked."""
    query = update.callback_query
    press = context.choice_press
    if query is None or press is None:
        return
    if not await ensure_access(update, context):
        await query.answer()
        return
    services = context.services
    choices = Choices(services.settings)
    prefs_store = services.prefs
    data = press.data
    answer: str
    if data.choice is Choice.STYLE:
        style = next((s for s in choices.styles if s.id == data.value), None)
        if style is None:
            await query.answer(texts.CHOICE_GONE, show_alert=True)
            return
        await prefs_store.set_style(data.user_id, style.id)
        answer = texts.style_chosen(style.name)
    elif data.choice is Choice.SHAPE:
        if data.value not in choices.shapes:
            await query.answer(texts.CHOICE_GONE, show_alert=True)
            return
        await prefs_store.set_shape(data.user_id, data.value)
        answer = texts.shape_chosen(data.value)
    else:
        count = int(data.value) if data.value.isdigit() else 0
        if not 1 <= count <= choices.max_images:
            await query.answer(texts.CHOICE_GONE, show_alert=True)
            return
        await prefs_store.set_count(data.user_id, count)
        answer = texts.count_chosen(count)
    log.info("choice_saved", choice=data.choice.name.lower(), value=data.value)
    await query.answer(answer)
    prefs = await prefs_store.get(data.user_id)
    message = query.message if isinstance(query.message, Message) else None
    if _is_style_menu(message):
        style, _, _ = choices.current(prefs)
        text = texts.STYLE_CHOOSE
        markup = InlineKeyboardMarkup(
            _style_rows(choices, data.user_id, style.id if style else None)
        )
    else:
        text = _settings_text(choices, prefs)
        markup = settings_keyboard(choices, data.user_id, prefs)
    try:
        await services.delivery.edit_text(press.chat_id, press.message_id, text, markup)
    except DeliveryError as exc:
        log.warning("settings_edit_failed", error_code=exc.code)


def _same_as(job: Job) -> dict[str, Any]:
    """What keeps a job's choices in a new job: its style, shape ("" = the default) and count."""
    edit_input = EditInput(job.input_file_id) if job.input_file_id else None
    return {
        "edit_input": edit_input,
        "parent_job_id": job.id,
        "style_id": job.style_id,
        "shape": job.shape or "",
        "count": job.images_asked,
    }


async def shape_button(update: Update, context: BotContext) -> None:
    """Square / Portrait / …: the same prompt (and style and count) again in that shape."""
    query = update.callback_query
    press = checked(context, Button.SHAPE)
    if query is None or press is None:
        return
    shape = press.data.name or ""
    if shape not in context.services.settings.generate.shapes:
        await query.answer(texts.CHOICE_GONE, show_alert=True)
        return
    await query.answer(texts.shape_chosen(shape))
    job = press.job
    await request_job(update, context, job.kind, job.prompt, **{**_same_as(job), "shape": shape})


async def remix_button(update: Update, context: BotContext) -> None:
    """🎨 Remix: ask for a new description (a forced reply); the reply is matched through
    the database, so it works after a restart too."""
    query = update.callback_query
    press = checked(context, Button.REMIX)
    if query is None or press is None:
        return
    if not await ensure_access(update, context):
        await query.answer()
        return
    job = press.job
    await query.answer()
    try:
        asked = await context.services.delivery.send_text(
            press.chat_id,
            texts.REMIX_ASK,
            # a reply to the requester's message: in groups the forced reply shows for them
            reply_to=job.command_message_id,
            markup=ForceReply(selective=True, input_field_placeholder=texts.REMIX_PLACEHOLDER),
        )
    except DeliveryError as exc:
        log.warning("remix_ask_failed", job_id=job.id, error_code=exc.code)
        return
    await context.services.prefs.add_remix_prompt(
        press.chat_id, asked.message_id, job.id, press.user_id
    )
    log.info("remix_asked", job_id=job.id, message_id=asked.message_id)


async def remix_reply(update: Update, context: BotContext) -> None:
    """A text replying to one of the bot's messages: if it answers a remix question, a new
    job with the remixed job's style, shape and count; otherwise what plain text gets."""
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None or user is None or chat is None or message.reply_to_message is None:
        return
    services = context.services
    asked = await services.prefs.remix_prompt(chat.id, message.reply_to_message.message_id)
    if asked is None:
        if chat.type == chat.PRIVATE:
            limit = services.settings.limits.max_prompt_chars
            await reply(update, context, f"{texts.PRIVATE_TEXT_HINT}\n\n{texts.help_text(limit)}")
        return
    if asked.user_id != user.id:
        await reply(update, context, texts.REMIX_NOT_YOURS)
        return
    window = timedelta(seconds=services.settings.generate.remix_reply_window_s)
    job = await services.store.get(asked.job_id)
    if job is None or utcnow() - parse_iso(asked.created_at) > window:
        await reply(update, context, texts.REMIX_EXPIRED)
        return
    log.info("remix_answered", job_id=job.id)
    await request_job(update, context, job.kind, message.text, **_same_as(job))


def handlers() -> list[BaseHandler[Update, Any, Any]]:
    """Commands and buttons, for group 0 ahead of the catch-all button handler."""
    new_messages = filters.UpdateType.MESSAGE
    return [
        CommandHandler("style", style_command, filters=new_messages),
        CommandHandler("settings", settings_command, filters=new_messages),
        CallbackQueryHandler(choose, pattern=r"^p[shc]:"),
        CallbackQueryHandler(shape_button, pattern=f"^{Button.SHAPE.value}:"),
        CallbackQueryHandler(remix_button, pattern=f"^{Button.REMIX.value}:"),
    ]


def reply_handler() -> BaseHandler[Update, Any, Any]:
    """Text replies (for remix questions); register before the plain-text fallbacks."""
    return MessageHandler(
        filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND & filters.REPLY,
        remix_reply,
    )
