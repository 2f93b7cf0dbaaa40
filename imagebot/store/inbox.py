"""The update inbox: each update is committed here before Telegram is told it arrived."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from imagebot.clock import iso, utcnow
from imagebot.store.db import INTERACTIVE, URGENT, Conn, Database, Row, is_storage_fault
from imagebot.store.groupcall import GroupCall, Member
from imagebot.store.prefs import PREFS_COLUMNS, Prefs, language_and_prefs

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
# Rows per INSERT of a group commit (5 parameters each: far below either database's limit).
# A single save with more rows (a polling batch is at most 100) still gets one statement.
MAX_BATCH_ROWS = 200
_MAX_CLOSED = 10_000
_COLUMNS = ("update_id", "kind", "received_at", "payload", "received_by", "chat_key")
_Row = tuple[Any, ...]  # the _COLUMNS, then the update's user id (not a column: see _insert)
_CHAT = _COLUMNS.index("chat_key")
_USER = len(_COLUMNS)


def update_kind(payload: dict[str, Any]) -> str:
    for kind in UPDATE_KINDS:
        if kind in payload:
            return kind
    return "other" if len(payload) > 1 else "unknown"


def chat_key(payload: dict[str, Any]) -> int | None:
    """The chat whose order a raw update keeps: what PTB's `Update.effective_chat` names
    (`<kind>.chat`, or the message of a callback query), as intake's `_chat_key` computes it
    from the parsed update; None when there is none or its id is not an integer."""
    kind = update_kind(payload)
    body = payload.get(kind)
    if not isinstance(body, dict):
        return None
    chat = body.get("chat")
    if chat is None and kind == "callback_query":
        message = body.get("message")
        chat = message.get("chat") if isinstance(message, dict) else None
    chat_id = chat.get("id") if isinstance(chat, dict) else None
    return chat_id if type(chat_id) is int else None


def user_key(payload: dict[str, Any]) -> int | None:
    """Who sent a raw update (`<kind>.from`: a message's or a button press's sender); None
    when it names nobody that way. Only a hint: Inbox.prefs_at_save checks it against the
    parsed update's `effective_user`."""
    body = payload.get(update_kind(payload))
    sender = body.get("from") if isinstance(body, dict) else None
    user_id = sender.get("id") if isinstance(sender, dict) else None
    return user_id if type(user_id) is int else None


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


_Saver = Member[list[_Row], list[bool]]  # one `save` call: its rows, [is new] per row


def _chunks(savers: list[_Saver]) -> Iterator[list[_Saver]]:
    """Consecutive savers, up to MAX_BATCH_ROWS rows a chunk; a saver is never split (its
    rows are committed all together or not at all)."""
    chunk: list[_Saver] = []
    rows = 0
    for saver in savers:
        if chunk and rows + len(saver.arg) > MAX_BATCH_ROWS:
            yield chunk
            chunk, rows = [], 0
        chunk.append(saver)
        rows += len(saver.arg)
    if chunk:
        yield chunk


# The save's statement on a database several processes share: the insert (see _insert), then
# for each new row of whose chat no earlier update was open its user's choices, read in the
# same snapshot.
_PREFS_SQL = (
    "WITH saved AS ({insert})"  # noqa: S608 - column names and placeholders only
    " SELECT s.update_id, s.clear, p.user_id IS NOT NULL AS known, "
    + ", ".join(f"p.{column}" for column in PREFS_COLUMNS)
    + " FROM saved AS s LEFT JOIN (VALUES {users}) AS u(update_id, user_id)"
    " ON u.update_id = s.update_id"
    " LEFT JOIN user_prefs AS p ON s.clear AND p.user_id = u.user_id"
)


class _Clear:
    """What a save on a shared database learned of its new updates, for their handlers: which
    had no earlier update of their chat open (Inbox.first_open_at_save), and for those, their
    user's choices as of the save (Inbox.prefs_at_save). Written on the writer thread."""

    def __init__(self) -> None:
        self.updates: set[int] = set()
        self.prefs: dict[int, tuple[int, str | None, Prefs]] = {}

    def add(self, update_id: int, user_id: int | None, prefs: Row | None) -> None:
        """`user_id` None: no choices to keep (nobody named, or they may change first)."""
        if len(self.updates) >= _MAX_CLOSED:  # never asked for (bounded, harmless)
            self.updates.clear()
        self.updates.add(update_id)
        if user_id is None:
            return
        if len(self.prefs) >= _MAX_CLOSED:
            self.prefs.clear()
        self.prefs[update_id] = (user_id, *language_and_prefs(prefs))


