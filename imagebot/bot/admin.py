"""The admins' commands in the chat: /allow /deny /users /invite /invites /stats /pause /resume,
and the redemption of invite links (`/start <code>`) for users not yet allowed.

The commands exist only for `access.admins`: for anyone else the handlers' filter does not
match, so the message falls through to the unknown-command answer like any made-up command.
The changes themselves go through imagebot/control.py (store, in-memory copy, audit log).
"""

from __future__ import annotations

import math
import re
from typing import Any

from telegram import Chat, Message, Update, User
from telegram.ext import Application, CommandHandler, filters

from imagebot import texts
from imagebot.bot.context import BotContext
from imagebot.bot.requests import command_argument, is_addressed, reply
from imagebot.clock import utcnow
from imagebot.control import (
    DEFAULT_INVITE_HOURS,
    DEFAULT_INVITE_USES,
    MAX_INVITE_HOURS,
    MAX_INVITE_USES,
    Control,
    invite_link,
)
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.store.access import Redeem, looks_like_code
from imagebot.store.usage import day_start

log = get_logger(__name__)

_USER_ID = re.compile(r"[1-9][0-9]{0,18}", re.ASCII)
MAX_PAUSE_MESSAGE = 1000
INVITE_NOTICE = "invite"  # notices.reason of a refused invite: one per interval, like strangers


def _control(context: BotContext) -> Control:
    control = context.services.control
    assert control is not None
    return control


def _name(user: User) -> str:
    return f"@{user.username}" if user.username else user.first_name


def _when(moment: Any) -> str:
    return str(moment.strftime("%Y-%m-%d %H:%M"))


def _target(message: Message) -> tuple[int, str | None] | None:
    """Whom /allow or /deny means: the id given, else the author of the replied-to message."""
    argument = command_argument(message.text).split()
    if argument:
        if not _USER_ID.fullmatch(argument[0]) or int(argument[0]) >= 2**63:
            return None
        return int(argument[0]), None
    replied = message.reply_to_message
    author = replied.from_user if replied is not None else None
    if author is None or author.is_bot:
        return None
    return author.id, _name(author)


def _admin_message(update: Update, context: BotContext) -> tuple[Message, User] | None:
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or not is_addressed(message, context):
        return None
    return message, user


async def allow(update: Update, context: BotContext) -> None:
    """/allow <id> or /allow in reply: let a user in (stored, at once, survives restarts)."""
    got = _admin_message(update, context)
    if got is None:
        return
    message, admin = got
    target = _target(message)
    if target is None:
        await reply(update, context, texts.ALLOW_USAGE)
        return
    user_id, name = target
    policy = context.services.policy
    if policy.config_role(user_id) is not None:
        await reply(update, context, texts.allow_already(user_id, in_config=True))
        return
    if not await _control(context).allow(user_id, admin_id=admin.id, name=name):
        await reply(update, context, texts.allow_already(user_id, in_config=False))
        return
    await reply(update, context, texts.allowed_done(user_id, name))
    if user_id != message.chat.id:  # tell them, when they have a chat with the bot
        # in their language: their choice, else their app's (when allowed by reply)
        replied = message.reply_to_message
        author = replied.from_user if replied is not None else None
        app_code = author.language_code if author is not None and author.id == user_id else None
        chosen = await context.services.prefs.language_of(user_id)
        with texts.speaking(chosen or texts.negotiate(app_code)):
            granted = texts.ACCESS_GRANTED
        try:
            await context.services.delivery.send_text(user_id, granted)
        except DeliveryError as exc:
            log.info("access_granted_notice_failed", user_id=user_id, error_code=exc.code)


async def deny(update: Update, context: BotContext) -> None:
    """/deny <id> or /deny in reply: take access away (config.toml's entries stay)."""
    got = _admin_message(update, context)
    if got is None:
        return
    message, admin = got
    target = _target(message)
    if target is None:
        await reply(update, context, texts.DENY_USAGE)
        return
    user_id, _ = target
    role = context.services.policy.config_role(user_id)
    if role is not None:
        log.info("admin_action_refused", action="deny", admin_id=admin.id, user_id=user_id)
        await reply(update, context, texts.deny_config(user_id, role))
        return
    if await _control(context).deny(user_id, admin_id=admin.id) is None:
        await reply(update, context, texts.deny_not_listed(user_id))
        return
    await reply(update, context, texts.denied_done(user_id))


async def users(update: Update, context: BotContext) -> None:
    """/users: config admins and users, the ones let in here, with their requests today."""
    if _admin_message(update, context) is None:
        return
    services = context.services
    access = services.settings.access
    added = await _control(context).access.allowed()
    used = await services.usage.used_today_by_user(day_start(utcnow()))
    text = texts.users_text(
        admins=sorted(set(access.admins)),
        config_users=sorted(set(access.users) - set(access.admins)),
        added=[
            (
                u.user_id,
                u.name,
                texts.added_how(u.source.value, u.added_by, u.invite_id),
                u.added_at.strftime("%Y-%m-%d"),
            )
            for u in added
        ],
        chats=list(access.chats),
        used=used,
        is_open=access.open,
    )
    await reply(update, context, text)


