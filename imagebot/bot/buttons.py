"""Buttons under results and status messages: 🔁 Again, 📎 Original, ✖ Cancel, ⤴ Upscale,
🗑 Delete (and /history's entries, in history.py).

(✏️ Edit this starts the edit conversation and lives in edit.py.) Their data names a job id;
the job row is in SQLite, so buttons keep working after a restart. Every press is answered.
Who may press, and on which chat's job, is decided once for all of them in callbacks.py; a
handler here only sees presses that passed, through `callbacks.checked`.
"""

from __future__ import annotations

from typing import Any

from telegram import Update
from telegram.ext import BaseHandler, CallbackQueryHandler

from imagebot import texts
from imagebot.bot import history
from imagebot.bot.callbacks import Button, checked
from imagebot.bot.context import BotContext
from imagebot.bot.requests import EditInput, ensure_access, request_job
from imagebot.clock import iso
from imagebot.errors import DeliveryError, MediaError
from imagebot.logs import get_logger
from imagebot.models import CancelOutcome, JobKind, JobStatus

log = get_logger(__name__)

# English here (built at import); translated when answered
_CANCEL_ANSWERS = {
    CancelOutcome.CANCELED: texts.CANCELED_SHORT,
    CancelOutcome.NOT_FOUND: texts.BUTTON_EXPIRED,
    CancelOutcome.FINISHED: texts.NOTHING_TO_CANCEL,
    CancelOutcome.NOT_YOURS: texts.NOT_YOUR_JOB,
    CancelOutcome.TOO_LATE: texts.TOO_LATE_TO_CANCEL,
}


async def again(update: Update, context: BotContext) -> None:
    """A new job with the same prompt (and photo), through every guard like a new command."""
    query = update.callback_query
    press = checked(context, Button.AGAIN)
    if query is None or press is None:
        return
    job = press.job
    if job.kind is JobKind.UPSCALE:  # no such button: an upscale is redone with ⤴
        await query.answer(texts.BUTTON_EXPIRED)
        return
    await query.answer()
    edit_input = EditInput(job.input_file_id) if job.input_file_id else None
    await request_job(
        update,
        context,
        job.kind,
        job.prompt,
        edit_input=edit_input,
        parent_job_id=job.id,
        album=[EditInput(file_id) for file_id in job.input_file_ids],  # an album edit's photos
    )


async def original(update: Update, context: BotContext) -> None:
    """The full-resolution result as a document, from disk: no provider call."""
    query = update.callback_query
    press = checked(context, Button.ORIGINAL)
    if query is None or press is None:
        return
    services = context.services
    job = press.job
    if not await ensure_access(update, context):
        await query.answer()
        return
    index = press.data.index
    names = job.result_paths if index is None else job.result_paths[index : index + 1]
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
                press.chat_id,  # the job's chat, never anywhere else
                image.data,
                f"imagebot-{job.id}-{n + 1}.{image.extension}",
                reply_to=press.message_id,
            )
        except DeliveryError as exc:
            log.warning("original_send_failed", job_id=job.id, error_code=exc.code)
            return


async def cancel_button(update: Update, context: BotContext) -> None:
    """✖ on a status message: the requester (or an admin) cancels the job."""
    query = update.callback_query
    press = checked(context, Button.CANCEL)
    if query is None or press is None:
        return
    # The gate checked who may press; the runner cancels on the requester's behalf.
    outcome = await context.services.runner.cancel(press.job.id, user_id=press.job.user_id)
    await query.answer(
        texts.tr(_CANCEL_ANSWERS[outcome]), show_alert=outcome is CancelOutcome.NOT_YOURS
    )


async def upscale(update: Update, context: BotContext) -> None:
    """⤴ Upscale under a result image: a new `upscale` job for that image, through every
    guard like a new command; the larger image comes back as a file."""
    query = update.callback_query
    press = checked(context, Button.UPSCALE)
    if query is None or press is None:
        return
    services = context.services
    job, index = press.job, press.data.index or 0
    file_ids = job.result_file_ids
    offered = JobKind.UPSCALE in services.runner.pipeline.providers
    if (
        not offered
        or job.kind is JobKind.UPSCALE
        or job.status is not JobStatus.SUCCEEDED
        or index >= len(file_ids)
        or not file_ids[index]
    ):
        await query.answer(texts.UPSCALE_GONE)
        return
    await query.answer()
    await request_job(
        update,
        context,
        JobKind.UPSCALE,
        job.prompt,
        edit_input=EditInput(file_ids[index]),
        parent_job_id=job.id,
        source_index=index,
    )


async def delete(update: Update, context: BotContext) -> None:
    """🗑 Delete under a result: its messages go, and the job row records who did it. The
    gate let only the requester or an admin through."""
    query = update.callback_query
    press = checked(context, Button.DELETE)
    if query is None or press is None:
        return
    services = context.services
    job = press.job
    if job.deleted_at is not None:
        await query.answer(texts.ALREADY_DELETED)
        return
    await services.store.update(job.id, deleted_at=iso(), deleted_by=press.user_id)
    targets = list(job.delivered_message_ids)
    if press.message_id not in targets:
        targets.append(press.message_id)
    gone = 0
    for message_id in targets:
        try:
            gone += await services.delivery.delete(press.chat_id, message_id)
        except DeliveryError as exc:
            log.warning("result_delete_failed", job_id=job.id, error_code=exc.code)
    log.info("result_deleted", job_id=job.id, messages=gone, by_admin=press.by_admin)
    await query.answer(texts.DELETED)


async def expired(update: Update, context: BotContext) -> None:
    """A press the gate let through that no handler took: a short answer, never silence."""
    if update.callback_query is not None:
        await update.callback_query.answer(texts.BUTTON_EXPIRED)


def handlers() -> list[BaseHandler[Update, Any, Any]]:
    """The buttons, for the group after the gate (`callbacks.gate_handler`) checked the press."""
    return [
        CallbackQueryHandler(again, pattern=f"^{Button.AGAIN.value}:"),
        CallbackQueryHandler(original, pattern=f"^{Button.ORIGINAL.value}:"),
        CallbackQueryHandler(cancel_button, pattern=f"^{Button.CANCEL.value}:"),
        CallbackQueryHandler(upscale, pattern=f"^{Button.UPSCALE.value}:"),
        CallbackQueryHandler(delete, pattern=f"^{Button.DELETE.value}:"),
        CallbackQueryHandler(history.resend, pattern=f"^{Button.HISTORY.value}:"),
        CallbackQueryHandler(expired),
    ]
