"""Buttons under results and status messages: 🔁 Again, 📎 Original, ✖ Cancel.

(✏️ Edit this starts the edit conversation and lives in edit.py.) Their data names a job id;
the job row is in SQLite, so buttons keep working after a restart. Every press is answered.
"""

from __future__ import annotations

from typing import Any

from telegram import Update
from telegram.ext import BaseHandler, CallbackQueryHandler

from imagebot.bot import texts
from imagebot.bot.context import BotContext
from imagebot.bot.requests import EditInput, ensure_access, request_job
from imagebot.errors import DeliveryError, MediaError
from imagebot.logs import get_logger
from imagebot.worker import CancelOutcome

log = get_logger(__name__)

_CANCEL_ANSWERS = {
    CancelOutcome.CANCELED: texts.CANCELED_SHORT,
    CancelOutcome.NOT_FOUND: texts.BUTTON_EXPIRED,
    CancelOutcome.FINISHED: texts.NOTHING_TO_CANCEL,
    CancelOutcome.NOT_YOURS: texts.NOT_YOUR_JOB,
    CancelOutcome.TOO_LATE: texts.TOO_LATE_TO_CANCEL,
}


def _job_id(data: str | None) -> int | None:
    parts = (data or "").split(":")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def again(update: Update, context: BotContext) -> None:
    """A new job with the same prompt (and photo), through every guard like a new command."""
    query = update.callback_query
    assert query is not None
    job_id = _job_id(query.data)
    job = await context.services.store.get(job_id) if job_id else None
    if job is None:
        await query.answer(texts.BUTTON_EXPIRED)
        return
    await query.answer()
    edit_input = EditInput(job.input_file_id) if job.input_file_id else None
    await request_job(
        update, context, job.kind, job.prompt, edit_input=edit_input, parent_job_id=job.id
    )


async def original(update: Update, context: BotContext) -> None:
    """The full-resolution result as a document, from disk: no provider call."""
    query = update.callback_query
    assert query is not None
    services = context.services
    job_id = _job_id(query.data)
    job = await services.store.get(job_id) if job_id else None
    if job is None or query.message is None:
        await query.answer(texts.BUTTON_EXPIRED)
        return
    if not await ensure_access(update, context):
        await query.answer()
        return
    which = (query.data or "").split(":")[2] if (query.data or "").count(":") >= 2 else "*"
    names = job.result_paths if which == "*" else job.result_paths[int(which) : int(which) + 1]
    try:
        images = [await services.results.load_one(name) for name in names]
    except MediaError:
        images = []
    if not images:
        await query.answer(texts.ORIGINAL_GONE, show_alert=True)
        return
    await query.answer(texts.ORIGINAL_SENDING)
    for n, image in enumerate(images):
        try:
            await services.delivery.send_document(
                query.message.chat.id,
                image.data,
                f"imagebot-{job.id}-{n + 1}.{image.extension}",
                reply_to=query.message.message_id,
            )
        except DeliveryError as exc:
            log.warning("original_send_failed", job_id=job.id, error_code=exc.code)
            return


async def cancel_button(update: Update, context: BotContext) -> None:
    """✖ on a status message: only the job's owner can cancel it."""
    query = update.callback_query
    assert query is not None
    job_id = _job_id(query.data)
    if job_id is None or update.effective_user is None:
        await query.answer(texts.BUTTON_EXPIRED)
        return
    outcome = await context.services.runner.cancel(job_id, user_id=update.effective_user.id)
    await query.answer(_CANCEL_ANSWERS[outcome], show_alert=outcome is CancelOutcome.NOT_YOURS)


async def expired(update: Update, context: BotContext) -> None:
    """Any other button (old layout, garbage data): a short answer, never silence."""
    if update.callback_query is not None:
        await update.callback_query.answer(texts.BUTTON_EXPIRED)


def handlers() -> list[BaseHandler[Update, Any, Any]]:
    return [
        CallbackQueryHandler(again, pattern=r"^a:\d+$"),
        CallbackQueryHandler(original, pattern=r"^o:\d+:(\d+|\*)$"),
        CallbackQueryHandler(cancel_button, pattern=r"^x:\d+$"),
        CallbackQueryHandler(expired),
    ]
