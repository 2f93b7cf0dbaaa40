"""Albums: photos sent together and captioned /edit become ONE edit over all of them (issue 17).

Telegram delivers an album as separate messages that share `media_group_id`; the caption sits
on one of them, and nothing says which part is the last. So the parts are collected durably:
- each part's update is in the inbox before Telegram is told it arrived (intake.py), and its
  handler here writes the part to `album_parts` (a replayed update writes nothing new);
- an album is complete once no part of it came for `edit.album_quiet_s`: a timer set by each
  part, and a periodic pass (the first one shortly after start-up), turn every quiet album into
  one job through `request_job`, keyed by the captioned part's update_id, so a pass repeated
  after a crash cannot make a second job; then its parts are deleted.
A crash inside the quiet window loses nothing: the parts are in the table (or their updates in
the inbox, replayed at start-up) and the next pass makes the job.

An album without an /edit caption gets one hint in a private chat (not one per photo) and
nothing in a group. Replying /edit to one photo of an album edits that photo only (edit.py:
the reply names one message).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from telegram import Message, Update
from telegram.ext import Application, BaseHandler, CallbackContext, MessageHandler, filters

from imagebot import texts
from imagebot.bot.context import BotContext, services_of
from imagebot.bot.edit import EDIT_CAPTION, MEDIA, NEW, UNSUPPORTED, pick_input
from imagebot.bot.requests import EditInput, command_argument, is_addressed, reply, request_job
from imagebot.clock import utcnow
from imagebot.logs import get_logger, unbind_all
from imagebot.models import JobKind
from imagebot.store.albums import AlbumPart
from imagebot.store.db import is_storage_fault

if TYPE_CHECKING:
    from imagebot.services import Services

log = get_logger(__name__)

_LOCK_KEY = "albums_lock"
_TIMER_SLACK_S = 0.1  # a part's timer fires this long after its quiet window


class _InAlbum(filters.MessageFilter):
    """Messages that are part of an album (they carry a media_group_id)."""

    def filter(self, message: Message) -> bool:
        return message.media_group_id is not None


IN_ALBUM = _InAlbum(name="in_album")


async def album_part(update: Update, context: BotContext) -> None:
    """Record one part of an album (its photo, and the instruction if its caption is /edit);
    the album is handled once it has been quiet for a moment."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or message.media_group_id is None:
        return
    picked = pick_input(message)
    photo = picked if isinstance(picked, EditInput) else None
    instruction: str | None = None
    if message.caption and EDIT_CAPTION.check_update(update) and is_addressed(message, context):
        instruction = command_argument(message.caption)
    part = AlbumPart(
        chat_id=message.chat.id,
        media_group_id=str(message.media_group_id),
        message_id=message.message_id,
        update_id=update.update_id,
        user_id=user.id,
        file_id=photo.file_id if photo else None,
        file_size=photo.file_size if photo else None,
        width=photo.width if photo else None,
        height=photo.height if photo else None,
        instruction=instruction,
    )
    services = context.services
    is_new = await services.albums.add(part, utcnow())
    log.info(
        "album_part_saved",
        media_group_id=part.media_group_id,
        message_id=part.message_id,
        captioned=instruction is not None,
        new=is_new,
    )
    if context.job_queue is not None:
        quiet_s = services.settings.edit.album_quiet_s
        context.job_queue.run_once(_tick, quiet_s + _TIMER_SLACK_S, name="album-quiet")


async def _tick(context: CallbackContext[Any, Any, Any, Any]) -> None:
    unbind_all()
    await finish_quiet_albums(context.application)


async def finish_quiet_albums(application: Application[Any, Any, Any, Any, Any, Any]) -> int:
    """Turn every album that has been quiet long enough into its job (or its hint); returns
    how many albums were handled. One pass at a time."""
    services = services_of(application)
    lock = application.bot_data.setdefault(_LOCK_KEY, asyncio.Lock())
    store = services.albums
    handled = 0
    async with lock:
        quiet = await store.quiet(utcnow(), services.settings.edit.album_quiet_s)
        for chat_id, media_group_id in quiet:
            parts = await store.parts(chat_id, media_group_id)
            if not parts:
                continue
            try:
                await _finish(application, services, parts)
            except Exception as exc:
                if is_storage_fault(exc):
                    log.warning("album_finish_postponed", error=str(exc))
                    continue  # the parts stay: the next pass tries again
                # anything else would fail the same way every pass: give up on this album
                log.exception("album_finish_failed", media_group_id=media_group_id)
            await store.forget(chat_id, media_group_id, [p.message_id for p in parts])
            handled += 1
    return handled


async def _finish(
    application: Application[Any, Any, Any, Any, Any, Any],
    services: Services,
    parts: list[AlbumPart],
) -> None:
    captioned = next((p for p in parts if p.instruction is not None), None)
    anchor = captioned or parts[0]
    payload = await services.inbox.get(anchor.update_id)
    update = Update.de_json(payload, application.bot) if payload else None
    if update is None or update.effective_chat is None:
        log.warning("album_update_missing", update_id=anchor.update_id)
        return
    context = BotContext.from_update(update, application)
    if captioned is None:
        if update.effective_chat.type == "private":
            await reply(update, context, texts.ALBUM_HINT)
        log.info("album_without_edit", parts=len(parts))
        return
    photos = [EditInput(p.file_id, p.file_size, p.width, p.height) for p in parts if p.file_id]
    if not photos:
        await reply(update, context, texts.ALBUM_NOTHING_TO_EDIT)
        return
    limit = services.settings.edit.max_input_images
    used = photos[:limit]
    job = await request_job(
        update, context, JobKind.EDIT, captioned.instruction, edit_input=used[0], album=used
    )
    log.info(
        "album_edit",
        parts=len(parts),
        photos=len(photos),
        used=len(used),
        job_id=job.id if job else None,
    )
    if job is not None and len(photos) > limit:
        await reply(update, context, texts.album_first_used(len(photos), limit))


def handler() -> BaseHandler[Update, Any, Any]:
    """Every photo or file that is part of an album; register it ahead of the /edit
    conversation so no part is taken as a single photo."""
    return MessageHandler(NEW & IN_ALBUM & (MEDIA | UNSUPPORTED), album_part)


def schedule(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """The periodic pass: the first one a quiet window after start-up (albums a restart
    interrupted, their replayed parts saved by then), then a safety net for lost timers."""
    job_queue = application.job_queue
    assert job_queue is not None
    quiet_s = services_of(application).settings.edit.album_quiet_s
    job_queue.run_repeating(
        _tick, max(10.0, quiet_s), first=quiet_s + 2 * _TIMER_SLACK_S, name="albums"
    )
