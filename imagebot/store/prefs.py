"""Users' choices (style, shape, image count) and the 🎨 Remix questions waiting for a reply."""

from __future__ import annotations

from dataclasses import dataclass

from imagebot.clock import iso
from imagebot.store import languages
from imagebot.store.db import Database, Row

# What every update reads of its user's row (the language) and a request the rest of
# (with_language; the inbox reads them with the save too, see Inbox.prefs_at_save)
PREFS_COLUMNS = ("language", "style_id", "shape", "image_count")
_SELECT_PREFS = f"SELECT {', '.join(PREFS_COLUMNS)} FROM user_prefs WHERE user_id = ?"  # noqa: S608 - column names

# one statement per column: a choice changes only its own column
_UPSERT = {
    "style_id": (
        "INSERT INTO user_prefs (user_id, style_id, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET style_id = excluded.style_id,"
        " updated_at = excluded.updated_at"
    ),
    "shape": (
        "INSERT INTO user_prefs (user_id, shape, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET shape = excluded.shape,"
        " updated_at = excluded.updated_at"
    ),
    "image_count": (
        "INSERT INTO user_prefs (user_id, image_count, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET image_count = excluded.image_count,"
        " updated_at = excluded.updated_at"
    ),
}


@dataclass(frozen=True, slots=True)
class Prefs:
    """One user's choices; None means the operator's default."""

    style_id: str | None = None
    shape: str | None = None
    image_count: int | None = None


@dataclass(frozen=True, slots=True)
class RemixPrompt:
    """A 🎨 Remix question the bot sent: a reply to it remixes `job_id`."""

    chat_id: int
    message_id: int
    job_id: int
    user_id: int
    created_at: str


class PrefStore:
    """Reads and writes of user_prefs and remix_prompts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # The language columns' SQL lives in store/languages.py (stars.py reads it too); handlers
    # reach it here, through Services, like every other store.
    async def chosen_language(self, user_id: int) -> str | None:
        """The catalog name the user chose with /language, or None."""
        return await languages.chosen_language(self.db, user_id)

    async def choose_language(self, user_id: int, language: str) -> None:
        """Store the user's /language choice."""
        await languages.choose_language(self.db, user_id, language)

    async def language_of(self, user_id: int) -> str | None:
        """The language to address a user in outside their own updates."""
        return await languages.language_of(self.db, user_id)

    async def get(self, user_id: int) -> Prefs:
        return (await self.with_language(user_id))[1]

    async def with_language(self, user_id: int) -> tuple[str | None, Prefs]:
        """The language the user chose (None: never) and their other choices, in one read
        (every update needs the language; a request needs the rest too)."""
        return language_and_prefs(await self.db.fetchone(_SELECT_PREFS, (user_id,)))

    async def set_style(self, user_id: int, style_id: str) -> None:
        await self.db.execute_write(_UPSERT["style_id"], (user_id, style_id, iso()))

    async def set_shape(self, user_id: int, shape: str) -> None:
        await self.db.execute_write(_UPSERT["shape"], (user_id, shape, iso()))

    async def set_count(self, user_id: int, count: int) -> None:
        await self.db.execute_write(_UPSERT["image_count"], (user_id, count, iso()))

    async def add_remix_prompt(
        self, chat_id: int, message_id: int, job_id: int, user_id: int
    ) -> None:
        await self.db.execute_write(
            "INSERT INTO remix_prompts (chat_id, message_id, job_id, user_id, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (chat_id, message_id) DO NOTHING",
            (chat_id, message_id, job_id, user_id, iso()),
        )

    async def remix_prompt(self, chat_id: int, message_id: int) -> RemixPrompt | None:
        row = await self.db.fetchone(
            "SELECT chat_id, message_id, job_id, user_id, created_at FROM remix_prompts"
            " WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        )
        if row is None:
            return None
        return RemixPrompt(
            int(row["chat_id"]),
            int(row["message_id"]),
            int(row["job_id"]),
            int(row["user_id"]),
            str(row["created_at"]),
        )


def language_and_prefs(row: Row | None) -> tuple[str | None, Prefs]:
    """A user_prefs row's PREFS_COLUMNS as (the chosen language or None, the choices); a
    missing row (or one of NULLs) is no choice made."""
    if row is None:
        return None, Prefs()
    count = row["image_count"]
    prefs = Prefs(row["style_id"], row["shape"], int(count) if count is not None else None)
    return (str(row["language"]) if row["language"] else None), prefs
