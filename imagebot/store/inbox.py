"""The update inbox: each update is committed here before Telegram is told it arrived."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from imagebot.clock import iso, utcnow
from imagebot.store.db import URGENT, Conn, Database

# Every update type of the Bot API; anything else is "other", so a body with made-up keys
# cannot mint new metric labels.
UPDATE_KINDS = (
    "message",
    "edited_message",
    "callback_query",
    "channel_post",
    "edited_channel_post",
    "business_connection",
    "business_message",
    "edited_business_message",
    "deleted_business_messages",
    "message_reaction",
    "message_reaction_count",
    "inline_query",
    "chosen_inline_result",
    "shipping_query",
    "pre_checkout_query",
    "purchased_paid_media",
    "poll",
    "poll_answer",
    "my_chat_member",
    "chat_member",
    "chat_join_request",
    "chat_boost",
    "removed_chat_boost",
)
_MAX_FAILURE_CHARS = 300


def update_kind(payload: dict[str, Any]) -> str:
    for kind in UPDATE_KINDS:
        if kind in payload:
            return kind
    return "other" if len(payload) > 1 else "unknown"


def failure_text(reason: str, error: BaseException | None = None) -> str:
    """What the inbox's `failure` column says: the reason, the error's type and message."""
    if error is None:
        return reason
    text = f"{reason}: {type(error).__name__}: {error}"
    return text if len(text) <= _MAX_FAILURE_CHARS else text[: _MAX_FAILURE_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class SavedUpdate:
    update_id: int
    payload: dict[str, Any] | None  # None: the stored text is not a JSON object any more


class Inbox:
    """Dedupe on update_id and remember which updates still have to be processed."""

    def __init__(self, db: Database, node_id: str | None = None) -> None:
        self.db = db
        self.node_id = node_id  # recorded as received_by: whose handlers run the update

    async def save(self, payloads: Sequence[dict[str, Any]]) -> list[bool]:
        """Commit a batch of raw updates in one transaction; True where the update is new."""
        now = iso()
        rows = [
            (
                int(payload["update_id"]),
                update_kind(payload),
                now,
                json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
                self.node_id,
            )
            for payload in payloads
        ]

        def insert(conn: Conn) -> list[bool]:
            return [
                conn.execute(
                    "INSERT INTO inbox (update_id, kind, received_at, payload, received_by)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (update_id) DO NOTHING",
                    row,
                ).rowcount
                == 1
                for row in rows
            ]

        # Telegram waits for this one: it goes ahead of queued job writes.
        return await self.db.write(insert, priority=URGENT)

    async def mark_processed(self, update_id: int, failure: str | None = None) -> None:
        """Close the update; `failure` says why it could not be handled (None: it was).

        A failure is recorded even when the row was closed already (a handler that raised after
        its job was created, which closes the row in the same transaction).
        """
        if failure is None:
            await self.db.execute_write(
                "UPDATE inbox SET processed_at = ? WHERE update_id = ? AND processed_at IS NULL",
                (iso(), update_id),
            )
            return
        await self.db.execute_write(
            "UPDATE inbox SET processed_at = coalesce(processed_at, ?), failure = ?"
            " WHERE update_id = ?",
            (iso(), failure, update_id),
        )

    async def unprocessed(self, update_ids: Sequence[int] | None = None) -> list[SavedUpdate]:
        """Updates saved but not processed (of `update_ids` only, when given), in order."""
        sql = "SELECT update_id, payload FROM inbox WHERE processed_at IS NULL"
        params: list[int] = []
        if update_ids is not None:
            if not update_ids:
                return []
            sql += f" AND update_id IN ({', '.join('?' for _ in update_ids)})"
            params = list(update_ids)
        rows = await self.db.fetchall(sql + " ORDER BY update_id", params)
        return [SavedUpdate(row["update_id"], _load(row["payload"])) for row in rows]

    async def get(self, update_id: int) -> dict[str, Any] | None:
        """The saved body of one update (None if unknown, pruned or unreadable)."""
        row = await self.db.fetchone("SELECT payload FROM inbox WHERE update_id = ?", (update_id,))
        return _load(row["payload"]) if row is not None else None

    async def prune(self, older_than_days: float) -> int:
        """Drop processed updates older than the retention (Telegram may resend for days)."""
        cutoff = iso(utcnow() - timedelta(days=older_than_days))
        return await self.db.execute_write(
            "DELETE FROM inbox WHERE processed_at IS NOT NULL AND received_at < ?", (cutoff,)
        )

    async def counts(self) -> dict[str, int]:
        row = await self.db.fetchone(
            "SELECT count(*) AS total,"
            " sum(CASE WHEN processed_at IS NULL THEN 1 ELSE 0 END) AS pending FROM inbox"
        )
        assert row is not None
        return {"total": row["total"] or 0, "pending": row["pending"] or 0}


def _load(text: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None
