"""AlbumStore: the parts of albums not yet turned into a job (table album_parts, schema 8)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from imagebot.clock import iso
from imagebot.store.db import Database


@dataclass(frozen=True, slots=True)
class AlbumPart:
    """One message of an album: its photo (None when it cannot be edited) and any /edit text."""

    chat_id: int
    media_group_id: str
    message_id: int
    update_id: int
    user_id: int
    file_id: str | None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None
    instruction: str | None = None  # set on the part whose caption was /edit <instruction>


def _part(row: sqlite3.Row) -> AlbumPart:
    return AlbumPart(
        chat_id=row["chat_id"],
        media_group_id=row["media_group_id"],
        message_id=row["message_id"],
        update_id=row["update_id"],
        user_id=row["user_id"],
        file_id=row["file_id"],
        file_size=row["file_size"],
        width=row["width"],
        height=row["height"],
        instruction=row["instruction"],
    )


class AlbumStore:
    """Reads and writes of album_parts; keyed by (chat, media_group_id, message_id)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, part: AlbumPart, received_at: datetime) -> bool:
        """Record a part (a replayed update records nothing new); True if it was new."""
        changed = await self.db.execute_write(
            "INSERT INTO album_parts (chat_id, media_group_id, message_id, update_id, user_id,"
            " file_id, file_size, width, height, instruction, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (chat_id, media_group_id, message_id) DO NOTHING",
            (
                part.chat_id,
                part.media_group_id,
                part.message_id,
                part.update_id,
                part.user_id,
                part.file_id,
                part.file_size,
                part.width,
                part.height,
                part.instruction,
                iso(received_at),
            ),
        )
        return changed == 1

    async def quiet(self, now: datetime, quiet_s: float) -> list[tuple[int, str]]:
        """(chat, media_group_id) of the albums whose last part came `quiet_s` or more ago."""
        rows = await self.db.fetchall(
            "SELECT chat_id, media_group_id FROM album_parts GROUP BY chat_id, media_group_id"
            " HAVING max(received_at) <= ? ORDER BY min(update_id)",
            (iso(now - timedelta(seconds=quiet_s)),),
        )
        return [(row["chat_id"], row["media_group_id"]) for row in rows]

    async def parts(self, chat_id: int, media_group_id: str) -> list[AlbumPart]:
        """An album's parts in the order the user sent them."""
        rows = await self.db.fetchall(
            "SELECT * FROM album_parts WHERE chat_id = ? AND media_group_id = ?"
            " ORDER BY message_id",
            (chat_id, media_group_id),
        )
        return [_part(row) for row in rows]

    async def forget(self, chat_id: int, media_group_id: str, message_ids: Sequence[int]) -> None:
        """Delete the parts that were used (a part that came in meanwhile stays)."""

        def delete(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM album_parts WHERE chat_id = ? AND media_group_id = ?"
                " AND message_id = ?",
                [(chat_id, media_group_id, m) for m in message_ids],
            )

        await self.db.write(delete)

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT count(*) AS n FROM album_parts")
        return int(row["n"]) if row else 0
