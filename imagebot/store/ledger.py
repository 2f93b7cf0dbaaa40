"""SQL of credits: orders, the ledger (purchases, refunds, grants, job reservations), the
reconciliation cursor. The rules (what costs what, who may refund) live in imagebot/credits.py.

Every row that moves credits is written once: a charge id is unique per kind, a job has at
most one reservation and one settlement, a user at most one welcome grant. A balance is the
sum of the user's rows, never a stored number that could drift.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from imagebot.clock import iso
from imagebot.store.db import URGENT, Conn, Database, Row
from imagebot.store.usage import user_lock

ORDER_OPEN, ORDER_PAID = "open", "paid"
PURCHASE, STAR_REFUND, GRANT, WELCOME, SPEND, JOB_REFUND = (
    "purchase",
    "star_refund",
    "grant",
    "welcome",
    "spend",
    "job_refund",
)
_BALANCE = "SELECT coalesce(sum(credits), 0) FROM credit_ledger WHERE user_id = ?"


class NotEnoughCredits(Exception):
    """Raised inside a job-creating transaction to roll it back: the user cannot pay."""

    def __init__(self, balance: int, needed: int) -> None:
        super().__init__(f"balance {balance} < {needed}")
        self.balance = balance
        self.needed = needed


@dataclass(frozen=True, slots=True)
class Order:
    id: int
    payload: str
    user_id: int
    chat_id: int
    pack_id: str
    stars: int
    credits: int
    title: str
    status: str
    created_at: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row."""

    id: int
    user_id: int
    kind: str
    credits: int
    stars: int
    charge_id: str | None
    order_id: int | None
    job_id: int | None
    note: str | None
    created_at: str


@dataclass(frozen=True, slots=True)
class Credited:
    """The outcome of recording a payment: whether this call wrote the row, and the balance."""

    inserted: bool
    balance: int
    entry: Entry | None


def _order(row: Row | None) -> Order | None:
    if row is None:
        return None
    return Order(
        row["id"],
        row["payload"],
        row["user_id"],
        row["chat_id"],
        row["pack_id"],
        row["stars"],
        row["credits"],
        row["title"],
        row["status"],
        row["created_at"],
    )


def _entry(row: Row) -> Entry:
    return Entry(
        row["id"],
        row["user_id"],
        row["kind"],
        row["credits"],
        row["stars"],
        row["charge_id"],
        row["order_id"],
        row["job_id"],
        row["note"],
        row["created_at"],
    )


def balance_in(conn: Conn, user_id: int) -> int:
    """The user's balance, read inside a write transaction."""
    return int(conn.execute(_BALANCE, (user_id,)).fetchone()[0])


def _insert(conn: Conn, **values: object) -> int | None:
    """Insert a ledger row unless a unique key has it already; the new row id or None."""
    values.setdefault("created_at", iso())
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cursor = conn.execute(
        f"INSERT INTO credit_ledger ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING",  # noqa: S608 - keys are ours
        tuple(values.values()),
    )
    return cursor.lastrowid if cursor.rowcount == 1 else None


def grant_welcome_in(conn: Conn, user_id: int, credits: int) -> bool:
    """The one-time welcome grant, inside a transaction; True if it was given now."""
    if credits <= 0:
        return False
    return (
        _insert(conn, user_id=user_id, kind=WELCOME, credits=credits, note="welcome") is not None
    )


def reserve_in(conn: Conn, user_id: int, job_id: int, credits: int) -> None:
    """Reserve a new job's credits in its creating transaction; NotEnoughCredits rolls it back."""
    balance = balance_in(conn, user_id)
    if balance < credits:
        raise NotEnoughCredits(balance, credits)
    _insert(
        conn,
        user_id=user_id,
        kind=SPEND,
        credits=-credits,
        job_id=job_id,
        note=f"reserved for job {job_id}",
    )


