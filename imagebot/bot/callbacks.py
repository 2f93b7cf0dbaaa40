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
member and its shape in `_INDEX` (imagebot/buttondata.py); the gate then covers them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from telegram import Message, Update
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, BaseHandler, CallbackQueryHandler

from imagebot import texts
from imagebot.buttondata import (
    MAX_DATA_BYTES,
    Button,
    ButtonData,
    Choice,
    ChoiceData,
    parse_button_data,
    parse_choice_data,
)
from imagebot.logs import get_logger
from imagebot.models import Job

if TYPE_CHECKING:
    from imagebot.bot.context import BotContext

# The data format lives in imagebot/buttondata.py (delivery encodes it); these names stay
# importable from here for the button handlers.
__all__ = [
    "MAX_DATA_BYTES",
    "Button",
    "ButtonData",
    "Choice",
    "ChoiceData",
    "ChoicePress",
    "Press",
    "check_press",
    "checked",
    "parse_button_data",
    "parse_choice_data",
]

log = get_logger(__name__)


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
