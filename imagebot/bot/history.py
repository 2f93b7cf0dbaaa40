"""/history: the user's last finished requests in this chat, each with a button that sends its
result again from the Telegram file_ids recorded at delivery (issue 17).

Sending again is free: no upload (Telegram already has the files), no provider call, no job,
no quota. The button goes through the gate (callbacks.py) like every job button: only the
requester or an admin, only in the job's own chat.
"""

from __future__ import annotations

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update

from imagebot import texts
from imagebot.bot.callbacks import Button, ButtonData, checked
from imagebot.bot.context import BotContext
from imagebot.bot.requests import ensure_access, is_addressed, reply
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.models import Job, JobKind, JobStatus

log = get_logger(__name__)

HISTORY_SIZE = 10


def _when(job: Job) -> str:
    """'2026-11-21 10:15' from the row's ISO time (UTC)."""
    return job.created_at[:16].replace("T", " ")


def _can_resend(job: Job) -> bool:
    return job.status is JobStatus.SUCCEEDED and any(job.result_file_ids)


def history_keyboard(jobs: list[Job]) -> InlineKeyboardMarkup | None:
    rows = [
        [
            InlineKeyboardButton(
                texts.history_button(job.id, job.prompt),
                callback_data=ButtonData(Button.HISTORY, job.id).encode(),
            )
        ]
        for job in jobs
        if _can_resend(job)
    ]
    return InlineKeyboardMarkup(rows) if rows else None


async def history(update: Update, context: BotContext) -> None:
    """/history: when, what, the prompt and how it ended, for the last 10 finished jobs."""
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if user is None or chat is None or not is_addressed(message, context):
        return
    if not await ensure_access(update, context):
        return
    services = context.services
    jobs = await services.store.history(user.id, chat.id, HISTORY_SIZE)
    if not jobs:
        await reply(update, context, texts.HISTORY_EMPTY)
        return
    lines = [
        texts.history_line(
            _when(job), job.kind, job.prompt, job.status.value, job.deleted_at is not None
        )
        for job in jobs
    ]
    try:
        await services.delivery.send_text(
            chat.id,
            texts.history_text(lines),
            reply_to=message.message_id if message else None,
            markup=history_keyboard(jobs),
        )
    except DeliveryError as exc:
        log.warning("reply_failed", error_code=exc.code)


async def resend(update: Update, context: BotContext) -> None:
    """A /history entry pressed: the result again, by file_id (nothing uploaded or paid)."""
    query = update.callback_query
    press = checked(context, Button.HISTORY)
    if query is None or press is None:
        return
    if not await ensure_access(update, context):
        await query.answer()
        return
    job = press.job
    file_ids = [file_id for file_id in job.result_file_ids if file_id]
    if not _can_resend(job) or not file_ids:
        await query.answer(texts.HISTORY_NOTHING)
        return
    try:
        sent = await context.services.delivery.resend(
            press.chat_id,  # the job's chat, never anywhere else
            file_ids,
            as_documents=job.kind is JobKind.UPSCALE,
            reply_to=press.message_id,
        )
    except DeliveryError as exc:
        log.warning("history_resend_failed", job_id=job.id, error_code=exc.code)
        await query.answer(texts.HISTORY_GONE, show_alert=True)
        return
    log.info("history_resent", job_id=job.id, messages=len(sent))
    await query.answer(texts.HISTORY_SENDING)
