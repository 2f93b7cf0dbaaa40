"""Button presses: the one parser of callback data and the one check of who may press.

Telegram delivers whatever callback data a client sends, so the data is untrusted input: it
may name another user's job, a job of another chat, or be garbage. Every press goes through
`check_press` first (the `gate` handler runs it in handler group -1, before any button
handler and before the /edit conversation can see the press). A press acts only when:

- the data is well formed (`<button>:<job id>[:<image>]`, ASCII digits, at most 64 bytes),
- the data is one of the buttons on the pressed message, when that message shows a keyboard,
- the job exists,
- the presser is the job's requester or an admin (`access.admins`), in private chats and
  groups alike: 🔁 Again, ✏️ Edit this and ⤴ Upscale spend quota, 📎 Original and a /history
  entry reveal a file, ✖ stops a job, 🗑 Delete removes a result,
- the press comes from the job's own chat. The job's chat is the only place a button acts
  on or sends to: a press in chat B naming a job of chat A is refused, even from A's
  requester, so no file of A ever reaches B.

The choice buttons of /style and /settings name no job but the user whose choices they set
(`p<s|h|c>:<user id>:<value>`): only that user may press them (`ChoiceData`, `ChoicePress`).

A refused press gets a short answer (the little notice on the presser's screen), a log line
for the operator (`button_refused` with the reason), and changes nothing: nothing is sent to
any chat, no job is made, no provider is called. New buttons (e.g. payments) add a `Button`
member and its shape in `_INDEX`; the gate then covers them like every other button.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from telegram import Message, Update
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, BaseHandler, CallbackQueryHandler

from imagebot.bot import texts
from imagebot.logs import get_logger
from imagebot.models import Job

if TYPE_CHECKING:
    # Only for annotations: delivery.py encodes button data with this module, and the
    # context (through services) imports delivery.
    from imagebot.bot.context import BotContext

log = get_logger(__name__)

MAX_DATA_BYTES = 64  # Telegram's limit for callback_data: anything longer was not our button
MAX_JOB_ID = 2**63 - 1  # SQLite's INTEGER; a bigger number would overflow the query
MAX_INDEX = 99  # an album has at most 10 images
_SHAPE = re.compile(r"([a-z]):([1-9][0-9]{0,18})(?::([0-9]{1,2}|\*))?", re.ASCII)
# a job button naming a choice by name (h:<job>:<shape name>)
_NAMED = re.compile(r"([a-z]):([1-9][0-9]{0,18}):([a-z0-9-]{1,32})", re.ASCII)
# a choice button of /style or /settings: p<field>:<user id>:<value>
_CHOICE = re.compile(r"p([shc]):([1-9][0-9]{0,18}):([a-z0-9-]{1,32})", re.ASCII)


class Button(StrEnum):
    """The buttons the bot puts under its messages; the value is the data prefix."""

    AGAIN = "a"
    EDIT = "e"
    ORIGINAL = "o"
    CANCEL = "x"
    REMIX = "r"  # 🎨 Remix: ask for a new description, same style, shape and count
    SHAPE = "h"  # Square / Portrait / …: the same prompt again in that shape
    UPSCALE = "u"  # ⤴ under a result image (issue 17)
    DELETE = "d"  # 🗑 under a result: removes its messages
    HISTORY = "g"  # a /history entry: the result sent again ("get") by file_id


class _Index(StrEnum):
    NONE = "none"  # a:<job>, x:<job>
    ONE = "one"  # e:<job>:<n>
    ONE_OR_ALL = "one_or_all"  # o:<job>:<n> or o:<job>:*
    NAME = "name"  # h:<job>:<shape name>


_INDEX = {
    Button.AGAIN: _Index.NONE,
    Button.CANCEL: _Index.NONE,
    Button.EDIT: _Index.ONE,
    Button.ORIGINAL: _Index.ONE_OR_ALL,
    Button.REMIX: _Index.NONE,
    Button.SHAPE: _Index.NAME,
    Button.UPSCALE: _Index.ONE,
    Button.DELETE: _Index.NONE,
    Button.HISTORY: _Index.NONE,
}


@dataclass(frozen=True, slots=True)
class ButtonData:
    """What a button's callback data says: which button, which job, which image (None = all)."""

    button: Button
    job_id: int
    index: int | None = None
    name: str | None = None  # NAME buttons: the choice they name (a shape)

    def encode(self) -> str:
        if _INDEX[self.button] is _Index.NONE:
            return f"{self.button.value}:{self.job_id}"
        if _INDEX[self.button] is _Index.NAME:
            return f"{self.button.value}:{self.job_id}:{self.name}"
        return f"{self.button.value}:{self.job_id}:{'*' if self.index is None else self.index}"