class Ledger:
    """Reads and writes of star_orders, credit_ledger and star_sync."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- orders ----------------------------------------------------------------------------

    async def create_order(
        self, *, user_id: int, chat_id: int, pack_id: str, stars: int, credits: int, title: str
    ) -> Order:
        """An open order with the price snapshot; its payload names it (o:<id>:<random>)."""
        nonce = secrets.token_hex(6)
        stamp = iso()

        def create(conn: Conn) -> Row:
            # The payload needs the id: insert with a unique placeholder, then set it.
            row_id = conn.execute(
                "INSERT INTO star_orders (payload, user_id, chat_id, pack_id, stars, credits,"
                " title, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (f"pending:{nonce}", user_id, chat_id, pack_id, stars, credits, title, stamp),
            ).lastrowid
            conn.execute(
                "UPDATE star_orders SET payload = ? WHERE id = ?", (f"o:{row_id}:{nonce}", row_id)
            )
            row: Row = conn.execute("SELECT * FROM star_orders WHERE id = ?", (row_id,)).fetchone()
            return row

        order = _order(await self.db.write(create))
        assert order is not None
        return order

    async def set_invoice_message(self, order_id: int, message_id: int) -> None:
        await self.db.execute_write(
            "UPDATE star_orders SET invoice_message_id = ? WHERE id = ?", (message_id, order_id)
        )

    async def order_by_payload(self, payload: str) -> Order | None:
        """Read through the reader connection (never waits for writes)."""
        return _order(
            await self.db.fetchone("SELECT * FROM star_orders WHERE payload = ?", (payload,))
        )

    # -- payments --------------------------------------------------------------------------

    async def record_purchase(
        self,
        *,
        user_id: int,
        charge_id: str,
        stars: int,
        credits: int,
        order_id: int | None,
        update_id: int | None,
        note: str,
        reconciled: bool = False,
    ) -> Credited:
        """Credit one charge, once. The same transaction marks the order paid and, when the
        payment came in an update, that update processed in the inbox."""
        stamp = iso()

        def record(conn: Conn) -> Credited:
            row_id = _insert(
                conn,
                user_id=user_id,
                kind=PURCHASE,
                credits=credits,
                stars=stars,
                charge_id=charge_id,
                order_id=order_id,
                update_id=update_id,
                note=note,
                created_at=stamp,
                reconciled_at=stamp if reconciled else None,
            )
            if order_id is not None:
                conn.execute(
                    "UPDATE star_orders SET status = 'paid', paid_at = coalesce(paid_at, ?)"
                    " WHERE id = ?",
                    (stamp, order_id),
                )
            if update_id is not None:
                conn.execute(
                    "UPDATE inbox SET processed_at = ? WHERE update_id = ?"
                    " AND processed_at IS NULL",
                    (stamp, update_id),
                )
            entry = None
            if row_id is not None:
                entry = _entry(
                    conn.execute("SELECT * FROM credit_ledger WHERE id = ?", (row_id,)).fetchone()
                )
            return Credited(row_id is not None, balance_in(conn, user_id), entry)

        # A payment confirmation goes ahead of queued job writes.
        return await self.db.write(record, priority=URGENT)

    async def purchase(self, charge_id: str) -> Entry | None:
        row = await self.db.fetchone(
            "SELECT * FROM credit_ledger WHERE kind = 'purchase' AND charge_id = ?", (charge_id,)
        )
        return _entry(row) if row else None

    async def reserve_star_refund(
        self, charge_id: str, note: str
    ) -> tuple[str, Entry | None, int]:
        """Take a purchase's credits back before Telegram is asked to refund it.

        Returns (outcome, purchase, balance): "reserved", "unknown" (no such purchase),
        "already" (a refund row exists), or "balance" (the user has spent too much of it:
        a balance may not go below zero).
        """

        def reserve(conn: Conn) -> tuple[str, Entry | None, int]:
            row = conn.execute(
                "SELECT * FROM credit_ledger WHERE kind = 'purchase' AND charge_id = ?",
                (charge_id,),
            ).fetchone()
            if row is None:
                return "unknown", None, 0
            bought = _entry(row)
            # Balances only go down under the user's job-creation lock (JobStore.create); a
            # purchase row never changes, so reading it first is safe.
            self.db.lock(conn, user_lock(bought.user_id))
            balance = balance_in(conn, bought.user_id)
            if conn.execute(
                "SELECT 1 FROM credit_ledger WHERE kind = 'star_refund' AND charge_id = ?",
                (charge_id,),
            ).fetchone():
                return "already", bought, balance
            if balance < bought.credits:
                return "balance", bought, balance
            _insert(
                conn,
                user_id=bought.user_id,
                kind=STAR_REFUND,
                credits=-bought.credits,
                stars=-bought.stars,
                charge_id=charge_id,
                order_id=bought.order_id,
                note=note,
            )
            return "reserved", bought, balance - bought.credits

        return await self.db.write(reserve)

    async def drop_star_refund(self, charge_id: str) -> None:
        """Telegram refused the refund: give the credits back (the reservation goes)."""
        await self.db.execute_write(
            "DELETE FROM credit_ledger WHERE kind = 'star_refund' AND charge_id = ?"
            " AND reconciled_at IS NULL",
            (charge_id,),
        )

    async def record_outside_refund(self, charge_id: str, note: str) -> tuple[Entry, int] | None:
        """A refund Telegram made without /refund (support, a dispute, another tool): record
        it once, taking back at most what is left (a balance never goes below zero). Returns
        (refund row, balance) when written now, None if known already or not our charge."""
        stamp = iso()

        def record(conn: Conn) -> tuple[Entry, int] | None:
            row = conn.execute(
                "SELECT * FROM credit_ledger WHERE kind = 'purchase' AND charge_id = ?",
                (charge_id,),
            ).fetchone()
            if row is None:
                return None
            bought = _entry(row)
            self.db.lock(conn, user_lock(bought.user_id))  # balances only go down under it
            taken = max(0, min(bought.credits, balance_in(conn, bought.user_id)))
            row_id = _insert(
                conn,
                user_id=bought.user_id,
                kind=STAR_REFUND,
                credits=-taken,
                stars=-bought.stars,
                charge_id=charge_id,
                order_id=bought.order_id,
                note=note
                if taken == bought.credits
                else f"{note}; {bought.credits - taken} credits were already spent",
                created_at=stamp,
                reconciled_at=stamp,
            )
            if row_id is None:
                return None
            entry = _entry(
                conn.execute("SELECT * FROM credit_ledger WHERE id = ?", (row_id,)).fetchone()
            )
            return entry, balance_in(conn, bought.user_id)

        return await self.db.write(record)

    async def mark_reconciled(self, kind: str, charge_ids: Sequence[str]) -> None:
        if not charge_ids:
            return
        marks = ", ".join("?" for _ in charge_ids)
        await self.db.execute_write(
            f"UPDATE credit_ledger SET reconciled_at = ? WHERE kind = ? AND charge_id IN ({marks})"  # noqa: S608 - placeholders only
            " AND reconciled_at IS NULL",
            (iso(), kind, *charge_ids),
        )

    # -- grants, balance, history ----------------------------------------------------------

    async def grant(self, user_id: int, credits: int, note: str) -> int:
        """An admin's grant; returns the new balance."""

        def grant(conn: Conn) -> int:
            _insert(conn, user_id=user_id, kind=GRANT, credits=credits, note=note)
            return balance_in(conn, user_id)

        return await self.db.write(grant)

    async def welcome(self, user_id: int, credits: int) -> bool:
        if credits <= 0:
            return False
        return await self.db.write(lambda conn: grant_welcome_in(conn, user_id, credits))

    async def balance(self, user_id: int) -> int:
        row = await self.db.fetchone(_BALANCE, (user_id,))
        return int(row[0]) if row else 0

    async def entries(self, user_id: int, kinds: Sequence[str], limit: int = 5) -> list[Entry]:
        """The user's newest rows of these kinds, newest first."""
        marks = ", ".join("?" for _ in kinds)
        rows = await self.db.fetchall(
            f"SELECT * FROM credit_ledger WHERE user_id = ? AND kind IN ({marks})"  # noqa: S608 - placeholders only
            " ORDER BY id DESC LIMIT ?",
            (user_id, *kinds, limit),
        )
        return [_entry(row) for row in rows]

    # -- jobs ------------------------------------------------------------------------------

    async def settle_job(self, job_id: int, due: int, note: str) -> tuple[int, int] | None:
        """Settle a job's reservation once: keep `due` credits, give the rest back.

        Returns (reserved, returned) when settled now; None if the job reserved nothing or
        was settled already.
        """

        def settle(conn: Conn) -> tuple[int, int] | None:
            row = conn.execute(
                "SELECT user_id, credits FROM credit_ledger WHERE kind = 'spend' AND job_id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                return None
            reserved = -int(row["credits"])
            returned = max(0, reserved - max(0, due))
            written = _insert(
                conn,
                user_id=row["user_id"],
                kind=JOB_REFUND,
                credits=returned,
                job_id=job_id,
                note=note,
            )
            return (reserved, returned) if written is not None else None

        return await self.db.write(settle)

    async def unsettled_final_jobs(self, limit: int = 500) -> list[int]:
        """Final jobs holding a reservation without a settlement (a crash between the final
        status and the settlement; the periodic pass settles them)."""
        rows = await self.db.fetchall(
            "SELECT s.job_id FROM credit_ledger s JOIN jobs j ON j.id = s.job_id"
            " WHERE s.kind = 'spend' AND j.status IN ('succeeded', 'failed', 'canceled')"
            " AND NOT EXISTS (SELECT 1 FROM credit_ledger r WHERE r.kind = 'job_refund'"
            " AND r.job_id = s.job_id) ORDER BY s.job_id LIMIT ?",
            (limit,),
        )
        return [int(row[0]) for row in rows]

    async def job_costs(self, job_ids: Sequence[int]) -> dict[int, int]:
        """Credits each job costs its user now: reserved minus given back (for /jobs)."""
        if not job_ids:
            return {}
        marks = ", ".join("?" for _ in job_ids)
        rows = await self.db.fetchall(
            "SELECT job_id, -sum(credits) AS cost FROM credit_ledger"  # noqa: S608 - placeholders only
            f" WHERE kind IN ('spend', 'job_refund') AND job_id IN ({marks}) GROUP BY job_id",
            list(job_ids),
        )
        return {int(row["job_id"]): int(row["cost"]) for row in rows}

    # -- reconciliation cursor -------------------------------------------------------------

    async def sync_offset(self) -> int:
        row = await self.db.fetchone("SELECT next_offset FROM star_sync WHERE id = 1")
        return int(row[0]) if row else 0

    async def set_sync_offset(self, offset: int) -> None:
        await self.db.execute_write(
            "UPDATE star_sync SET next_offset = ?, synced_at = ? WHERE id = 1", (offset, iso())
        )
