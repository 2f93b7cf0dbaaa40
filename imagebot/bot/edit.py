"""/edit in all its ways in: a captioned photo, a reply to a photo, a conversation, ✏️ Edit this.

Every way ends in `request_job`, the same path as /generate. The photo is remembered only as a
Telegram file_id; the worker downloads its bytes (the file URL carries the bot token).
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from telegram import ForceReply, Message, Update
from telegram.ext import (
    Application,
    BaseHandler,
    CallbackContext,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    TypeHandler,
    filters,
)

from imagebot import texts
from imagebot.bot.callbacks import Button, checked
from imagebot.bot.context import BotContext, services_of
from imagebot.bot.requests import (
    EditInput,
    command_argument,
    ensure_access,
    is_addressed,
    reply,
    request_job,
)
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger, unbind_all
from imagebot.media import TELEGRAM_DOWNLOAD_LIMIT
from imagebot.models import JobKind
from imagebot.store.conversations import Conversation, ConversationKey
from imagebot.store.db import is_storage_fault

log = get_logger(__name__)

NAME = "edit"  # conversations.name
WAIT_PHOTO, WAIT_INSTRUCTION = "photo", "instruction"  # conversations.state
END = -1  # a callback's "the conversation is over" (PTB's ConversationHandler.END)
LOAD_GROUP = -5  # ahead of every other group (language -4, payments -3, ...)
_TIMER_SLACK_S = 0.1  # a timeout timer fires this long after the conversation expires
_SWEEP_MAX_S = 30.0
Next = str | int | None  # what a callback returns: a state, END, or None (stay)

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
    """What this conversation gathered so far (written back when the update is done)."""
    turn = _current.get()
    if turn is None or turn.update_id != update.update_id:
        # not run by EditConversation (cannot happen in the bot): a scratch dict
        return {}
    return turn.data


def _photo_of(state: dict[str, Any]) -> EditInput | None:
    """The photo the conversation holds, if any (kept as JSON in the database)."""
    photo = state.get("photo")
    if not isinstance(photo, dict) or not isinstance(photo.get("file_id"), str):
        return None
    return EditInput(
        photo["file_id"], photo.get("file_size"), photo.get("width"), photo.get("height")
    )


def _clear(context: BotContext, update: Update) -> None:
    _state(context, update).clear()


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


async def _finish(update: Update, context: BotContext, photo: EditInput, instruction: str) -> Next:
    _clear(context, update)
    turn = _current.get()
    if turn is not None and turn.key is not None and turn.update_id == update.update_id:
        # The conversation ends in the transaction that creates the job: a crash right after
        # cannot leave it waiting, to make a second job of the user's next message.
        key, store = turn.key, context.services.conversations
        context.also_in_job_transaction = lambda conn: store.write_in(conn, key, None)
    await request_job(update, context, JobKind.EDIT, instruction, edit_input=photo)
    return END


async def _with_photo(
    update: Update, context: BotContext, picked: EditInput | str | None, instruction: str
) -> Next:
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
    state["photo"] = asdict(picked)
    await _ask(update, context, texts.EDIT_ASK_INSTRUCTION)
    return WAIT_INSTRUCTION


async def start_edit(update: Update, context: BotContext) -> Next:
    """/edit [instruction], alone or as a reply to a photo."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return END
    if not await ensure_access(update, context):
        return END
    picked = pick_input(message.reply_to_message)
    return await _with_photo(update, context, picked, command_argument(message.text))


