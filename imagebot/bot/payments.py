"""Chat side of credits: /buy and its buttons, /balance, /paysupport, /terms, /privacy, the
admins' /refund and /grant, and the payment service messages.

`successful_payment` and `refunded_payment` are handled in group -3, ahead of every
conversation (a /edit waiting for a photo would otherwise swallow the payment message), and
stop there. The pre-checkout query never comes here: the intake hands it to Stars directly.
"""

from __future__ import annotations

from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    filters,
)

from imagebot import texts
from imagebot.bot.context import BotContext
from imagebot.bot.requests import (
    command_argument,
    ensure_access,
    is_addressed,
    packs_keyboard,
    reply,
)
from imagebot.config import CreditPack
from imagebot.credits import Credits
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.models import JobKind
from imagebot.stars import Stars
from imagebot.store.ledger import PURCHASE

log = get_logger(__name__)

PAYMENT_GROUP = -3
_PACK_RE = r"^buy:[a-z0-9-]{1,32}$"


def _parts(context: BotContext) -> tuple[Credits, Stars]:
    services = context.services
    assert services.credits is not None
    assert services.stars is not None
    return services.credits, services.stars


async def _welcome(context: BotContext, user_id: int) -> None:
    credits, _ = _parts(context)
    if await credits.ledger.welcome(user_id, credits.config.welcome_credits):
        log.info("credits_welcome", user_id=user_id, credits=credits.config.welcome_credits)


async def _invoice(update: Update, context: BotContext, pack: CreditPack) -> None:
    _, stars = _parts(context)
    user, chat = update.effective_user, update.effective_chat
    assert user is not None
    assert chat is not None
    try:
        await stars.send_invoice(chat.id, user.id, pack)
    except TelegramError as exc:
        log.warning("invoice_failed", user_id=user.id, pack_id=pack.id, error=str(exc))
        await reply(update, context, texts.BUY_FAILED)


async def buy(update: Update, context: BotContext) -> None:
    """/buy <pack>: an invoice; /buy alone: the packs as buttons (one pack: its invoice)."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or not is_addressed(message, context):
        return
    if not await ensure_access(update, context):
        return
    await _welcome(context, user.id)
    config = context.services.settings.credits
    wanted = command_argument(message.text).strip().lower()
    if not wanted and len(config.packs) == 1:
        wanted = config.packs[0].id
    pack = config.pack(wanted) if wanted else None
    if pack is None:
        text = texts.BUY_UNKNOWN_PACK if wanted else texts.BUY_CHOOSE
        await _send(update, context, text, markup=True)
        return
    await _invoice(update, context, pack)


async def buy_button(update: Update, context: BotContext) -> None:
    """A pack button: the pack id is only a key into config (price and credits come from it)."""
    query = update.callback_query
    if query is None or update.effective_user is None:
        return
    try:
        await query.answer()
    except TelegramError as exc:
        log.info("callback_answer_failed", error=str(exc))
    if not await ensure_access(update, context):
        return
    pack = context.services.settings.credits.pack((query.data or "").removeprefix("buy:"))
    if pack is None:
        await _send(update, context, texts.BUY_UNKNOWN_PACK, markup=True)
        return
    await _invoice(update, context, pack)


async def _send(update: Update, context: BotContext, text: str, *, markup: bool) -> None:
    chat = update.effective_chat
    if chat is None:
        return
    packs = context.services.settings.credits.packs
    try:
        await context.services.delivery.send_text(
            chat.id, text, markup=packs_keyboard(packs) if markup else None
        )
    except DeliveryError as exc:
        log.warning("reply_failed", error_code=exc.code)


async def balance(update: Update, context: BotContext) -> None:
    """/balance: credits left, what each operation costs, the last purchases."""
    user = update.effective_user
    if user is None or not is_addressed(update.effective_message, context):
        return
    if not await ensure_access(update, context):
        return
    credits, _ = _parts(context)
    await _welcome(context, user.id)
    left = await credits.ledger.balance(user.id)
    costs = {
        texts.kind_label(JobKind.GENERATE): credits.cost_per_image("generate"),
        texts.kind_label(JobKind.EDIT): credits.cost_per_image("edit"),
    }
    bought = await credits.ledger.entries(user.id, [PURCHASE], limit=5)
    purchases = [(e.created_at[:10], e.credits, e.stars, e.charge_id or "") for e in bought]
    is_admin = context.services.policy.is_admin(user.id)
    await reply(update, context, texts.balance_text(left, costs, purchases, is_admin))


async def paysupport(update: Update, context: BotContext) -> None:
    """/paysupport (Telegram requires it): the operator's text and the user's last charges."""
    user = update.effective_user
    if user is None or not is_addressed(update.effective_message, context):
        return
    credits, _ = _parts(context)
    bought = await credits.ledger.entries(user.id, [PURCHASE], limit=5)
    charges = [(e.created_at[:10], e.stars, e.charge_id or "") for e in bought]
    await reply(update, context, texts.paysupport(credits.config.support_text, charges))


async def terms(update: Update, context: BotContext) -> None:
    if is_addressed(update.effective_message, context):
        await reply(update, context, context.services.settings.credits.terms_text)


async def privacy(update: Update, context: BotContext) -> None:
    if is_addressed(update.effective_message, context):
        await reply(update, context, context.services.settings.credits.privacy_text)


def _admin(update: Update, context: BotContext) -> int | None:
    user = update.effective_user
    if user is None or not context.services.policy.is_admin(user.id):
        return None
    return user.id


async def refund(update: Update, context: BotContext) -> None:
    """Admin /refund <charge_id>."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return
    admin = _admin(update, context)
    if admin is None:  # admin commands do not exist for anyone else (as in bot/admin.py)
        await reply(update, context, texts.unknown_command((message.text or "").split()[0]))
        return
    args = command_argument(message.text).split()
    if len(args) != 1:
        await reply(update, context, texts.REFUND_USAGE)
        return
    _, stars = _parts(context)
    await reply(update, context, await stars.refund(args[0], admin))