def _insert(conn: Conn, rows: list[_Row], clear: _Clear | None = None) -> list[bool]:
    """One statement (its own transaction, outside BEGIN … COMMIT) inserting `rows`; True for
    the rows it added. An update_id already stored, or earlier in `rows` (Telegram sent it
    again meanwhile), is not new. `clear` (a database several processes share): gets the
    new rows of whose chat no earlier update was open when they were saved, with their user's
    choices read in the same statement (the read every update made before its first handler,
    measured at 200 updates a second, cost it a thread hop and two turns of the busy loop)."""
    seen: set[int] = set()
    unique = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            unique.append(row)
    one = "(" + ", ".join("?" for _ in _COLUMNS) + ")"
    values = [value for row in unique for value in row[:_USER]]
    # The statement's snapshot does not see the rows it inserts: a chat's earlier update in
    # the same batch is this process's own, and its handlers take them in order.
    opened = (
        ", NOT EXISTS (SELECT 1 FROM inbox AS e WHERE e.chat_key = inbox.chat_key"
        " AND e.processed_at IS NULL AND e.update_id < inbox.update_id) AS clear"
        if clear is not None
        else ""
    )
    sql = (
        f"INSERT INTO inbox ({', '.join(_COLUMNS)}) VALUES {', '.join(one for _ in unique)}"  # noqa: S608 - placeholders only
        f" ON CONFLICT (update_id) DO NOTHING RETURNING update_id{opened}"
    )
    if clear is not None:
        sql = _PREFS_SQL.format(
            insert=sql, users=", ".join("(?::bigint, ?::bigint)" for _ in unique)
        )
        values += [value for row in unique for value in (row[0], row[_USER])]
    returned = conn.execute(sql, values).fetchall()
    added = {int(row[0]) for row in returned}
    if clear is not None:
        # A chat's later update in this batch is clear too (its earlier one is this
        # process's to run first), but that earlier one may change the user's choices.
        first: dict[int, int] = {}  # chat -> its first update in the batch
        for row in unique:
            if row[_CHAT] is not None:
                first[row[_CHAT]] = min(first.get(row[_CHAT], row[0]), row[0])
        users = {row[0]: row[_USER] for row in unique if first.get(row[_CHAT]) == row[0]}
        for row in returned:
            if row["clear"]:
                update_id = int(row["update_id"])
                clear.add(update_id, users.get(update_id), row if row["known"] else None)
    fresh = []
    for row in rows:
        fresh.append(row[0] in added)
        added.discard(row[0])  # a repeat within `rows` is not new
    return fresh