async def caption_edit(update: Update, context: BotContext) -> Next:
    """A photo (or image file) sent with the caption /edit <instruction>."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return END
    if not await ensure_access(update, context):
        return END
    return await _with_photo(
        update, context, pick_input(message), command_argument(message.caption)
    )


async def edit_this(update: Update, context: BotContext) -> Next:
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


async def got_photo(update: Update, context: BotContext) -> Next:
    message = update.effective_message
    picked = pick_input(message)
    if not isinstance(picked, EditInput):
        await reply(update, context, picked or texts.EDIT_WRONG_KIND)
        return None  # stay in the current state
    state = _state(context, update)
    caption = command_argument(message.caption) if message else ""
    instruction = caption or str(state.get("instruction") or "")
    return await _with_photo(update, context, picked, instruction)


async def got_instruction(update: Update, context: BotContext) -> Next:
    message = update.effective_message
    photo = _photo_of(_state(context, update))
    if message is None or photo is None:
        return END
    return await _finish(update, context, photo, message.text or "")


async def wrong_kind(update: Update, context: BotContext) -> Next:
    """Anything else while waiting: a hint, and the conversation stays where it was."""
    waiting_photo = "photo" not in _state(context, update)
    await reply(update, context, texts.EDIT_WRONG_KIND if waiting_photo else texts.EDIT_NEED_TEXT)
    return None


async def unsupported(update: Update, context: BotContext) -> Next:
    await reply(update, context, texts.EDIT_UNSUPPORTED_MEDIA)
    return None


async def cancel_edit(update: Update, context: BotContext) -> Next:
    _clear(context, update)
    await reply(update, context, texts.EDIT_CANCELED)
    return END


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


def register(
    application: Application[Any, Any, Any, Any, Any, Any], timeout_s: float
) -> EditConversation:
    """The conversation in group 0 (here, among the others: the first match wins) and its
    loader ahead of every group; returns the conversation handler."""
    application.add_handler(TypeHandler(Update, load_conversation), group=LOAD_GROUP)
    handler = conversation(timeout_s)
    application.add_handler(handler)
    return handler


def conversation(timeout_s: float) -> EditConversation:
    """/edit's ways in and its two waits; a conversation idle for `timeout_s` ends."""
    entry_points: list[BaseHandler[Update, Any, Any]] = [
        CommandHandler("edit", start_edit, filters=NEW),
        # Videos and GIFs captioned /edit come in too, to be told what can be edited.
        MessageHandler(NEW & (MEDIA | UNSUPPORTED) & EDIT_CAPTION, caption_edit),
        CallbackQueryHandler(edit_this, pattern=f"^{Button.EDIT.value}:"),
    ]
    not_command = NEW & ~filters.COMMAND
    states: dict[str, list[BaseHandler[Update, Any, Any]]] = {
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
    }
    return EditConversation(
        entry_points=entry_points,
        states=states,
        fallbacks=[CommandHandler("cancel", cancel_edit, filters=NEW)],
        timeout_s=timeout_s,
    )


# -- the conversation's state in the database ----------------------------------------------


@dataclass(slots=True)
class _Turn:
    """One update's view of its conversation: as loaded, and what the handlers gather."""

    update_id: int
    key: ConversationKey | None
    loaded: Conversation | None = None
    error: BaseException | None = None  # the read failed: the update waits for the store
    data: dict[str, Any] = field(default_factory=dict)


# An update's handlers run in one task, group after group: the loader (group LOAD_GROUP) sets
# this and EditConversation (group 0) reads it, synchronously in check_update.
_current: ContextVar[_Turn | None] = ContextVar("imagebot_edit_turn", default=None)


def _key(update: Update) -> ConversationKey | None:
    chat, user = update.effective_chat, update.effective_user
    if chat is None or user is None:
        return None
    return ConversationKey(chat.id, user.id, NAME)


def _may_be_waited_for(update: Update) -> bool:
    """Could a waiting conversation take this update: a new message that is not a command, or
    /cancel. Commands, buttons and the rest never depend on the state (no read for them)."""
    message = update.message
    if message is None:
        return False
    if not filters.COMMAND.check_update(update):
        return True
    text = message.text
    if not isinstance(text, str) or not text.strip():
        return False  # a malformed body: the handlers that parse it report it
    word = text.split(maxsplit=1)[0].split("@", 1)[0]
    return word.lower() == "/cancel"


async def load_conversation(update: Update, context: BotContext) -> None:
    """Ahead of every group: read the conversation this update may continue."""
    key = _key(update) if _may_be_waited_for(update) else None
    turn = _Turn(update.update_id, key)
    _current.set(turn)
    if key is None:
        return
    try:
        turn.loaded = await context.services.conversations.get(key)
    except Exception as exc:  # told to the update in group 0 (EditConversation raises it)
        log.warning("edit_conversation_read_failed", error=str(exc))
        turn.error = exc


@dataclass(frozen=True, slots=True)
class _Match:
    handler: BaseHandler[Update, Any, Any] | None
    check: object
    entry: bool = False
    error: BaseException | None = None


async def _unused(update: Update, context: BotContext) -> None:  # pragma: no cover
    """EditConversation runs its inner handlers itself."""


