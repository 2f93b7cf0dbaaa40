"""ClusterStore: the processes sharing one database (`nodes`), their leases, and the work a
dead one leaves (issue 16). Every time here is the database's clock (`db.clock_sql`).

A node is live while its heartbeat is younger than the lease. What a dead node held is
handed on in one transaction each: its running jobs lose their owner (and their fence token
moves on, so the dead node's writes match nothing should it wake), its held queued jobs are
released, its leases lapse by themselves, and its unprocessed updates are adopted by a live
intake node which replays them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imagebot.clock import iso
from imagebot.store.db import URGENT, Conn, Database


@dataclass(frozen=True, slots=True)
class Peer:
    """A process on the database, as /healthz shows it."""

    id: str
    host: str
    pid: int
    roles: tuple[str, ...]
    ops_port: int | None
    started_at: str
    heartbeat_at: str


@dataclass(frozen=True, slots=True)
class Reaped:
    """What one reap handed on."""

    dead_nodes: tuple[str, ...]
    jobs_freed: tuple[int, ...]
    holds_released: int


class ClusterStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _live(self, lease_s: float) -> str:
        """SQL: the ids of live nodes."""
        return f"SELECT id FROM nodes WHERE heartbeat_at > {self.db.clock_sql(-lease_s)}"  # noqa: S608 - our own expression

    async def register(
        self, node_id: str, *, host: str, pid: int, roles: Sequence[str], ops_port: int | None
    ) -> None:
        now = self.db.clock_sql()
        await self.db.execute_write(
            "INSERT INTO nodes (id, host, pid, roles, ops_port, started_at, heartbeat_at)"  # noqa: S608 - our own expression
            f" VALUES (?, ?, ?, ?, ?, {now}, {now}) ON CONFLICT (id) DO UPDATE"
            " SET heartbeat_at = excluded.heartbeat_at, ops_port = excluded.ops_port",
            (node_id, host, pid, ",".join(roles), ops_port),
        )

    async def forget_others(self, node_id: str) -> None:
        """Declare every other node dead and its leases void (a database only this process can
        open, SQLite: any other row is a run of this bot that ended, maybe by a crash)."""

        def forget(conn: Conn) -> None:
            conn.execute(
                f"UPDATE leases SET expires_at = {self.db.clock_sql(-1)} WHERE holder != ?",  # noqa: S608 - our own expression
                (node_id,),
            )
            conn.execute("DELETE FROM nodes WHERE id != ?", (node_id,))

        await self.db.write(forget)

    async def heartbeat(self, node_id: str, lease_s: float) -> bool:
        """Renew this node's heartbeat; False when it was silent past the lease (the others
        may have taken its work over already: it must drop what it runs and start afresh).

        URGENT, as lease renewals: a backlog of job writes (hundreds of jobs running) must not
        hold it up towards the trust window, or a busy node would stop trusting itself."""
        changed = await self.db.execute_write(
            f"UPDATE nodes SET heartbeat_at = {self.db.clock_sql()}"  # noqa: S608 - our own expression
            f" WHERE id = ? AND heartbeat_at > {self.db.clock_sql(-lease_s)}",
            (node_id,),
            priority=URGENT,
        )
        return changed == 1

    async def remove(self, node_id: str) -> None:
        """A clean stop: the node's leases expire and its row goes (no wait for the lease)."""

        def remove(conn: Conn) -> None:
            conn.execute(
                f"UPDATE leases SET expires_at = {self.db.clock_sql(-1)} WHERE holder = ?",  # noqa: S608 - our own expression
                (node_id,),
            )
            conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

        await self.db.write(remove)

    async def peers(self, lease_s: float) -> list[Peer]:
        rows = await self.db.fetchall(
            "SELECT id, host, pid, roles, ops_port, started_at, heartbeat_at FROM nodes"  # noqa: S608 - our own expression
            f" WHERE heartbeat_at > {self.db.clock_sql(-lease_s)} ORDER BY started_at, id"
        )
        return [
            Peer(
                id=row["id"],
                host=row["host"],
                pid=int(row["pid"]),
                roles=tuple(r for r in str(row["roles"]).split(",") if r),
                ops_port=int(row["ops_port"]) if row["ops_port"] is not None else None,
                started_at=row["started_at"],
                heartbeat_at=row["heartbeat_at"],
            )
            for row in rows
        ]

    async def acquire(self, name: str, node_id: str, lease_s: float) -> int | None:
        """Take or renew lease `name` for `lease_s` seconds: its term while this node holds
        it, None while another live node does (SCALE_OUT §5.3)."""
        until = self.db.clock_sql(lease_s)
        now = self.db.clock_sql()

        def acquire(conn: Conn) -> int | None:
            conn.execute(
                "INSERT INTO leases (name, holder, term, expires_at)"  # noqa: S608 - our own expression
                f" VALUES (?, ?, 1, {until}) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, expires_at = excluded.expires_at,"
                " term = leases.term + CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END"
                f" WHERE leases.holder = excluded.holder OR leases.expires_at < {now}",
                (name, node_id),
            )
            row = conn.execute(
                "SELECT holder, term FROM leases WHERE name = ?", (name,)
            ).fetchone()
            if row is None or row["holder"] != node_id:
                return None
            return int(row["term"])

        return await self.db.write(acquire, priority=URGENT)

    async def resign(self, name: str, node_id: str) -> None:
        """Give lease `name` up now (it expires; the row stays, so terms keep counting up)."""
        await self.db.execute_write(
            f"UPDATE leases SET expires_at = {self.db.clock_sql(-1)}"  # noqa: S608 - our own expression
            " WHERE name = ? AND holder = ?",
            (name, node_id),
            priority=URGENT,
        )

    async def holders(self) -> dict[str, str]:
        """Lease name → holding node, for leases not yet expired."""
        rows = await self.db.fetchall(
            f"SELECT name, holder FROM leases WHERE expires_at > {self.db.clock_sql()}"  # noqa: S608 - our own expression
        )
        return {row["name"]: row["holder"] for row in rows}

    async def reap(self, lease_s: float) -> Reaped:
        """Hand on what dead nodes held: running jobs lose their owner (token +1, rescues +1;
        a live worker adopts them), held queued jobs are released, dead rows are deleted."""
        live = self._live(lease_s)
        stamp = iso()

        def reap(conn: Conn) -> Reaped:
            # One reaper at a time: two would count a rescue twice.
            self.db.lock(conn, "cluster:reap")
            dead = [
                row["id"]
                for row in conn.execute(
                    f"SELECT id FROM nodes WHERE id NOT IN ({live}) ORDER BY id"  # noqa: S608 - our own expression
                )
            ]
            orphans = [
                int(row["id"])
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE status = 'running' AND owner IS NOT NULL"  # noqa: S608 - our own expression
                    f" AND owner NOT IN ({live}) ORDER BY id"
                )
            ]
            if orphans:
                marks = ", ".join("?" for _ in orphans)
                conn.execute(
                    "UPDATE jobs SET owner = NULL, lease_token = lease_token + 1,"  # noqa: S608 - placeholders only
                    f" rescues = rescues + 1, updated_at = ? WHERE id IN ({marks})",
                    (stamp, *orphans),
                )
            holds = conn.execute(
                "UPDATE jobs SET held_until = NULL, owner = NULL WHERE status = 'queued'"  # noqa: S608 - our own expression
                f" AND held_until IS NOT NULL AND owner IS NOT NULL AND owner NOT IN ({live})"
            ).rowcount
            if dead:
                marks = ", ".join("?" for _ in dead)
                conn.execute(f"DELETE FROM nodes WHERE id IN ({marks})", dead)  # noqa: S608
            return Reaped(tuple(dead), tuple(orphans), holds)

        return await self.db.write(reap)

    async def adopt_updates(self, node_id: str, lease_s: float) -> list[int]:
        """Take over the unprocessed updates no live node is handling (their node died, or
        they predate schema 11): this node replays them. Ids in update order."""
        live = self._live(lease_s)

        def adopt(conn: Conn) -> list[int]:
            ids = [
                int(row["update_id"])
                for row in conn.execute(
                    "SELECT update_id FROM inbox WHERE processed_at IS NULL"  # noqa: S608 - our own expression
                    f" AND (received_by IS NULL OR received_by NOT IN ({live}))"
                    " ORDER BY update_id" + self.db.for_update
                )
            ]
            if ids:
                marks = ", ".join("?" for _ in ids)
                conn.execute(
                    f"UPDATE inbox SET received_by = ? WHERE update_id IN ({marks})",  # noqa: S608
                    (node_id, *ids),
                )
            return ids

        return await self.db.write(adopt)
