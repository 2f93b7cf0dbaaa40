"""The one path from a user's request to a job: access, input, policy, store, "Generating…", run.

/generate, /edit (every way in) and the 🔁 Again button all come through `request_job`, so
every guard applies the same way whatever the entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from telegram import Chat, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update, User

from imagebot import texts
from imagebot.bot.context import BotContext
from imagebot.breaker import CIRCUIT_OPEN
from imagebot.choices import Choices
from imagebot.clock import utcnow
from imagebot.config import CreditPack
from imagebot.credits import Credits, Paid
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.models import Job, JobKind, NewJob
from imagebot.policy import Decision, Reason
from imagebot.store.db import Conn
from imagebot.store.ledger import NotEnoughCredits

if TYPE_CHECKING:
    from imagebot.services import Services

log = get_logger(__name__)
# How long a new job waits for its handler's release at most (the handler releases it as soon
# as the status message is sent; this lease only matters if that release is lost).
HANDLER_HOLD_S = 120.0


@dataclass(frozen=True, slots=True)
class EditInput:
    """The photo an edit works on: a Telegram file_id and what Telegram told us of it."""

    file_id: str
    file_size: int | None = None
    width: int | None = None
    height: int | None = None


def command_argument(text: str | None) -> str:
    """The text after the leading /command (or /command@bot), newlines kept."""
    if not text:
        return ""
    stripped = text.lstrip()
    if not stripped.startswith("/"):
        return stripped
    parts = stripped.split(maxsplit=1)
    return parts[1] if len(parts) > 1 else ""


def is_addressed(message: Message | None, context: BotContext) -> bool:
    """In a group, a command must name this bot (/generate@BotName) unless the operator
    turned that off; in a private chat anything goes."""
    if message is None or message.chat.type == Chat.PRIVATE:
        return True
    if not context.services.settings.telegram.groups_require_mention:
        return True
    text = message.text or message.caption or ""
    first = text.split(maxsplit=1)[0] if text else ""
    _, _, mention = first.partition("@")
    return bool(mention) and mention.lower() == (context.bot.username or "").lower()


async def reply(update: Update, context: BotContext, text: str) -> None:
    """Answer in the chat of the update, quoting the message when there is one."""
    chat = update.effective_chat
    if chat is None:
        return
    message = update.effective_message
    try:
        await context.services.delivery.send_text(
            chat.id, text, reply_to=message.message_id if message else None
        )
    except DeliveryError as exc:
        log.warning("reply_failed", error_code=exc.code)


async def ensure_access(update: Update, context: BotContext) -> bool:
    """Allowlist check; a refused user is told their id at most once per window."""
    services = context.services
    user, chat = update.effective_user, update.effective_chat
    if user is None or chat is None:
        return False
    if services.policy.may_use(user.id, chat.id):
        return True
    services.metrics.refusals.labels(Reason.ALLOWLIST.value).inc()
    log.info("request_refused", reason=Reason.ALLOWLIST.value, user_id=user.id, chat_id=chat.id)
    interval = services.settings.access.refusal_notice_interval_s
    if await services.usage.claim_notice(user.id, Reason.ALLOWLIST.value, interval):
        bootstrap = not services.settings.access.admins
        await reply(update, context, texts.not_allowed(user.id, bootstrap))
    return False


async def refuse_while_paused(update: Update, context: BotContext) -> bool:
    """An admin paused the bot (/pause): a new request gets their message and no job."""
    services = context.services
    control = services.control
    user = update.effective_user
    if control is None or not control.paused or user is None:
        return False
    services.metrics.refusals.labels("paused").inc()
    log.info("request_refused", reason="paused", user_id=user.id)
    is_admin = services.policy.is_admin(user.id)
    await reply(update, context, texts.paused_notice(control.pause_state.message, is_admin))
    return True


async def refuse(update: Update, context: BotContext, kind: JobKind, decision: Decision) -> None:
    services = context.services
    reason = decision.reason or Reason.INPUT
    services.metrics.refusals.labels(reason.value).inc()
    log.info("request_refused", reason=reason.value, code=decision.code, limit=decision.limit)
    retry = decision.retry_after_s or 0.0
    if reason is Reason.RATE:
        text = texts.rate_limited(decision.limit or 0, retry)
    elif reason is Reason.CAP and decision.code == "cap_images":
        left = int((decision.limit or 0) - (decision.used or 0))
        text = texts.cap_too_many(kind, left, retry)
    elif reason is Reason.CAP:
        text = texts.cap_reached(kind, decision.limit or 0, retry, decision.code == "disabled")
    elif reason is Reason.SPEND:
        log.warning("spend_cap_reached", spent_usd=decision.used, cap_usd=decision.limit)
        text = texts.spend_cap_reached(retry)
    else:
        text = texts.input_problem(decision.code, decision.limit, decision.used, kind)
    await reply(update, context, text)


async def refuse_while_down(services: Services, job: Job) -> None:
    """The provider's circuit is open: end the new job at once (no vendor call, its unit of
    the daily cap returns) and tell the user, with the job id."""
    services.metrics.provider_circuit_refusals.labels(job.provider).inc()
    log.info("request_refused", reason="circuit_open", job_id=job.id, provider=job.provider)
    await services.runner.pipeline.fail(job, CIRCUIT_OPEN, "refused: the provider is down")


def packs_keyboard(packs: list[CreditPack]) -> InlineKeyboardMarkup:
    """One button per pack; the callback names only the pack (the price is read server-side)."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    texts.pack_button(p.title, p.stars), callback_data=f"buy:{p.id}"
                )
            ]
            for p in packs
        ]
    )


