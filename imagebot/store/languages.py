"""The language each user chose with /language (user_prefs.language)."""

from __future__ import annotations

from imagebot.clock import iso, utcnow
from imagebot.store.db import Database


async def chosen_language(db: Database, user_id: int) -> str | None:
    """The catalog name the user chose, or None when they never chose."""
    row = await db.fetchone("SELECT language FROM user_prefs WHERE user_id = ?", (user_id,))
    return str(row["language"]) if row is not None and row["language"] else None


async def choose_language(db: Database, user_id: int, language: str) -> None:
    """Store the user's choice (it replaces an earlier one)."""
    await db.execute_write(
        "INSERT INTO user_prefs (user_id, language, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET language = excluded.language,"
        " updated_at = excluded.updated_at",
        (user_id, language, iso(utcnow())),
    )


async def language_of(db: Database, user_id: int) -> str | None:
    """The language to address a user in outside their own updates (a refund notice, a
    payment found at start-up): their choice, else the language of their newest job."""
    chosen = await chosen_language(db, user_id)
    if chosen is not None:
        return chosen
    row = await db.fetchone(
        "SELECT language FROM jobs WHERE user_id = ? AND language IS NOT NULL"
        " ORDER BY id DESC LIMIT 1",
        (user_id,),
    )
    return str(row["language"]) if row is not None else None
