"""Conversations waiting for a user's next message (/edit), kept where every process sees them.

A row per (chat, user, name) that is waiting: its state, what was gathered so far (JSON), and
when it times out. A handler reads the row when its update starts (`get`) and writes the
next state with `advance`, which in the same transaction marks the update processed in the
inbox: a crash leaves both or neither, and the processor's own mark afterwards changes
nothing (`processed_at IS NULL`). A row past `expires_at` is no conversation: `get` ignores
it, and `expire` deletes it once, for the one caller that then says so to the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from imagebot.clock import iso, utcnow
from imagebot.store.db import Conn, Database


@dataclass(frozen=True, slots=True)
class ConversationKey:
    chat_id: int
    user_id: int
    name: str


@dataclass(frozen=True, slots=True)
class Conversation:
    key: ConversationKey
    state: str
    data: dict[str, Any] = field(default_factory=dict)
    updated_at: str = ""
    expires_at: str = ""


def _conversation(row: Any) -> Conversation:
    try:
        data = json.loads(row["data"])
    except (TypeError, ValueError):
        data = {}
    return Conversation(
        ConversationKey(int(row["chat_id"]), int(row["user_id"]), str(row["name"])),
        str(row["state"]),
        data if isinstance(data, dict) else {},
        str(row["updated_at"]),
        str(row["expires_at"]),
    )


_KEY = "chat_id = ? AND user_id = ? AND name = ?"


class ConversationStore:
    """Read, advance and expire conversations (SQL for both databases)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, key: ConversationKey, now: datetime | None = None) -> Conversation | None:
        """The conversation waiting under `key`, or None (none, or it has timed out)."""
        row = await self.db.fetchone(
            f"SELECT * FROM conversations WHERE {_KEY} AND expires_at > ?",  # noqa: S608 - constant
            (key.chat_id, key.user_id, key.name, iso(now or utcnow())),
        )
        return _conversation(row) if row is not None else None

    def write_in(
        self,
        conn: Conn,
        key: ConversationKey,
        state: str | None,
        data: dict[str, Any] | None = None,
        *,
        timeout_s: float = 0.0,
        now: datetime | None = None,
    ) -> str | None:
        """Inside a write transaction: the conversation is in `state` now (None: it ended, the
        row goes). Returns the new expires_at (None when it ended)."""
        if state is None:
            conn.execute(f"DELETE FROM conversations WHERE {_KEY}", (*_params(key),))  # noqa: S608
            return None
        moment = now or utcnow()
        stamp, expires = iso(moment), iso(moment + timedelta(seconds=timeout_s))
        conn.execute(
            "INSERT INTO conversations (chat_id, user_id, name, state, data, updated_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (chat_id, user_id, name) DO UPDATE SET state = excluded.state,"
            " data = excluded.data, updated_at = excluded.updated_at,"
            " expires_at = excluded.expires_at",
            (
                *_params(key),
                state,
                json.dumps(data or {}, ensure_ascii=False, separators=(",", ":")),
                stamp,
                expires,
            ),
        )
        return expires

    async def advance(
        self,
        key: ConversationKey,
        state: str | None,
        data: dict[str, Any] | None,
        *,
        update_id: int,
        timeout_s: float,
    ) -> str | None:
        """Write the conversation's next state (None: it ended) and mark `update_id` processed,
        in one transaction. Returns the new expires_at (None when it ended)."""
        stamp = utcnow()

        def write(conn: Conn) -> str | None:
            expires = self.write_in(conn, key, state, data, timeout_s=timeout_s, now=stamp)
            conn.execute(
                "UPDATE inbox SET processed_at = ? WHERE update_id = ? AND processed_at IS NULL",
                (iso(stamp), update_id),
            )
            return expires

        return await self.db.write(write)

    async def expire(
        self, key: ConversationKey, now: datetime | None = None
    ) -> Conversation | None:
        """Delete the conversation under `key` if it has timed out; the deleted row, or None
        (still waiting, gone, or another caller deleted it first: only one caller gets it)."""
        stamp = iso(now or utcnow())

        def take(conn: Conn) -> Conversation | None:
            row = conn.execute(
                f"SELECT * FROM conversations WHERE {_KEY} AND expires_at <= ?",  # noqa: S608
                (*_params(key), stamp),
            ).fetchone()
            if row is None:
                return None
            gone = conn.execute(
                f"DELETE FROM conversations WHERE {_KEY} AND expires_at <= ?",  # noqa: S608
                (*_params(key), stamp),
            ).rowcount
            return _conversation(row) if gone == 1 else None

        return await self.db.write(take)

    async def expired(
        self, now: datetime | None = None, limit: int = 100
    ) -> list[ConversationKey]:
        """Keys of conversations that have timed out (oldest first, at most `limit`)."""
        rows = await self.db.fetchall(
            "SELECT chat_id, user_id, name FROM conversations WHERE expires_at <= ?"
            " ORDER BY expires_at LIMIT ?",
            (iso(now or utcnow()), limit),
        )
        return [
            ConversationKey(int(r["chat_id"]), int(r["user_id"]), str(r["name"])) for r in rows
        ]


def _params(key: ConversationKey) -> tuple[int, int, str]:
    return (key.chat_id, key.user_id, key.name)
