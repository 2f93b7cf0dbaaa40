"""The allowlist kept in the database, invite links, and the bot-wide state (pause, menus).

config.toml's `access` lists stay where they are (read-only here); this table holds the
users an admin let in from the chat, the operator from the shell, or an invite link. Every
change bumps `bot_state.version`, so a running bot notices what another process (the
`imagebot users` shell command) wrote with one small read, without re-reading the list.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from imagebot.clock import iso, parse_iso, utcnow
from imagebot.store.db import Conn, Database, Row

INVITE_CODE_BYTES = 16  # 128 random bits; secrets.token_urlsafe(16) is 22 characters
INVITE_CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Source(StrEnum):
    """Who let a user in."""

    ADMIN = "admin"
    SHELL = "shell"
    INVITE = "invite"


class Redeem(StrEnum):
    """What opening an invite link did."""

    ADMITTED = "admitted"
    ALREADY = "already"  # the user was on the list already: no use spent
    UNKNOWN = "unknown"
    USED_UP = "used_up"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class AllowedUser:
    user_id: int
    name: str | None
    source: Source
    added_by: int | None
    invite_id: int | None
    added_at: datetime


@dataclass(frozen=True, slots=True)
class Invite:
    id: int
    uses: int
    uses_left: int
    created_by: int | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and self.uses_left > 0 and self.expires_at > now


@dataclass(frozen=True, slots=True)
class BotState:
    version: int
    paused: bool
    pause_message: str | None
    paused_by: int | None
    paused_at: datetime | None
    bot_username: str | None
    command_menus: dict[str, str]


def new_invite_code() -> str:
    """A fresh invite code: 128 random bits, URL-safe (fits a t.me ?start= parameter)."""
    return secrets.token_urlsafe(INVITE_CODE_BYTES)


def looks_like_code(text: str) -> bool:
    """Could `text` be one of our codes? (A deep-link parameter is 1-64 of A-Z a-z 0-9 _ -.)"""
    return 16 <= len(text) <= 64 and set(text) <= INVITE_CODE_CHARS


def code_digest(code: str) -> str:
    return hashlib.sha256(code.encode("ascii", "replace")).hexdigest()


def _dt(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


def _user(row: Row) -> AllowedUser:
    return AllowedUser(
        user_id=int(row["user_id"]),
        name=row["name"],
        source=Source(row["source"]),
        added_by=row["added_by"],
        invite_id=row["invite_id"],
        added_at=parse_iso(row["added_at"]),
    )


def _invite(row: Row) -> Invite:
    return Invite(
        id=int(row["id"]),
        uses=int(row["uses"]),
        uses_left=int(row["uses_left"]),
        created_by=row["created_by"],
        created_at=parse_iso(row["created_at"]),
        expires_at=parse_iso(row["expires_at"]),
        revoked_at=_dt(row["revoked_at"]),
    )


def _bump(conn: Conn) -> None:
    conn.execute("UPDATE bot_state SET version = version + 1 WHERE id = 1")


class AccessStore:
    """Reads on the shared reader, every change one transaction on the writer."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads ---------------------------------------------------------------------------

    async def version(self) -> int:
        row = await self.db.fetchone("SELECT version FROM bot_state WHERE id = 1")
        return int(row["version"]) if row else 0

    async def state(self) -> BotState:
        row = await self.db.fetchone("SELECT * FROM bot_state WHERE id = 1")
        if row is None:
            return BotState(0, False, None, None, None, None, {})
        menus = json.loads(row["command_menus"] or "{}")
        return BotState(
            version=int(row["version"]),
            paused=bool(row["paused"]),
            pause_message=row["pause_message"],
            paused_by=row["paused_by"],
            paused_at=_dt(row["paused_at"]),
            bot_username=row["bot_username"],
            command_menus=menus if isinstance(menus, dict) else {},
        )

    async def allowed(self) -> list[AllowedUser]:
        """Everyone let in through the database, oldest first."""
        rows = await self.db.fetchall("SELECT * FROM allowed_users ORDER BY added_at, user_id")
        return [_user(r) for r in rows]

    async def invites(self, now: datetime | None = None) -> list[Invite]:
        """The invites that can still be used, newest first."""
        rows = await self.db.fetchall(
            "SELECT * FROM invites WHERE revoked_at IS NULL AND uses_left > 0"
            " AND expires_at > ? ORDER BY id DESC",
            (iso(now or utcnow()),),
        )
        return [_invite(r) for r in rows]

    # -- changes -------------------------------------------------------------------------

    async def allow(
        self, user_id: int, *, source: Source, added_by: int | None, name: str | None = None
    ) -> bool:
        """Let `user_id` in; False when they were on the list already (nothing changes)."""

        def run(conn: Conn) -> bool:
            changed = conn.execute(
                "INSERT INTO allowed_users (user_id, name, source, added_by, added_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
                (user_id, name, source.value, added_by, iso()),
            ).rowcount
            if changed:
                _bump(conn)
            return bool(changed)

        return await self.db.write(run)

    async def deny(self, user_id: int) -> AllowedUser | None:
        """Take `user_id` off the list; their row as it was, or None if they were not on it."""

        def run(conn: Conn) -> AllowedUser | None:
            # (no RETURNING: SQLite before 3.35, e.g. Debian 11, lacks it)
            row = conn.execute(
                "SELECT * FROM allowed_users WHERE user_id = ?", (user_id,)
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM allowed_users WHERE user_id = ?", (user_id,))
            _bump(conn)
            return _user(row)

        return await self.db.write(run)

    async def create_invite(
        self, *, uses: int, hours: float, created_by: int | None, now: datetime | None = None
    ) -> tuple[str, Invite]:
        """A new invite: the code (shown once, never stored) and its row."""
        code = new_invite_code()
        moment = now or utcnow()

        def run(conn: Conn) -> Invite:
            cursor = conn.execute(
                "INSERT INTO invites (code_sha256, uses, uses_left, created_by, created_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    code_digest(code),
                    uses,
                    uses,
                    created_by,
                    iso(moment),
                    iso(moment + timedelta(hours=hours)),
                ),
            )
            row = conn.execute(
                "SELECT * FROM invites WHERE id = ?", (cursor.lastrowid,)
            ).fetchone()
            _bump(conn)
            return _invite(row)

        return code, await self.db.write(run)

    async def revoke_invite(self, invite_id: int, by: int | None) -> Invite | None:
        """Revoke an invite; the row before the change, or None if there is no such invite.
        Revoking one already revoked, used up or expired changes nothing."""

        def run(conn: Conn) -> Invite | None:
            row = conn.execute("SELECT * FROM invites WHERE id = ?", (invite_id,)).fetchone()
            if row is None:
                return None
            if row["revoked_at"] is None:
                conn.execute(
                    "UPDATE invites SET revoked_at = ?, revoked_by = ? WHERE id = ?",
                    (iso(), by, invite_id),
                )
                _bump(conn)
            return _invite(row)

        return await self.db.write(run)

    async def redeem(
        self, code: str, user_id: int, name: str | None, now: datetime | None = None
    ) -> tuple[Redeem, Invite | None]:
        """Open an invite link: admit `user_id` while the invite has uses and time left.
        One transaction, so two people racing for the last use cannot both get in."""
        moment = now or utcnow()

        def run(conn: Conn) -> tuple[Redeem, Invite | None]:
            row = conn.execute(
                "SELECT * FROM invites WHERE code_sha256 = ?", (code_digest(code),)
            ).fetchone()
            if row is None:
                return Redeem.UNKNOWN, None
            invite = _invite(row)
            if invite.revoked_at is not None:
                return Redeem.REVOKED, invite
            if invite.expires_at <= moment:
                return Redeem.EXPIRED, invite
            listed = conn.execute(
                "SELECT 1 FROM allowed_users WHERE user_id = ?", (user_id,)
            ).fetchone()
            if listed is not None:
                return Redeem.ALREADY, invite
            if invite.uses_left <= 0:
                return Redeem.USED_UP, invite
            conn.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE id = ?", (invite.id,))
            conn.execute(
                "INSERT INTO allowed_users (user_id, name, source, added_by, invite_id, added_at)"
                " VALUES (?, ?, 'invite', ?, ?, ?)",
                (user_id, name, invite.created_by, invite.id, iso(moment)),
            )
            _bump(conn)
            return Redeem.ADMITTED, invite

        return await self.db.write(run)

    async def set_pause(self, paused: bool, message: str | None, by: int | None) -> None:
        def run(conn: Conn) -> None:
            conn.execute(
                "UPDATE bot_state SET paused = ?, pause_message = ?, paused_by = ?,"
                " paused_at = ?, version = version + 1 WHERE id = 1",
                (int(paused), message if paused else None, by, iso() if paused else None),
            )

        await self.db.write(run)

    async def set_bot_username(self, username: str | None) -> None:
        await self.db.execute_write(
            "UPDATE bot_state SET bot_username = ? WHERE id = 1"
            " AND coalesce(bot_username, '') != coalesce(?, '')",
            (username, username),
        )

    async def set_command_menus(self, menus: dict[str, str]) -> None:
        await self.db.execute_write(
            "UPDATE bot_state SET command_menus = ? WHERE id = 1",
            (json.dumps(menus, sort_keys=True),),
        )