def parse_button_data(data: object) -> ButtonData | None:
    """The button data in a press, or None when it is not exactly what our buttons send."""
    if not isinstance(data, str) or len(data.encode("utf-8", "replace")) > MAX_DATA_BYTES:
        return None
    named = _NAMED.fullmatch(data)
    if named is not None and named.group(1) in _NAMED_PREFIXES:
        job_id = int(named.group(2))
        if job_id > MAX_JOB_ID:
            return None
        return ButtonData(Button(named.group(1)), job_id, name=named.group(3))
    match = _SHAPE.fullmatch(data)
    if match is None:
        return None
    prefix, job_text, index_text = match.groups()
    try:
        button = Button(prefix)
    except ValueError:
        return None
    job_id = int(job_text)
    if job_id > MAX_JOB_ID:
        return None
    shape = _INDEX[button]
    if shape is _Index.NAME:
        return None  # its name was not a valid one (handled above)
    if shape is _Index.NONE:
        return ButtonData(button, job_id) if index_text is None else None
    if index_text is None or (index_text == "*" and shape is not _Index.ONE_OR_ALL):
        return None
    if index_text == "*":
        return ButtonData(button, job_id, None)
    index = int(index_text)
    if index > MAX_INDEX or (len(index_text) > 1 and index_text.startswith("0")):
        return None
    return ButtonData(button, job_id, index)


_NAMED_PREFIXES = frozenset(b.value for b, shape in _INDEX.items() if shape is _Index.NAME)


class Choice(StrEnum):
    """What a /style or /settings button sets; the value is its data's second letter."""

    STYLE = "s"
    SHAPE = "h"
    COUNT = "c"


@dataclass(frozen=True, slots=True)
class ChoiceData:
    """A choice button's data: which choice, for which user, which value (a style id, a shape
    name or an image count)."""

    choice: Choice
    user_id: int
    value: str

    def encode(self) -> str:
        return f"p{self.choice.value}:{self.user_id}:{self.value}"


def parse_choice_data(data: object) -> ChoiceData | None:
    """The choice in a press, or None when it is not exactly what a choice button sends."""
    if not isinstance(data, str) or len(data.encode("utf-8", "replace")) > MAX_DATA_BYTES:
        return None
    match = _CHOICE.fullmatch(data)
    if match is None:
        return None
    user_id = int(match.group(2))
    if user_id > MAX_JOB_ID:
        return None
    return ChoiceData(Choice(match.group(1)), user_id, match.group(3))


@dataclass(frozen=True, slots=True)
class ChoicePress:
    """A choice press that passed the check: its presser is the user the buttons belong to."""

    data: ChoiceData
    chat_id: int
    message_id: int


@dataclass(frozen=True, slots=True)
class Press:
    """A press that passed the check: the button, its job, and who pressed where."""

    data: ButtonData
    job: Job
    user_id: int
    message_id: int
    by_admin: bool  # pressed by an admin who is not the requester

    @property
    def chat_id(self) -> int:
        """Where the press came from, which is the job's chat: the only place to send to."""
        return self.job.chat_id


def _keyboard_data(message: Message) -> list[str] | None:
    """The callback data of the buttons the message shows, or None without a keyboard."""
    markup = message.reply_markup
    if markup is None or not markup.inline_keyboard:
        return None
    return [str(b.callback_data) for row in markup.inline_keyboard for b in row]


async def _refuse(
    update: Update, reason: str, answer: str, *, alert: bool = False, **fields: Any
) -> None:
    query = update.callback_query
    assert query is not None
    raw = query.data if isinstance(query.data, str) else repr(query.data)
    user = update.effective_user
    chat = update.effective_chat
    # A button whose job was pruned is ordinary; anything else is a client sending what no
    # button of ours carries. Untrusted text is logged shortened and as a repr.
    level = log.info if reason == "no_job" else log.warning
    level(
        "button_refused",
        reason=reason,
        user_id=user.id if user else None,
        chat_id=chat.id if chat else None,
        data=repr(raw[:80]),
        data_bytes=len(raw.encode("utf-8", "replace")),
        **fields,
    )
    try:
        await query.answer(answer, show_alert=alert)
    except TelegramError as exc:  # e.g. "query is too old" for a press replayed after a restart
        log.info("button_answer_failed", error=exc.message)


