"""The language each update is answered in, and /language to choose it.

Handler group -4 (before payments, the stranger check and every answer) sets the language for
the update's handlers: the user's stored choice, else their Telegram `language_code`
(texts.negotiate: pt-br -> pt_BR -> pt -> English). `/language` shows the languages as
buttons (`lang:<code>`, passed by the button gate as naming no job and checked here against
the known catalogs); `/language ru` chooses directly. The choice is stored (user_prefs)
and holds for every later update and job, across restarts.
"""

from __future__ import annotations

from typing import Any

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    TypeHandler,
    filters,
)

from imagebot import texts
from imagebot.bot.context import BotContext
from imagebot.bot.requests import command_argument, is_addressed, reply
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger

log = get_logger(__name__)

BUTTON_PREFIX = "lang:"
GROUP = -4


def match_language(wanted: str) -> str | None:
    """The catalog a /language argument names ("ru", "pt-br", "pt", "Español"), or None."""
    normalized = wanted.strip().replace("-", "_").lower()
    if not normalized:
        return None
    for code, name in texts.LANGUAGES.items():
        if normalized in (code.lower(), name.lower()):
            return code
    found = texts.negotiate(normalized)
    if found == texts.DEFAULT_LANGUAGE and normalized.partition("_")[0] != "en":
        return None
    return found


async def remember_language(update: Update, context: BotContext) -> None:
    """Group -4: every later handler of this update speaks the user's language."""
    user = update.effective_user
    if user is None:
        texts.use_language(texts.DEFAULT_LANGUAGE)
        return
    chosen: str | None = None
    services = context.services
    # read with the update's save, when nothing could change them since (PostgreSQL)
    found = services.inbox.prefs_at_save(update.update_id, user.id)
    try:
        chosen, context.prefs = found or await services.prefs.with_language(user.id)
    except Exception as exc:  # a storage fault must not silence the bot: Telegram's guess
        log.warning("language_lookup_failed", error=str(exc))
    texts.use_language(chosen or texts.negotiate(user.language_code))


def language_keyboard() -> InlineKeyboardMarkup:
    current = texts.current_language()
    buttons = [
        InlineKeyboardButton(
            f"✓ {name}" if code == current else name, callback_data=f"{BUTTON_PREFIX}{code}"
        )
        for code, name in texts.LANGUAGES.items()
    ]
    return InlineKeyboardMarkup([buttons[i : i + 2] for i in range(0, len(buttons), 2)])


async def _choose(context: BotContext, user_id: int, language: str) -> None:
    await context.services.prefs.choose_language(user_id, language)
    texts.use_language(language)
    log.info("language_chosen", user_id=user_id, language=language)


async def language_command(update: Update, context: BotContext) -> None:
    """/language: the languages as buttons; /language <code>: choose it."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or not is_addressed(message, context):
        return
    wanted = command_argument(message.text).strip()
    if not wanted:
        try:
            await context.services.delivery.send_text(
                message.chat.id,
                texts.LANGUAGE_CHOOSE,
                reply_to=message.message_id,
                markup=language_keyboard(),
            )
        except DeliveryError as exc:
            log.warning("reply_failed", error_code=exc.code)
        return
    language = match_language(wanted)
    if language is None:
        await reply(update, context, texts.language_unknown(wanted))
        return
    await _choose(context, user.id, language)
    await reply(update, context, texts.language_set(language))


async def language_button(update: Update, context: BotContext) -> None:
    """A language button: only a known catalog name is accepted (the data is untrusted)."""
    query, user = update.callback_query, update.effective_user
    if query is None or user is None:
        return
    language = str(query.data or "").removeprefix(BUTTON_PREFIX)
    if language not in texts.LANGUAGES:
        log.warning("button_refused", reason="unknown_language", data=repr(str(query.data)[:80]))
        await _answer(query, texts.BUTTON_EXPIRED)
        return
    await _choose(context, user.id, language)
    await _answer(query, None)
    message = query.message
    if message is None:
        return
    try:
        await context.services.delivery.edit_text(
            message.chat.id, message.message_id, texts.language_set(language), None
        )
    except DeliveryError as exc:
        log.info("language_edit_failed", error_code=exc.code)


async def _answer(query: Any, text: str | None) -> None:
    try:
        await query.answer(text)
    except TelegramError as exc:
        log.info("callback_answer_failed", error=str(exc))


def register(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """The language of each update (group -4) and /language with its buttons (group 0)."""
    application.add_handler(TypeHandler(Update, remember_language), group=GROUP)
    application.add_handler(
        CommandHandler("language", language_command, filters=filters.UpdateType.MESSAGE)
    )
    application.add_handler(CallbackQueryHandler(language_button, pattern=f"^{BUTTON_PREFIX}"))
