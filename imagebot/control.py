"""The operator's controls, shared by the admin commands in the chat and the shell.

Keeps the database-backed allowlist and the pause in memory, so checking an update costs no
database read: every change made here applies at once, and a change made by another process
(`imagebot users allow` while the bot runs) is picked up by `refresh()`, which the bot runs
every `access.refresh_interval_s` and which reads one number unless something changed.
Every change is logged as `admin_action` with who did it (`admin_id`, None from the shell)
and what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from imagebot.logs import get_logger
from imagebot.policy import Policy
from imagebot.store.access import AccessStore, AllowedUser, Invite, Redeem, Source

log = get_logger(__name__)

DEFAULT_INVITE_USES = 1
DEFAULT_INVITE_HOURS = 72.0
MAX_INVITE_USES = 10_000
MAX_INVITE_HOURS = 24.0 * 366


@dataclass(frozen=True, slots=True)
class PauseState:
    paused: bool = False
    message: str | None = None
    by: int | None = None
    since: datetime | None = None


class Control:
    """Allowlist, invites and pause: the store, the in-memory copy, and the audit log."""

    def __init__(self, access: AccessStore, policy: Policy) -> None:
        self.access = access
        self.policy = policy
        self.pause_state = PauseState()
        self.bot_username: str | None = None
        self._version: int | None = None

    @property
    def paused(self) -> bool:
        return self.pause_state.paused

    async def load(self) -> None:
        """Read the list and the state now (start-up, and after every change)."""
        state = await self.access.state()
        users = await self.access.allowed()
        self.policy.set_listed(frozenset(u.user_id for u in users))
        self.pause_state = PauseState(
            state.paused, state.pause_message, state.paused_by, state.paused_at
        )
        self.bot_username = state.bot_username
        self._version = state.version

    async def refresh(self) -> bool:
        """Reload when another process changed something; True when it did."""
        version = await self.access.version()
        if version == self._version:
            return False
        before = self.pause_state.paused
        await self.load()
        log.info("access_reloaded", version=version, paused=self.pause_state.paused)
        if before != self.pause_state.paused:
            log.info("pause_changed_elsewhere", paused=self.pause_state.paused)
        return True

    # -- changes (each logged with who did it) -------------------------------------------

    async def allow(self, user_id: int, *, admin_id: int | None, name: str | None = None) -> bool:
        source = Source.SHELL if admin_id is None else Source.ADMIN
        added = await self.access.allow(user_id, source=source, added_by=admin_id, name=name)
        if added:
            log.info("admin_action", action="allow", admin_id=admin_id, user_id=user_id)
            await self.load()
        return added

    async def deny(self, user_id: int, *, admin_id: int | None) -> AllowedUser | None:
        removed = await self.access.deny(user_id)
        if removed is not None:
            log.info(
                "admin_action",
                action="deny",
                admin_id=admin_id,
                user_id=user_id,
                was_added_by=removed.added_by,
                was_source=removed.source.value,
            )
            await self.load()
        return removed

    async def invite(self, *, uses: int, hours: float, admin_id: int | None) -> tuple[str, Invite]:
        code, invite = await self.access.create_invite(uses=uses, hours=hours, created_by=admin_id)
        log.info(
            "admin_action",
            action="invite",
            admin_id=admin_id,
            invite_id=invite.id,
            uses=uses,
            hours=hours,
        )
        return code, invite

    async def revoke(self, invite_id: int, *, admin_id: int | None) -> Invite | None:
        invite = await self.access.revoke_invite(invite_id, admin_id)
        if invite is not None and invite.revoked_at is None:
            log.info(
                "admin_action",
                action="revoke_invite",
                admin_id=admin_id,
                invite_id=invite_id,
                uses_left=invite.uses_left,
            )
        return invite

    async def redeem(self, code: str, user_id: int, name: str | None) -> Redeem:
        outcome, invite = await self.access.redeem(code, user_id, name)
        invite_id = invite.id if invite else None
        if outcome is Redeem.ADMITTED:
            log.info("invite_redeemed", user_id=user_id, invite_id=invite_id)
            await self.load()
        else:
            log.info("invite_refused", user_id=user_id, invite_id=invite_id, why=outcome.value)
        return outcome

    async def pause(self, message: str | None, *, admin_id: int | None) -> None:
        await self.access.set_pause(True, message, admin_id)
        log.info("admin_action", action="pause", admin_id=admin_id, message=message)
        await self.load()

    async def resume(self, *, admin_id: int | None) -> bool:
        """False when the bot was not paused."""
        if not self.pause_state.paused:
            await self.load()  # another process may have paused it a moment ago
            if not self.pause_state.paused:
                return False
        await self.access.set_pause(False, None, admin_id)
        log.info("admin_action", action="resume", admin_id=admin_id)
        await self.load()
        return True

    async def remember_username(self, username: str | None) -> None:
        """The bot's @username from getMe, kept for invites made from the shell."""
        if username and username != self.bot_username:
            await self.access.set_bot_username(username)
        self.bot_username = username or self.bot_username


def invite_link(username: str | None, code: str) -> str | None:
    return f"https://t.me/{username}?start={code}" if username else None