class EditConversation(BaseHandler[Update, BotContext, None]):
    """PTB's ConversationHandler with its state in the database (table conversations).

    Same routing: the entry points (re-entry allowed) first, then the current state's
    handlers, then the fallbacks; a callback returns the next state, END, or None (stay). The
    state is read when the update starts (`load_conversation`) and written, with what was
    gathered, in the transaction that marks the update processed (ConversationStore.advance).
    A conversation idle for `timeout_s` ends: a timer set by each write, and a periodic pass
    for timers a restart lost, tell the user once (whichever deletes the row).
    """

    def __init__(
        self,
        *,
        entry_points: list[BaseHandler[Update, Any, Any]],
        states: dict[str, list[BaseHandler[Update, Any, Any]]],
        fallbacks: list[BaseHandler[Update, Any, Any]],
        timeout_s: float,
    ) -> None:
        super().__init__(_unused)
        self.entry_points = entry_points
        self.states = states
        self.fallbacks = fallbacks
        self.timeout_s = timeout_s

    def check_update(self, update: object) -> _Match | None:
        if not isinstance(update, Update) or update.channel_post or update.edited_channel_post:
            return None
        if _key(update) is None:
            return None
        for handler in self.entry_points:
            check = handler.check_update(update)
            if check is not None and check is not False:
                return _Match(handler, check, entry=True)
        turn = _current.get()
        if turn is None or turn.update_id != update.update_id or turn.key is None:
            return None  # nothing a waiting conversation could take
        if turn.error is not None:
            return _Match(None, None, error=turn.error)
        if turn.loaded is None:
            return None
        for handler in [*self.states.get(turn.loaded.state, []), *self.fallbacks]:
            check = handler.check_update(update)
            if check is not None and check is not False:
                return _Match(handler, check)
        return None

    async def handle_update(  # type: ignore[override]
        self,
        update: Update,
        application: Application[Any, Any, Any, Any, Any, Any],
        check_result: _Match,
        context: BotContext,
    ) -> None:
        if check_result.error is not None:
            raise check_result.error  # a storage fault: the update is run again later
        assert check_result.handler is not None
        turn = _current.get()
        if turn is None or turn.update_id != update.update_id or turn.key is None:
            # an entry point on an update the loader did not read for (a command, a button):
            # re-entry replaces whatever was waiting, so nothing needs reading
            turn = _Turn(update.update_id, _key(update))
            _current.set(turn)
        previous = turn.loaded
        turn.data = {} if check_result.entry or previous is None else dict(previous.data)
        new_state = await check_result.handler.handle_update(
            update, application, check_result.check, context
        )
        state: str | None
        data = turn.data
        if new_state == END:
            state = None
        elif isinstance(new_state, str) and new_state in self.states:
            state = new_state
        else:  # None: stay where it was
            if previous is None:
                return
            state = previous.state
            data = data if not check_result.entry else previous.data
        if previous is None and state is None:
            return
        assert turn.key is not None
        message = update.effective_message
        if state is not None:
            data = {
                **data,
                "_reply_to": message.message_id if message else None,
                "_language": texts.current_language(),
            }
        expires = await context.services.conversations.advance(
            turn.key, state, data, update_id=update.update_id, timeout_s=self.timeout_s
        )
        log.info("edit_conversation", state=state or "ended")
        if expires is not None and application.job_queue is not None:
            application.job_queue.run_once(
                _timer,
                self.timeout_s + _TIMER_SLACK_S,
                data=turn.key,
                name="edit-timeout",
            )


async def _timer(context: CallbackContext[Any, Any, Any, Any]) -> None:
    unbind_all()
    job = context.job
    if job is not None and isinstance(job.data, ConversationKey):
        await end_timed_out(context.application, [job.data])


async def end_timed_out(
    application: Application[Any, Any, Any, Any, Any, Any],
    keys: list[ConversationKey] | None = None,
) -> int:
    """End conversations that have timed out (`keys`, or every one the store finds) and tell
    each user once, in their language, quoting their last message; returns how many."""
    services = services_of(application)
    store = services.conversations
    ended = 0
    try:
        for key in keys if keys is not None else await store.expired():
            gone = await store.expire(key)
            if gone is None:
                continue  # still waiting (refreshed), or another process told the user
            ended += 1
            log.info("edit_conversation_timed_out", chat_id=key.chat_id, user_id=key.user_id)
            reply_to = gone.data.get("_reply_to")
            with texts.speaking(gone.data.get("_language")):
                try:
                    await services.delivery.send_text(
                        key.chat_id,
                        texts.EDIT_TIMED_OUT,
                        reply_to=reply_to if isinstance(reply_to, int) else None,
                    )
                except DeliveryError as exc:
                    log.warning("edit_timeout_notice_failed", error_code=exc.code)
    except Exception as exc:
        if not is_storage_fault(exc):
            raise
        log.warning("edit_timeouts_postponed", error=str(exc))  # the next pass tries again
    return ended


def schedule(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """The periodic pass over timed-out conversations: for timers a restart (or a dead
    process) lost; the first one shortly after start-up."""
    job_queue = application.job_queue
    assert job_queue is not None
    timeout_s = services_of(application).settings.edit.conversation_timeout_s
    interval = min(_SWEEP_MAX_S, max(1.0, timeout_s / 2))

    async def tick(_: object) -> None:
        unbind_all()
        await end_timed_out(application)

    job_queue.run_repeating(tick, interval, first=min(interval, 5.0), name="edit-timeouts")
