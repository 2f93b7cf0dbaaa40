"""The PTB error handler: log with the update's ids, apologise in the chat, never a traceback."""

from __future__ import annotations

from telegram import Update

from imagebot import texts
from imagebot.bot.context import BotContext
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger

log = get_logger(__name__)


async def on_error(update: object, context: BotContext) -> None:
    """Called by PTB for any exception a handler or job raised."""
    error = context.error
    fields: dict[str, object] = {"error_type": type(error).__name__}
    if isinstance(update, Update):
        fields["update_id"] = update.update_id
        if update.effective_chat:
            fields["chat_id"] = update.effective_chat.id
        if update.effective_user:
            fields["user_id"] = update.effective_user.id
    if context.job is not None:
        fields["scheduled_job"] = context.job.name
    log.error("handler_error", exc_info=error, **fields)
    if not isinstance(update, Update) or update.effective_chat is None:
        return
    if update.callback_query is not None:
        try:
            await update.callback_query.answer(texts.GENERIC_ERROR)
        except Exception:
            log.debug("callback_answer_failed")
        return
    try:
        await context.services.delivery.send_text(update.effective_chat.id, texts.GENERIC_ERROR)
    except DeliveryError as exc:
        log.warning("apology_failed", error_code=exc.code)