async def offer_packs(
    update: Update, context: BotContext, kind: JobKind, short: NotEnoughCredits
) -> None:
    """Past the free allowance without enough credits: say so, with the packs as buttons."""
    services = context.services
    chat, message = update.effective_chat, update.effective_message
    services.metrics.refusals.labels("credits").inc()
    log.info("request_refused", reason="credits", balance=short.balance, needed=short.needed)
    if chat is None:
        return
    free_disabled = services.settings.operation(kind).daily_cap == 0
    try:
        await services.delivery.send_text(
            chat.id,
            texts.not_enough_credits(kind, short.needed, short.balance, free_disabled),
            reply_to=message.message_id if message else None,
            markup=packs_keyboard(services.settings.credits.packs),
        )
    except DeliveryError as exc:
        log.warning("reply_failed", error_code=exc.code)


def _operation(
    context: BotContext, kind: JobKind
) -> tuple[str, dict[str, str | int | float | bool]]:
    settings = context.services.settings
    op = settings.operation(kind)
    return op.provider, dict(op.params)


def _after_insert(
    context: BotContext, credits: Credits | None, user_id: int
) -> Callable[[Conn, int, Any], None] | None:
    """What runs in the job's own transaction: the credit reservation (credits on) and
    whatever the handler asked for (`context.also_in_job_transaction`)."""
    also = context.also_in_job_transaction
    paying = credits if credits is not None and credits.enabled else None
    if paying is None and also is None:
        return None

    def after(conn: Conn, job_id: int, decision: Any) -> None:
        if paying is not None:
            paying.after_insert(conn, job_id, user_id, decision)
        if also is not None:
            also(conn)

    return after


async def _create(update: Update, context: BotContext, new: NewJob) -> Job | None:
    """Create the job, held (see `JobStore.create`), if the caps or the credits allow it;
    otherwise tell the user why not."""
    services = context.services
    credits, user_id, kind, images = services.credits, new.user_id, new.kind, new.images_asked
    now = utcnow()
    try:
        decision, job = await services.store.create(
            new,
            decide=lambda counters: (
                credits.decide(user_id, kind, counters, now, images)
                if credits is not None
                else services.policy.decide(user_id, kind, counters, now, images)
            ),
            with_spend=services.settings.limits.daily_spend_usd > 0,
            after_insert=_after_insert(context, credits, user_id),
            hold_s=HANDLER_HOLD_S,
        )
    except NotEnoughCredits as short:
        await offer_packs(update, context, kind, short)
        return None
    if job is None:
        if decision is None:
            log.info("update_already_made_job")
        elif not isinstance(decision, Paid):
            await refuse(update, context, kind, decision)
        return None
    services.inbox.closed_with_job(new.update_id)
    services.metrics.jobs_created.labels(kind.value).inc()
    paid = decision.credits if isinstance(decision, Paid) else 0
    log.info(
        "job_created",
        job_id=job.id,
        kind=kind.value,
        provider=new.provider,
        credits=paid,
        style=job.style_id,
        model=job.model,
        shape=job.shape,
        images=images,
    )
    return job