async def grant(update: Update, context: BotContext) -> None:
    """Admin /grant <user_id> <credits> [note]."""
    message = update.effective_message
    if message is None or not is_addressed(message, context):
        return
    admin = _admin(update, context)
    if admin is None:  # admin commands do not exist for anyone else (as in bot/admin.py)
        await reply(update, context, texts.unknown_command((message.text or "").split()[0]))
        return
    args = command_argument(message.text).split(maxsplit=2)
    if len(args) < 2 or not args[0].lstrip("-").isdigit() or not args[1].isdigit():
        await reply(update, context, texts.GRANT_USAGE)
        return
    user_id, amount = int(args[0]), int(args[1])
    if not 1 <= amount <= 1_000_000:
        await reply(update, context, texts.GRANT_USAGE)
        return
    note = args[2] if len(args) > 2 else ""
    credits, _ = _parts(context)
    left = await credits.ledger.grant(user_id, amount, f"granted by admin {admin}: {note}".strip())
    log.info("credits_granted", user_id=user_id, credits=amount, admin_id=admin, balance=left)
    await reply(update, context, texts.grant_done(user_id, amount, left))
    if user_id > 0:
        with texts.speaking(await context.services.prefs.language_of(user_id)):
            notice = texts.granted_notice(amount, left)  # in the receiver's language
        try:
            await context.services.delivery.send_text(user_id, notice)
        except DeliveryError as exc:
            log.info("grant_notice_failed", user_id=user_id, error_code=exc.code)


async def successful_payment(update: Update, context: BotContext) -> None:
    """Credit the payment (once per charge id) and stop: no conversation sees this message."""
    message = update.effective_message
    if message is not None and message.successful_payment and message.from_user:
        _, stars = _parts(context)
        await stars.on_payment(
            update_id=update.update_id,
            user_id=message.from_user.id,
            chat_id=message.chat.id,
            payment=message.successful_payment,
        )
    raise ApplicationHandlerStop


async def refunded_payment(update: Update, context: BotContext) -> None:
    """Telegram's note of a refund: ours is recorded already; any other one is recorded now."""
    message = update.effective_message
    if message is not None and message.refunded_payment:
        _, stars = _parts(context)
        await stars.on_refunded(
            message.refunded_payment.telegram_payment_charge_id, "refunded_payment message"
        )
    raise ApplicationHandlerStop


def register_payment_messages(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Group -3: ahead of the stranger check, the /edit conversation and every other handler."""
    application.add_handler(
        MessageHandler(filters.SUCCESSFUL_PAYMENT, successful_payment), group=PAYMENT_GROUP
    )
    application.add_handler(
        MessageHandler(filters.StatusUpdate.REFUNDED_PAYMENT, refunded_payment),
        group=PAYMENT_GROUP,
    )


def register(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """The commands and the pack buttons (group 0, before the catch-alls)."""
    new_messages = filters.UpdateType.MESSAGE
    for name, callback in (
        ("buy", buy),
        ("balance", balance),
        ("paysupport", paysupport),
        ("terms", terms),
        ("privacy", privacy),
        ("refund", refund),
        ("grant", grant),
    ):
        application.add_handler(CommandHandler(name, callback, filters=new_messages))
    application.add_handler(CallbackQueryHandler(buy_button, pattern=_PACK_RE))
