"""Command handlers (/start /help /generate /usage /cancel), fallbacks, and `register()`."""

from __future__ import annotations

from typing import Any

from telegram import Update
from telegram.ext import Application, CommandHandler, MessageHandler, filters

from imagebot.bot import buttons, callbacks, edit, payments, texts
from imagebot.bot.context import BotContext
from imagebot.bot.errors import on_error
from imagebot.bot.requests import (
    command_argument,
    ensure_access,
    is_addressed,
    reply,
    request_job,
)
from imagebot.models import JobKind
from imagebot.store.db import utcnow
from imagebot.store.usage import used_today
from imagebot.worker import CancelOutcome

_CANCEL_TEXTS = {
    CancelOutcome.CANCELED: None,  # the status message itself says "Canceled"
    CancelOutcome.NOT_FOUND: texts.NOTHING_TO_CANCEL,
    CancelOutcome.FINISHED: texts.NOTHING_TO_CANCEL,
    CancelOutcome.NOT_YOURS: texts.NOT_YOUR_JOB,
    CancelOutcome.TOO_LATE: texts.TOO_LATE_TO_CANCEL,
}


async def start(update: Update, context: BotContext) -> None:
    """Greet; a refused user learns their id so they can ask the operator."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None or not is_addressed(message, context):
        return
    allowed = context.services.policy.may_use(user.id, message.chat.id)
    await reply(update, context, texts.start(user.first_name, user.id, allowed))


async def help_command(update: Update, context: BotContext) -> None:
    if not is_addressed(update.effective_message, context):
        return
    await reply(
        update, context, texts.help_text(context.services.settings.limits.max_prompt_chars)
    )


async def generate(update: Update, context: BotContext) -> None:
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return
    await request_job(update, context, JobKind.GENERATE, command_argument(message.text))


async def usage(update: Update, context: BotContext) -> None:
    user = update.effective_user
    if user is None or not is_addressed(update.effective_message, context):
        return
    if not await ensure_access(update, context):
        return
    services = context.services
    counts = await used_today(services.db, user.id, utcnow())
    caps = {
        JobKind.GENERATE: services.settings.generate.daily_cap,
        JobKind.EDIT: services.settings.edit.daily_cap,
    }
    await reply(update, context, texts.usage(counts, caps, services.policy.is_admin(user.id)))


async def cancel(update: Update, context: BotContext) -> None:
    """/cancel outside an edit conversation: cancel the user's newest job in this chat."""
    user, chat = update.effective_user, update.effective_chat
    if user is None or chat is None or not is_addressed(update.effective_message, context):
        return
    services = context.services
    job = await services.store.latest_active(user.id, chat.id)
    if job is None:
        await reply(update, context, texts.NOTHING_TO_CANCEL)
        return
    outcome = await services.runner.cancel(job.id, user_id=user.id)
    text = _CANCEL_TEXTS[outcome]
    if text:
        await reply(update, context, text)


async def unknown_command(update: Update, context: BotContext) -> None:
    message = update.effective_message
    if message is None or not message.text or not is_addressed(message, context):
        return
    await reply(update, context, texts.unknown_command(message.text.split()[0]))


async def private_text(update: Update, context: BotContext) -> None:
    """Plain text in a private chat gets the help text rather than silence."""
    limit = context.services.settings.limits.max_prompt_chars
    await reply(update, context, f"{texts.PRIVATE_TEXT_HINT}\n\n{texts.help_text(limit)}")


def register(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Wire every handler; order matters inside a group (the first match wins)."""
    new_messages = filters.UpdateType.MESSAGE
    # Every button press is checked first, in a group of its own (bot/callbacks.py).
    application.add_handler(callbacks.gate_handler(), group=-1)
    application.add_handler(edit.conversation(application))
    application.add_handler(CommandHandler("start", start, filters=new_messages))
    application.add_handler(CommandHandler("help", help_command, filters=new_messages))
    application.add_handler(CommandHandler("generate", generate, filters=new_messages))
    application.add_handler(CommandHandler("usage", usage, filters=new_messages))
    application.add_handler(CommandHandler("cancel", cancel, filters=new_messages))
    if application.bot_data["services"].settings.credits.enabled:
        payments.register_payment_messages(application)  # group -1, ahead of /edit
        payments.register(application)
    for handler in buttons.handlers():
        application.add_handler(handler)
    application.add_handler(edit.stray_media_handler())
    application.add_handler(MessageHandler(new_messages & filters.COMMAND, unknown_command))
    application.add_handler(
        MessageHandler(
            new_messages & filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE,
            private_text,
        )
    )
    application.add_error_handler(on_error)