async def request_job(
    update: Update,
    context: BotContext,
    kind: JobKind,
    text: str | None,
    *,
    edit_input: EditInput | None = None,
    parent_job_id: int | None = None,
    style_id: str | None = None,
    shape: str | None = None,
    count: int | None = None,
    album: Sequence[EditInput] = (),
    source_index: int | None = None,
) -> Job | None:
    """Check and create a job for this update, answer "Generating…", and start it.

    The job runs with the user's stored style, shape and image count, except those given
    here (a remix or a shape button keeps its job's own). `album`: an album edit's photos
    (the first is `edit_input`); `source_index`: an upscale's image of `parent_job_id`."""
    services = context.services
    user: User | None = update.effective_user
    chat: Chat | None = update.effective_chat
    message = update.effective_message
    if user is None or chat is None or not await ensure_access(update, context):
        return None
    if await refuse_while_paused(update, context):
        return None
    prompt, decision = services.policy.clean_text(text)
    if not decision.allowed:
        await refuse(update, context, kind, decision)
        return None
    # From here every outcome is answered in this chat (the place in line, "Generating…", or
    # why not): its send slot is asked for while the job is being made.
    services.delivery.expect_send(chat.id)
    provider, _ = _operation(context, kind)
    prefs = context.prefs if context.prefs is not None else await services.prefs.get(user.id)
    chosen = Choices(services.settings).resolve(
        kind, prefs, style_id=style_id, shape=shape, count=count
    )
    images = chosen.images
    new = NewJob(
        kind=kind,
        update_id=update.update_id,
        chat_id=chat.id,
        user_id=user.id,
        chat_type=chat.type,
        prompt=prompt,
        provider=provider,
        params=chosen.params,
        cost_estimate_usd=services.policy.cost_estimate(kind, images),
        command_message_id=message.message_id if message else None,
        input_file_id=edit_input.file_id if edit_input else None,
        input_file_size=edit_input.file_size if edit_input else None,
        input_width=edit_input.width if edit_input else None,
        input_height=edit_input.height if edit_input else None,
        parent_job_id=parent_job_id,
        style_id=chosen.style_id,
        model=chosen.model,
        prompt_suffix=chosen.prompt_suffix,
        shape=chosen.shape,
        images_asked=images,
        input_file_ids=tuple(p.file_id for p in album),
        source_index=source_index,
        language=texts.current_language(),
    )
    job = await _create(update, context, new)
    if job is None:
        return None
    position = None
    released = False
    try:
        if not services.runner.pipeline.breakers.get(provider).admit(job.id):
            await refuse_while_down(services, job)
            return job
        # When every slot is taken, the first answer is the place in line (not "Generating…"
        # edited a moment later). If Telegram refuses it now, the worker sends it at the start.
        position = await services.runner.place_in_line(job.id)
        job = await services.progress.ensure_status(job, queued_at=position, release=True)
        released = job.status_message_id is not None
        arrived = services.intake.received_at(update.update_id)
        if arrived is not None:
            services.metrics.ack_latency.labels(kind.value).observe(time.monotonic() - arrived)
    finally:
        # The job was created held (the runner does not claim it) so that it never starts
        # before its status message id is saved: the runner may take it now.
        await services.runner.release(job.id, written=released)
    if position is not None:
        await services.runner.pump()  # the user was told the place in line already
    elif not await services.runner.submit(job.id):
        position = await services.store.queue_position(job.id)
        await services.progress.show_queued(job, position, force=True)
    return job