class Inbox:
    """Dedupe on update_id and remember which updates still have to be processed."""

    def __init__(self, db: Database, node_id: str | None = None) -> None:
        self.db = db
        self.node_id = node_id  # recorded as received_by: whose handlers run the update
        # Saves come from the main loop (polling) and from the webhook thread's loop; the ones
        # that arrive while one waits for the writer are committed with it. Telegram waits
        # for these: they go ahead of queued job writes.
        self._saves = GroupCall(db, self._commit, priority=URGENT)
        # updates whose job creation closed them in its own transaction (JobStore.create):
        # their handler's end needs no second write (see `closed_with_job`)
        self._closed: set[int] = set()
        # A database several processes share: updates saved here while no earlier update of
        # their chat was open, and their users' choices then (see `first_open_at_save` and
        # `prefs_at_save`); written on the writer thread.
        self._clear: _Clear | None = _Clear() if db.shared else None

    async def save(self, payloads: Sequence[dict[str, Any]]) -> list[bool]:
        """Commit raw updates (all of them or none); True where the update is new.

        Group commit: saves that arrive while one is waiting for the writer join it, and the
        writer commits them together, one INSERT statement for up to MAX_BATCH_ROWS rows (a
        statement is its own transaction: one round trip and one fsync for them all, where a
        save each cost BEGIN, INSERT, COMMIT and an fsync each). Under load the batch grows
        with the queue, so the writer keeps up; alone, a save is one statement. Every caller
        still returns only once its own rows are committed.
        """
        if not payloads:
            return []
        now = iso()
        rows = [
            (
                int(payload["update_id"]),
                update_kind(payload),
                now,
                json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
                self.node_id,
                chat_key(payload),
                user_key(payload),
            )
            for payload in payloads
        ]
        return await self._saves.call(rows)

    def _commit(self, conn: Conn, savers: list[_Saver]) -> None:
        """On the writer: commit the batch, chunk by chunk; every saver is settled (its result
        or its error) before this returns. Re-raises the first error afterwards, so the store
        records a failed write (/healthz)."""
        first_error: BaseException | None = None
        for chunk in _chunks(savers):
            try:
                fresh = _insert(conn, [row for saver in chunk for row in saver.arg], self._clear)
            except Exception as exc:
                if len(chunk) == 1 or is_storage_fault(exc):
                    for saver in chunk:
                        saver.fail(exc)
                    first_error = first_error or exc
                    continue
                # One saver's rows the database refuses must not fail the others' updates:
                # each saver on its own statement.
                for saver in chunk:
                    try:
                        saver.settle(_insert(conn, saver.arg, self._clear))
                    except Exception as own:
                        saver.fail(own)
                        first_error = first_error or own
                continue
            start = 0
            for saver in chunk:
                saver.settle(fresh[start : start + len(saver.arg)])
                start += len(saver.arg)
        if first_error is not None:
            raise first_error

    def first_open_at_save(self, update_id: int) -> bool:
        """True (once) if, when this process saved the update, no earlier update of its chat
        was open in the inbox: its handler need not ask again before it runs (the read each
        update made before its handler started, measured at 200 updates a second, waited for
        the loop's turn as long as the job creation). An earlier one arriving later still (out
        of order) is not waited for, as one arriving after that read was not."""
        clear = self._clear
        if clear is None or update_id not in clear.updates:
            return False
        clear.updates.discard(update_id)
        return True

    def prefs_at_save(self, update_id: int, user_id: int) -> tuple[str | None, Prefs] | None:
        """(Once) user `user_id`'s language and choices as the save of this update read them,
        when no earlier update of its chat was open then; None otherwise (read them now).

        As good as a read now: the chat's later updates wait for this one, so what could
        change the choices in between is an update of another chat (the same user elsewhere),
        whose order against this one is no more defined by a read now."""
        clear = self._clear
        found = clear.prefs.pop(update_id, None) if clear is not None else None
        if found is None or found[0] != user_id:
            return None
        return found[1], found[2]

    def closed_with_job(self, update_id: int) -> None:
        """The update's job was created, and the same transaction closed the update: its
        handler's end writes nothing more (a write matching no row is still a round trip on
        the connection the next user's job creation waits for)."""
        if len(self._closed) >= _MAX_CLOSED:  # handlers that never ended (bounded, harmless)
            self._closed.clear()
        self._closed.add(update_id)

    async def mark_processed(self, update_id: int, failure: str | None = None) -> None:
        """Close the update; `failure` says why it could not be handled (None: it was).

        A failure is recorded even when the row was closed already (a handler that raised after
        its job was created, which closes the row in the same transaction). INTERACTIVE: the
        end of a handler, which the chat's next update (on any process) waits for.
        """
        if update_id in self._closed:
            self._closed.discard(update_id)
            if failure is None:
                return
        if failure is None:
            await self.db.execute_write(
                "UPDATE inbox SET processed_at = ? WHERE update_id = ? AND processed_at IS NULL",
                (iso(), update_id),
                priority=INTERACTIVE,
            )
            return
        await self.db.execute_write(
            "UPDATE inbox SET processed_at = coalesce(processed_at, ?), failure = ?"
            " WHERE update_id = ?",
            (iso(), failure, update_id),
            priority=INTERACTIVE,
        )

    async def newest_update_id(self) -> int | None:
        """The highest update_id saved: a new poller asks Telegram for the ones after it."""
        row = await self.db.fetchone("SELECT max(update_id) AS newest FROM inbox")
        return int(row["newest"]) if row is not None and row["newest"] is not None else None

    async def earlier_pending(self, chat_key: int, update_id: int) -> int | None:
        """The earliest update of this chat before `update_id` that is saved but not yet
        processed (another process still runs it, or a dead one left it); None if none."""
        row = await self.db.fetchone(
            "SELECT update_id FROM inbox WHERE chat_key = ? AND processed_at IS NULL"
            " AND update_id < ? ORDER BY update_id LIMIT 1",
            (chat_key, update_id),
        )
        return int(row["update_id"]) if row is not None else None

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
