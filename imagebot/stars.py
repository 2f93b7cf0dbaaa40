"""Telegram Stars: invoices, the pre-checkout answer, crediting payments, refunds, and the
reconciliation with getStarTransactions.

Money rules (STARS.md): an approved pre-checkout proves nothing, only `successful_payment`
(or Telegram's own transaction list) credits; the key is telegram_payment_charge_id, never the
payload (an invoice may be paid twice, each charge with its own id); price and credits come
from the order row /buy wrote, never from the client. The pre-checkout is answered through a
Bot of its own (own connections, no outgoing rate limiter), straight from the intake, so no
job, queue or flood wait stands between the query and the 10-second deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from telegram import Bot, LabeledPrice, SuccessfulPayment, TransactionPartnerUser
from telegram.error import BadRequest, TelegramError

from imagebot import texts
from imagebot.config import CreditPack, Settings
from imagebot.credits import Credits
from imagebot.delivery import Delivery
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.metrics import Metrics
from imagebot.store.languages import chosen_language, language_of
from imagebot.store.ledger import PURCHASE, STAR_REFUND, Credited, Ledger, Order

log = get_logger(__name__)

CURRENCY = "XTR"
_MAX_PAGES = 1000  # bounds one reconciliation pass (100 000 transactions)


@dataclass
class Reconciled:
    """What one reconciliation pass found."""

    read: int = 0
    credited: list[str] = field(default_factory=list)
    refunds_seen: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


class Stars:
    """Everything that talks to Telegram about Stars, and records what it says."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: Ledger,
        credits: Credits,
        metrics: Metrics,
        bot: Bot,
        answer_bot: Bot,
        delivery: Delivery,
    ) -> None:
        self.settings = settings
        self.config = settings.credits
        self.ledger = ledger
        self.credits = credits
        self.metrics = metrics
        self.bot = bot
        self.answer_bot = answer_bot
        self.delivery = delivery
        self._sync_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the pre-checkout bot's own connections (no network call)."""
        await self.answer_bot.request.initialize()

    async def stop(self) -> None:
        await self.answer_bot.request.shutdown()

    # -- invoices --------------------------------------------------------------------------

    async def send_invoice(self, chat_id: int, user_id: int, pack: CreditPack) -> Order:
        """Write the order (price snapshot), then send its invoice: XTR, one price, no
        provider token, no tips. Raises TelegramError if Telegram refuses the invoice."""
        order = await self.ledger.create_order(
            user_id=user_id,
            chat_id=chat_id,
            pack_id=pack.id,
            stars=pack.stars,
            credits=pack.credits,
            title=pack.title,
        )
        message = await self.bot.send_invoice(
            chat_id=chat_id,
            title=pack.title,
            description=texts.invoice_description(pack.credits),
            payload=order.payload,
            currency=CURRENCY,
            prices=[LabeledPrice(label=pack.title, amount=pack.stars)],
        )
        await self.ledger.set_invoice_message(order.id, message.message_id)
        log.info(
            "invoice_sent",
            user_id=user_id,
            chat_id=chat_id,
            order_id=order.id,
            pack_id=pack.id,
            stars=pack.stars,
        )
        return order

    # -- pre-checkout ----------------------------------------------------------------------

    async def check(self, query: dict[str, Any]) -> tuple[Order | None, str | None]:
        """(order, None) when the payment may go ahead, else (order or None, why not)."""
        payload = query.get("invoice_payload")
        order = await self.ledger.order_by_payload(payload) if isinstance(payload, str) else None
        if order is None:
            return None, texts.PAY_UNKNOWN_ORDER
        payer = (query.get("from") or {}).get("id")
        if payer != order.user_id:
            return order, texts.PAY_NOT_YOURS
        if order.status != "open":
            return order, texts.PAY_ALREADY_PAID
        if query.get("currency") != CURRENCY or query.get("total_amount") != order.stars:
            return order, texts.PAY_PRICE_CHANGED
        return order, None

    async def answer_pre_checkout(self, update: dict[str, Any]) -> None:
        """Answer one pre_checkout_query update (called by the intake, beside the handlers)."""
        started = time.monotonic()
        query = update.get("pre_checkout_query") or {}
        query_id = query.get("id")
        user_id = (query.get("from") or {}).get("id")
        if not isinstance(query_id, str):
            return
        order: Order | None = None
        # Not a handler's update (the intake answers it directly): the payer's language here.
        payer = query.get("from") or {}
        chosen = await chosen_language(self.ledger.db, user_id) if type(user_id) is int else None
        with texts.speaking(chosen or texts.negotiate(str(payer.get("language_code") or ""))):
            problem: str | None = texts.PAY_UNKNOWN_ORDER
            if self.config.enabled:
                order, problem = await self.check(query)
        ok = problem is None
        try:
            await self.answer_bot.answer_pre_checkout_query(
                pre_checkout_query_id=query_id, ok=ok, error_message=problem
            )
        except TelegramError as exc:
            # A replayed query after a restart is too old by now: nothing left to do.
            log.warning(
                "pre_checkout_answer_failed",
                user_id=user_id,
                order_id=order.id if order else None,
                error=str(exc),
            )
            return
        self.metrics.payments.labels("precheckout_ok" if ok else "precheckout_refused").inc()
        log.info(
            "pre_checkout_answered",
            user_id=user_id,
            order_id=order.id if order else None,
            ok=ok,
            reason=problem,
            answer_ms=int((time.monotonic() - started) * 1000),
        )

    # -- payments --------------------------------------------------------------------------

    async def on_payment(
        self, *, update_id: int, user_id: int, chat_id: int, payment: SuccessfulPayment
    ) -> Credited:
        """Credit a successful_payment once (keyed by its charge id), in the transaction that
        marks the update processed; the first time, send the receipt."""
        charge_id = payment.telegram_payment_charge_id
        order = await self.ledger.order_by_payload(payment.invoice_payload)
        credits, note, outcome = self._credits_for(order, payment.currency, payment.total_amount)
        result = await self.ledger.record_purchase(
            user_id=user_id,
            charge_id=charge_id,
            stars=payment.total_amount if payment.currency == CURRENCY else 0,
            credits=credits,
            order_id=order.id if order else None,
            update_id=update_id,
            note=note,
        )
        fields = {
            "user_id": user_id,
            "order_id": order.id if order else None,
            "charge_id": charge_id,
            "stars": payment.total_amount,
        }
        if not result.inserted:
            self.metrics.payments.labels("duplicate").inc()
            log.info("payment_duplicate", **fields)
            return result
        self._count_received(payment.total_amount, payment.currency, outcome)
        if outcome == "credited":
            log.info("payment_credited", credits=credits, balance=result.balance, **fields)
        else:
            log.error("payment_unmatched", reason=note, balance=result.balance, **fields)
        await self._tell(chat_id, texts.receipt(credits, payment.total_amount, result.balance))
        return result

    def _credits_for(
        self, order: Order | None, currency: str, amount: int
    ) -> tuple[int, str, str]:
        """(credits, note, outcome) for a charge of `amount` in `currency` on `order`."""
        if order is None:
            return 0, "no order matches the invoice payload: refund or /grant by hand", "unmatched"
        if currency != CURRENCY or amount != order.stars:
            return 0, f"paid {amount} {currency} for an order of {order.stars} XTR", "unmatched"
        return order.credits, f"order {order.id} ({order.pack_id})", "credited"

    def _count_received(self, stars: int, currency: str, outcome: str) -> None:
        if currency == CURRENCY:
            self.metrics.stars_received.inc(stars)
        self.metrics.payments.labels(outcome).inc()

    async def _tell(self, chat_id: int, text: str) -> None:
        try:
            await self.delivery.send_text(chat_id, text)
        except DeliveryError as exc:
            log.warning("payment_message_failed", chat_id=chat_id, error_code=exc.code)

    # -- refunds ---------------------------------------------------------------------------

    async def refund(self, charge_id: str, admin_id: int) -> str:
        """Admin /refund: take the credits back (never below zero), then ask Telegram to give
        the Stars back; "already refunded" counts as done. Returns the admin's answer."""
        outcome, bought, balance = await self.ledger.reserve_star_refund(
            charge_id, note=f"refunded by admin {admin_id}"
        )
        if bought is None:
            return texts.refund_unknown(charge_id)
        fields = {"user_id": bought.user_id, "order_id": bought.order_id, "charge_id": charge_id}
        if outcome == "already":
            return texts.refund_already(charge_id)
        if outcome == "balance":
            log.info("star_refund_refused", reason="balance", balance=balance, **fields)
            return texts.refund_refused_balance(bought.user_id, balance, bought.credits)
        try:
            await self.bot.refund_star_payment(
                user_id=bought.user_id, telegram_payment_charge_id=charge_id
            )
            already = False
        except BadRequest as exc:
            if "CHARGE_ALREADY_REFUNDED" not in exc.message.upper():
                return await self._refund_failed(charge_id, str(exc.message), fields)
            already = True
        except TelegramError as exc:
            return await self._refund_failed(charge_id, str(exc), fields)
        self.metrics.stars_refunded.inc(bought.stars)
        self.metrics.payments.labels("refunded").inc()
        log.info(
            "star_refunded",
            stars=bought.stars,
            credits=bought.credits,
            balance=balance,
            admin_id=admin_id,
            already_refunded=already,
            **fields,
        )
        with texts.speaking(await language_of(self.ledger.db, bought.user_id)):
            notice = texts.refund_notice(bought.stars, balance)
        await self._tell(bought.user_id, notice)
        return texts.refund_done(charge_id, bought.user_id, bought.stars, balance)

    async def _refund_failed(self, charge_id: str, error: str, fields: dict[str, Any]) -> str:
        await self.ledger.drop_star_refund(charge_id)
        self.metrics.payments.labels("refund_failed").inc()
        log.warning("star_refund_failed", error=error, **fields)
        return texts.refund_failed(charge_id, error)

    async def on_refunded(self, charge_id: str, source: str) -> None:
        """Telegram says a charge was refunded (refunded_payment, or its transaction list):
        our own /refund is already recorded; any other refund is recorded and reported."""
        written = await self.ledger.record_outside_refund(charge_id, note=f"refunded ({source})")
        if written is None:
            await self.ledger.mark_reconciled(STAR_REFUND, [charge_id])
            return
        entry, balance = written
        self.metrics.stars_refunded.inc(-entry.stars)
        self.metrics.payments.labels("refunded_elsewhere").inc()
        log.warning(
            "star_refund_seen_elsewhere",
            user_id=entry.user_id,
            order_id=entry.order_id,
            charge_id=charge_id,
            stars=-entry.stars,
            credits_removed=-entry.credits,
            balance=balance,
            source=source,
        )

    # -- reconciliation --------------------------------------------------------------------

    async def reconcile(self) -> Reconciled:
        """Read getStarTransactions from the cursor: credit charges the ledger lacks (their
        update was lost), record refunds made elsewhere, mark what Telegram confirmed."""
        async with self._sync_lock:
            report = Reconciled()
            page = self.config.reconcile_page_size
            # Start one page before the cursor: entries are idempotent to re-read, and this
            # covers a list that shifted (Telegram does not promise it never does).
            offset = max(0, await self.ledger.sync_offset() - page)
            for _ in range(_MAX_PAGES):
                batch = await self.bot.get_star_transactions(offset=offset, limit=page)
                transactions = batch.transactions
                seen: list[str] = []
                for tx in transactions:
                    await self._reconcile_one(tx, report, seen)
                await self.ledger.mark_reconciled(PURCHASE, seen)
                offset += len(transactions)
                report.read += len(transactions)
                if len(transactions) < page:
                    break
            await self.ledger.set_sync_offset(offset)
        log.info(
            "stars_reconciled",
            read=report.read,
            credited=len(report.credited),
            refunds_seen=len(report.refunds_seen),
            unmatched=len(report.unmatched),
            next_offset=offset,
        )
        return report

    async def _reconcile_one(self, tx: Any, report: Reconciled, seen: list[str]) -> None:
        source, receiver = tx.source, tx.receiver
        if isinstance(receiver, TransactionPartnerUser):
            if await self.ledger.purchase(tx.id) is not None:
                report.refunds_seen.append(tx.id)
                await self.on_refunded(tx.id, "getStarTransactions")
            return
        if not (
            isinstance(source, TransactionPartnerUser)
            and source.transaction_type == "invoice_payment"
        ):
            return
        seen.append(tx.id)
        if await self.ledger.purchase(tx.id) is not None:
            return
        order = await self.ledger.order_by_payload(source.invoice_payload or "")
        if order is None:
            report.unmatched.append(tx.id)
            log.warning("star_transaction_unmatched", user_id=source.user.id, charge_id=tx.id)
            return
        credits, note, outcome = self._credits_for(order, CURRENCY, tx.amount)
        result = await self.ledger.record_purchase(
            user_id=source.user.id,
            charge_id=tx.id,
            stars=tx.amount,
            credits=credits,
            order_id=order.id,
            update_id=None,
            note=f"reconciled from getStarTransactions; {note}",
            reconciled=True,
        )
        if not result.inserted:  # the update path got there first
            return
        report.credited.append(tx.id)
        self._count_received(tx.amount, CURRENCY, "reconciled" if credits else outcome)
        log.warning(
            "payment_reconciled",
            user_id=source.user.id,
            order_id=order.id,
            charge_id=tx.id,
            stars=tx.amount,
            credits=credits,
            balance=result.balance,
        )
        with texts.speaking(await language_of(self.ledger.db, order.user_id)):
            receipt = texts.receipt(credits, tx.amount, result.balance)
        await self._tell(order.chat_id, receipt)