def _invite_args(text: str | None) -> tuple[int, float] | None:
    parts = command_argument(text).split()
    if len(parts) > 2:
        return None
    try:
        uses = int(parts[0]) if parts else DEFAULT_INVITE_USES
        hours = float(parts[1]) if len(parts) > 1 else DEFAULT_INVITE_HOURS
    except ValueError:
        return None
    if not (1 <= uses <= MAX_INVITE_USES) or not (0 < hours <= MAX_INVITE_HOURS):
        return None
    if not math.isfinite(hours):
        return None
    return uses, hours


async def invite(update: Update, context: BotContext) -> None:
    """/invite [uses] [hours]: a t.me link that lets its openers in (1 use, 72 h by default)."""
    got = _admin_message(update, context)
    if got is None:
        return
    message, admin = got
    args = _invite_args(message.text)
    if args is None:
        await reply(update, context, texts.INVITE_USAGE)
        return
    uses, hours = args
    control = _control(context)
    code, made = await control.invite(uses=uses, hours=hours, admin_id=admin.id)
    link = invite_link(context.bot.username or control.bot_username, code)
    await reply(update, context, texts.invite_created(link, code, uses, _when(made.expires_at)))


async def invites(update: Update, context: BotContext) -> None:
    """/invites lists the open invites; /invites revoke <number> withdraws one."""
    got = _admin_message(update, context)
    if got is None:
        return
    message, admin = got
    control = _control(context)
    parts = command_argument(message.text).split()
    if not parts:
        open_ = await control.access.invites()
        if not open_:
            await reply(update, context, texts.NO_INVITES)
            return
        rows = [(i.id, i.uses_left, i.uses, _when(i.expires_at), i.created_by) for i in open_]
        await reply(update, context, texts.invites_text(rows))
        return
    number = parts[1].lstrip("#") if len(parts) == 2 else ""
    if parts[0].lower() != "revoke" or not _USER_ID.fullmatch(number) or len(number) > 18:
        await reply(update, context, texts.INVITES_USAGE)
        return
    before = await control.revoke(int(number), admin_id=admin.id)
    if before is None:
        await reply(update, context, texts.invite_revoke_unknown(int(number)))
    elif before.revoked_at is not None:
        await reply(update, context, texts.invite_revoke_already(int(number)))
    else:
        await reply(update, context, texts.invite_revoked(int(number)))


async def stats(update: Update, context: BotContext) -> None:
    """/stats: today's jobs by kind and status, images, spend, times, errors, queue now."""
    if _admin_message(update, context) is None:
        return
    services = context.services
    day = await services.stats.today(utcnow())
    per_kind: dict[str, dict[str, int]] = {}
    for (kind, status), n in day.jobs.items():
        per_kind.setdefault(kind, {})[status] = n
    text = texts.stats_text(
        total=day.total,
        per_kind=per_kind,
        images=day.images_delivered,
        spend_usd=day.spend_usd,
        p50_s=day.p50_s,
        p95_s=day.p95_s,
        errors=day.errors,
        queued=day.queued_now,
        running=day.running_now,
        paused=_control(context).paused,
    )
    await reply(update, context, text)


async def pause(update: Update, context: BotContext) -> None:
    """/pause [message]: new requests get the message and no job; running ones finish."""
    got = _admin_message(update, context)
    if got is None:
        return
    message, admin = got
    told = texts.utf16_trim(command_argument(message.text).strip(), MAX_PAUSE_MESSAGE) or None
    await _control(context).pause(told, admin_id=admin.id)
    await reply(update, context, texts.paused_done(told))


async def resume(update: Update, context: BotContext) -> None:
    got = _admin_message(update, context)
    if got is None:
        return
    _, admin = got
    resumed = await _control(context).resume(admin_id=admin.id)
    await reply(update, context, texts.RESUMED if resumed else texts.RESUME_NOT_PAUSED)


def start_code(message: Message | None) -> str | None:
    """The invite code of a `/start <code>` in a private chat (a t.me deep link), else None."""
    if message is None or message.chat.type != Chat.PRIVATE or not message.text:
        return None
    parts = message.text.split()
    if len(parts) != 2 or parts[0].split("@")[0] != "/start":
        return None
    return parts[1] if looks_like_code(parts[1]) else None


async def redeem(update: Update, context: BotContext, code: str) -> None:
    """A user not yet allowed opened an invite link: let them in, or say kindly why not
    (a refusal at most once per interval, as for every other stranger's message)."""
    services = context.services
    user = update.effective_user
    assert user is not None
    outcome = await _control(context).redeem(code, user.id, _name(user))
    if outcome in (Redeem.ADMITTED, Redeem.ALREADY):
        await reply(update, context, texts.invite_welcome(user.first_name))
        return
    services.metrics.refusals.labels("invite").inc()
    interval = services.settings.access.refusal_notice_interval_s
    if await services.usage.claim_notice(user.id, INVITE_NOTICE, interval):
        await reply(update, context, texts.invite_refused(outcome.value, user.id))


ADMIN_COMMANDS = {
    "allow": allow,
    "deny": deny,
    "users": users,
    "invite": invite,
    "invites": invites,
    "stats": stats,
    "pause": pause,
    "resume": resume,
}


def register(application: Application[Any, Any, Any, Any, Any, Any], admins: list[int]) -> None:
    """Group 0, before the unknown-command catch-all; matched only for `access.admins`."""
    if not admins:
        return
    only_admins = filters.UpdateType.MESSAGE & filters.User(user_id=admins)
    for name, callback in ADMIN_COMMANDS.items():
        application.add_handler(CommandHandler(name, callback, filters=only_admins))
