"""Command handlers (/start /help /generate /usage /cancel), fallbacks, and `register()`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CommandHandler,
    MessageHandler,
    TypeHandler,
    filters,
)

from imagebot import texts
from imagebot.bot import (
    admin,
    albums,
    buttons,
    callbacks,
    edit,
    history,
    language,
    payments,
    settings_menu,
)
from imagebot.bot.context import BotContext
from imagebot.bot.errors import on_error
from imagebot.bot.requests import (
    command_argument,
    ensure_access,
    is_addressed,
    reply,
    request_job,
)
from imagebot.choices import Choices
from imagebot.clock import utcnow
from imagebot.logs import get_logger
from imagebot.models import CancelOutcome, JobKind
from imagebot.policy import Reason

if TYPE_CHECKING:
    from imagebot.services import Services

log = get_logger(__name__)

# English here (built at import); translated when sent
_CANCEL_TEXTS = {
    CancelOutcome.CANCELED: None,  # the status message itself says "Canceled"
    CancelOutcome.NOT_FOUND: texts.NOTHING_TO_CANCEL,
    CancelOutcome.FINISHED: texts.NOTHING_TO_CANCEL,
    CancelOutcome.NOT_YOURS: texts.NOT_YOUR_JOB,
    CancelOutcome.TOO_LATE: texts.TOO_LATE_TO_CANCEL,
}


async def gate(update: Update, context: BotContext) -> None:
    """Before every other handler: a user who may not use the bot costs at most one notice per
    interval, whatever they send (commands, text, media, button presses), and nothing else (no
    job, no download, no other reply). A button press is answered (the client's spinner needs
    it) with the same words as a toast, never a new message."""
    services = context.services
    user, chat = update.effective_user, update.effective_chat
    if user is None or chat is None or services.policy.may_use(user.id, chat.id):
        return
    # An invite link (t.me/<bot>?start=<code>) is the one way in from here.
    code = admin.start_code(update.message)
    if code is not None and services.control is not None:
        await admin.redeem(update, context, code)
        raise ApplicationHandlerStop
    services.metrics.refusals.labels(Reason.ALLOWLIST.value).inc()
    query = update.callback_query
    if query is not None:
        try:
            await query.answer(texts.not_allowed(user.id))
        except TelegramError as exc:
            log.debug("callback_answer_failed", error=str(exc))
        raise ApplicationHandlerStop
    message = update.effective_message
    interval = services.settings.access.refusal_notice_interval_s
    bootstrap = not services.settings.access.admins  # tell the operator their way in
    # In a group only what is addressed to this bot is refused aloud; the rest is not for us.
    if (
        message is not None
        and is_addressed(message, context)
        and await services.usage.claim_notice(user.id, Reason.ALLOWLIST.value, interval)
    ):
        log.info("request_refused", reason=Reason.ALLOWLIST.value, notice=True)
        if (message.text or "").split("@")[0].split(" ")[0] == "/start":
            await reply(update, context, texts.start(user.first_name, user.id, False, bootstrap))
        else:
            await reply(update, context, texts.not_allowed(user.id, bootstrap))
    raise ApplicationHandlerStop


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
    counts = await services.usage.used_today(user.id, utcnow())
    kinds = [JobKind.GENERATE, JobKind.EDIT]
    if services.settings.upscale.enabled:
        kinds.append(JobKind.UPSCALE)
    caps = {kind: services.settings.operation(kind).daily_cap for kind in kinds}
    await reply(
        update,
        context,
        texts.usage(
            counts,
            caps,
            services.policy.is_admin(user.id),
            Choices(services.settings).counts_images,
        ),
    )


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
        await reply(update, context, texts.tr(text))


async def unknown_command(update: Update, context: BotContext) -> None:
    message = update.effective_message
    if message is None or not message.text or not is_addressed(message, context):
        return
    await reply(update, context, texts.unknown_command(message.text.split()[0]))


async def private_text(update: Update, context: BotContext) -> None:
    """Plain text in a private chat gets the help text rather than silence."""
    limit = context.services.settings.limits.max_prompt_chars
    await reply(update, context, f"{texts.PRIVATE_TEXT_HINT}\n\n{texts.help_text(limit)}")


def register(application: Application[Any, Any, Any, Any, Any, Any], services: Services) -> None:
    """Wire every handler; order matters inside a group (the first match wins)."""
    new_messages = filters.UpdateType.MESSAGE
    # Group order (each group runs its first matching handler; a stop ends the update):
    # -3 payments (money is credited whoever pays, even a user no longer allowed),
    # -2 strangers (one notice per interval, nothing else), -1 the button gate, 0 the rest;
    # before them all, -4 sets the language the update is answered in (bot/language.py).
    application.add_handler(TypeHandler(Update, gate), group=-2)
    application.add_handler(callbacks.gate_handler(), group=-1)
    # Album parts first: an album captioned /edit is one edit, not one per photo (issue 17).
    application.add_handler(albums.handler())
    # /edit's conversation (its state in the database; its loader runs ahead of every group)
    edit.register(application, services.settings.edit.conversation_timeout_s)
    application.add_handler(CommandHandler("start", start, filters=new_messages))
    application.add_handler(CommandHandler("help", help_command, filters=new_messages))
    application.add_handler(CommandHandler("generate", generate, filters=new_messages))
    application.add_handler(CommandHandler("usage", usage, filters=new_messages))
    application.add_handler(CommandHandler("cancel", cancel, filters=new_messages))
    application.add_handler(CommandHandler("history", history.history, filters=new_messages))
    language.register(application)  # group -4 (every update) and /language with its buttons
    if services.settings.credits.enabled:
        payments.register_payment_messages(application)  # group -1, ahead of /edit
        payments.register(application)
    # only for access.admins; anyone else: unknown command
    admin.register(application, services.settings.access.admins)
    for handler in settings_menu.handlers():  # /style, /settings, shape and remix buttons
        application.add_handler(handler)
    for handler in buttons.handlers():
        application.add_handler(handler)
    application.add_handler(edit.stray_media_handler())
    application.add_handler(settings_menu.reply_handler())  # answers to remix questions
    application.add_handler(MessageHandler(new_messages & filters.COMMAND, unknown_command))
    application.add_handler(
        MessageHandler(
            new_messages & filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE,
            private_text,
        )
    )
    application.add_error_handler(on_error)