async def check_press(update: Update, context: BotContext) -> Press | None:
    """Parse a press and check the presser may act on its job in this chat.

    A refused press is answered and logged here and None is returned; the caller does nothing.
    """
    query = update.callback_query
    user = update.effective_user
    if query is None or user is None:
        return None
    data = parse_button_data(query.data)
    if data is None:
        await _refuse(update, "malformed", texts.BUTTON_EXPIRED)
        return None
    message = query.message
    if message is None:  # an inline message: the bot sends none, so the data is forged
        await _refuse(update, "no_message", texts.BUTTON_EXPIRED, job_id=data.job_id)
        return None
    if isinstance(message, Message):
        shown = _keyboard_data(message)
        if shown is not None and query.data not in shown:
            await _refuse(update, "not_on_message", texts.BUTTON_EXPIRED, job_id=data.job_id)
            return None
    services = context.services
    job = await services.store.get(data.job_id)
    if job is None:
        await _refuse(update, "no_job", texts.BUTTON_EXPIRED, job_id=data.job_id)
        return None
    is_admin = services.policy.is_admin(user.id)
    if job.user_id != user.id and not is_admin:
        await _refuse(update, "not_owner", texts.NOT_YOUR_JOB, alert=True, job_id=job.id)
        return None
    if job.chat_id != message.chat.id:
        await _refuse(update, "other_chat", texts.BUTTON_OTHER_CHAT, alert=True, job_id=job.id)
        return None
    return Press(data, job, user.id, message.message_id, by_admin=job.user_id != user.id)


async def check_choice(update: Update, context: BotContext) -> ChoicePress | None:
    """Parse a /style or /settings press and check it is the buttons' own user pressing
    them, on the message that shows them. Accepted presses are kept in
    `context.choice_press`; refused ones are answered and logged here."""
    query = update.callback_query
    user = update.effective_user
    if query is None or user is None:
        return None
    data = parse_choice_data(query.data)
    if data is None:
        await _refuse(update, "malformed", texts.BUTTON_EXPIRED)
        return None
    message = query.message
    if message is None:
        await _refuse(update, "no_message", texts.BUTTON_EXPIRED)
        return None
    if isinstance(message, Message):
        shown = _keyboard_data(message)
        if shown is not None and query.data not in shown:
            await _refuse(update, "not_on_message", texts.BUTTON_EXPIRED)
            return None
    if data.user_id != user.id:
        await _refuse(update, "not_owner", texts.NOT_YOUR_CHOICES, alert=True)
        return None
    press = ChoicePress(data, message.chat.id, message.message_id)
    context.choice_press = press
    return press


async def gate(update: Update, context: BotContext) -> None:
    """Handler group -1: a refused press stops here; an accepted one is kept for the handler."""
    query = update.callback_query
    if query is not None and isinstance(query.data, str) and query.data.startswith("p"):
        if await check_choice(update, context) is None:
            raise ApplicationHandlerStop
        return
    press = await check_press(update, context)
    if press is None:
        raise ApplicationHandlerStop
    if press.by_admin:
        log.info(
            "button_pressed_by_admin",
            button=press.data.button.name.lower(),
            job_id=press.job.id,
            user_id=press.user_id,
            requester_id=press.job.user_id,
        )
    context.button_press = press


# Buttons that name no job: a credit pack's button is only a key into config (price and
# credits are read server-side), and the invoice goes to the presser's own chat, so
# bot/payments.py checks it itself. A language button (lang:<code>) only names a catalog,
# checked against the known ones by bot/language.py, and changes only the presser's choice.
JOBLESS_PREFIXES = ("buy:", "lang:")


def _names_a_job(data: object) -> bool:
    return not (isinstance(data, str) and data.startswith(JOBLESS_PREFIXES))


def gate_handler() -> BaseHandler[Update, Any, Any]:
    """The gate, for every callback query that names a job (register it in a group before
    the buttons)."""
    return CallbackQueryHandler(gate, pattern=_names_a_job)


def checked(context: BotContext, *buttons: Button) -> Press | None:
    """The press the gate accepted for this update, if it is one of `buttons`."""
    press = context.button_press
    if press is None or press.data.button not in buttons:
        return None
    return press
