"""Send slots: Telegram's outgoing limits kept in the database, so every process shares them.

GCRA (the "generic cell rate algorithm"): each limited key has a row whose `tat`
("theoretical arrival time") is the earliest moment its next send may go. Reserving a slot
moves tat to `greatest(tat, now) + step` and hands back the old value: the caller sleeps until
then and sends. Every time is the database's clock at that very moment (`db.clock_sql()`,
clock_timestamp() on PostgreSQL), never a process's: processes on several hosts agree.

A send to a chat takes two keys, the chat's (or group's) `gate` first and then `global`
(SCALE_OUT §5.4), in one transaction: the gate's row is locked and read; while its tat is
still ahead, nothing is reserved and the caller is told when to ask again (it sleeps, then
asks again); otherwise the global slot is reserved and the gate's tat is set to that global
slot plus the gate's step. So the gate's spacing counts from the moment the send really goes
(a gate slot taken before a wait for the global one would let two sends to one chat come
closer than the spacing when the global queue is long), and no global slot is held by a send
that still waits for its chat. A 429 from Telegram pushes `global` forward, so every process
pauses. On PostgreSQL those steps are one call of the function `imagebot_send_slot`
(migration 0015) in autocommit: one round trip, and the 'global' row is locked only while the
server runs it (as a client transaction it stayed locked across three round trips, and three
busy processes queued on it). Pauses are single autocommit statements.

Group calls (PostgreSQL): every limited send asks twice (a reservation before, a hold after),
hundreds of times a second under load, on two writer connections per process. The asks that
arrive while one waits for a writer join it (imagebot.store.groupcall, as the inbox's saves
do), and the writer sends the lot as one call of the function `imagebot_send_slots`
(migration 0016) in autocommit: it takes the advisory lock SLOTS_LOCK first (as the prune
does), so that no two groups lock the same rows in different orders, applies the holds (they
happened first), then makes every reservation in arrival order with `imagebot_send_slot`, each
seeing the ones before it. One round trip and one thread hop for the lot, and the lock is held
only while the server runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from imagebot.clock import iso, parse_iso
from imagebot.store.db import PACING, Conn, Database
from imagebot.store.groupcall import GroupCall, Member

GLOBAL = "global"
# Taken first by every transaction that locks several keys' rows (a group's holds and
# reservations, the prune). A group's reservations lock each ask's gate row and then the
# 'global' row, one ask after another in one statement, and another process's group the same
# rows in its own order: CI saw PostgreSQL break such a deadlock (one group failed, its process
# paced in memory for 5 s, and its sends drew 429s). One lock first makes their order one.
# (The group's function, migration 0016, takes it by this very name: hashtext('send_slots').)
SLOTS_LOCK = "send_slots"
PRUNE_AFTER_S = 60.0  # a row this far in the past is a free key: deleting it changes nothing


@dataclass(frozen=True)
class Slot:
    """The answer to one reservation.

    `reserved`: a slot is ours, send in `wait_s` seconds. Otherwise the gate key is busy:
    nothing was reserved; ask again in `wait_s` seconds."""

    reserved: bool
    wait_s: float


def _seconds(later: str, earlier: str) -> float:
    return (parse_iso(later) - parse_iso(earlier)).total_seconds()


# One statement for a group's holds and reservations (PostgreSQL): the function of migration
# 0016, which takes SLOTS_LOCK, applies the holds, then reserves in the asks' order.
_GROUP_SQL = (
    "SELECT reserved, wait_s"
    " FROM imagebot_send_slots(?::text[], ?::float8[], ?::text[], ?::float8[], ?::float8[])"
)


@dataclass(frozen=True, slots=True)
class _Ask:
    """One reservation (`global_step` set) or hold (None) waiting in a group call."""

    key: str | None
    step: float
    global_step: float | None


class SendSlots:
    """The send_slots table, for the shared limiter (imagebot.ratelimit.SharedRateLimiter)."""

    #: the writer lane (see PostgresDatabase): its own, beside job writes and webhook saves
    priority = PACING

    def __init__(self, db: Database) -> None:
        self.db = db
        self._asks: GroupCall[_Ask, Slot | None] = GroupCall(db, self._run_group, PACING)
        #: asks and writer calls so far: how well asks are grouped (tests read them)
        self.asks = 0
        self.calls = 0

    def _run_group(self, conn: Conn, asks: list[Member[_Ask, Slot | None]]) -> None:
        """On the writer: one group's asks, holds first; each is settled (an error is raised
        for the group call to settle them all with, and for the store's write health)."""
        holds = [a for a in asks if a.arg.global_step is None]
        reservations = [a for a in asks if a.arg.global_step is not None]
        self.asks += len(asks)
        self.calls += 1
        rows = conn.execute(
            _GROUP_SQL,
            (
                [a.arg.key for a in holds],
                [a.arg.step for a in holds],
                [a.arg.key for a in reservations],
                [a.arg.step for a in reservations],
                [a.arg.global_step for a in reservations],
            ),
        ).fetchall()
        for ask in holds:
            ask.settle(None)
        for ask, row in zip(reservations, rows, strict=True):
            ask.settle(Slot(reserved=bool(row["reserved"]), wait_s=max(0.0, row["wait_s"])))

    def _take_sql(self, step_s: float) -> str:
        """The GCRA reservation of SCALE_OUT §5.4: one statement per key."""
        db = self.db
        now = db.clock_sql()
        first = db.clock_sql(step_s)
        later = db.plus_seconds_sql(
            f"CASE WHEN send_slots.tat > {now} THEN send_slots.tat ELSE {now} END", step_s
        )
        # S608: only the dialect's clock expressions and numbers from our own settings
        return (
            f"INSERT INTO send_slots (key, tat) VALUES (?, {first})"  # noqa: S608
            f" ON CONFLICT (key) DO UPDATE SET tat = {later} RETURNING tat, {now} AS now"
        )

    def _gate_sql(self) -> str:
        """Lock the gate key's row (made free when new) and read its tat and the clock."""
        now = self.db.clock_sql()
        return (
            f"INSERT INTO send_slots (key, tat) VALUES (?, {now})"  # noqa: S608 - the clock
            f" ON CONFLICT (key) DO UPDATE SET tat = send_slots.tat RETURNING tat, {now} AS now"
        )

    async def reserve(self, global_step_s: float, gate: tuple[str, float] | None = None) -> Slot:
        """Reserve the next global slot (behind the gate key `(key, step_s)` if given)."""
        if self.db.dialect == "postgresql":
            # The same steps as below, in the function of migration 0015, in a group call: in
            # autocommit, so the 'global' row is locked only while the server runs it.
            ask = _Ask(gate[0] if gate else None, gate[1] if gate else 0.0, global_step_s)
            slot = await self._asks.call(ask)
            assert slot is not None
            return slot
        take_sql = self._take_sql(global_step_s)
        gate_sql = self._gate_sql() if gate is not None else ""

        def run(conn: Conn) -> Slot:
            if gate is not None:
                row = conn.execute(gate_sql, (gate[0],)).fetchone()
                busy_s = _seconds(row["tat"], row["now"])
                if busy_s > 0:
                    return Slot(reserved=False, wait_s=busy_s)
            row = conn.execute(take_sql, (GLOBAL,)).fetchone()
            send_at = parse_iso(row["tat"]) - timedelta(seconds=global_step_s)
            if gate is not None:
                conn.execute(
                    "UPDATE send_slots SET tat = ? WHERE key = ?",
                    (iso(send_at + timedelta(seconds=gate[1])), gate[0]),
                )
            wait_s = (send_at - parse_iso(row["now"])).total_seconds()
            return Slot(reserved=True, wait_s=max(0.0, wait_s))

        return await self.db.write(run, priority=self.priority)

    async def hold(self, key: str, seconds: float) -> None:
        """Keep `key` busy for `seconds` from now (a send that goes later than its slot)."""
        if self.db.dialect == "postgresql":
            await self._asks.call(_Ask(key, seconds, None))
            return
        until = self.db.clock_sql(seconds)
        sql = (
            f"UPDATE send_slots SET tat = CASE WHEN tat > {until}"  # noqa: S608 - the clock
            f" THEN tat ELSE {until} END WHERE key = ?"
        )
        await self.db.execute_write(sql, (key,), priority=self.priority)

    async def pause(self, seconds: float) -> None:
        """Telegram said "retry after `seconds`": no process sends before then."""
        db = self.db
        until = db.clock_sql(seconds)
        sql = (
            f"INSERT INTO send_slots (key, tat) VALUES (?, {until})"  # noqa: S608 - the clock
            f" ON CONFLICT (key) DO UPDATE SET tat = CASE WHEN send_slots.tat > {until}"
            f" THEN send_slots.tat ELSE {until} END"
        )
        await db.execute_write(sql, (GLOBAL,), priority=self.priority)

    async def prune(self) -> int:
        """Delete rows of keys that have been free for a while; returns how many."""
        db = self.db
        before = db.clock_sql(-PRUNE_AFTER_S)
        sql = f"DELETE FROM send_slots WHERE tat < {before}"  # noqa: S608 - the clock

        def prune(conn: Conn) -> int:
            db.lock(conn, SLOTS_LOCK)  # it locks many keys' rows too (see SLOTS_LOCK)
            return int(conn.execute(sql).rowcount)

        return await db.write(prune, priority=self.priority)
