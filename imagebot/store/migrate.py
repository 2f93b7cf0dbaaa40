"""Apply migrations/<dialect>/NNNN_name.sql in order, each with its record in one transaction.

Each database has its own directory (migrations/sqlite, migrations/postgresql), numbered in
lockstep: migration NNNN makes the same change on both. Start-up migrates under a lock, so two
processes starting together apply each migration once (SQLite: BEGIN IMMEDIATE around the
check and the migration; PostgreSQL: pg_advisory_xact_lock). A database that has a migration
this code does not know (a newer imagebot made it) is refused.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from imagebot.clock import iso
from imagebot.errors import StoreError
from imagebot.logs import get_logger
from imagebot.store.db import Database

log = get_logger(__name__)
_NAME_RE = re.compile(r"[0-9]{4}_[a-z0-9_]+")
DIALECTS = ("sqlite", "postgresql")
# Any constant: the key of the advisory lock every imagebot process migrates under.
_PG_MIGRATION_LOCK = 7_151_515_001


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


def migrations_root() -> Path:
    # In a wheel the files ship as imagebot/migrations; in a checkout they sit at the top level.
    packaged = resources.files("imagebot") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "migrations"


def _migrations_dir(dialect: str = "sqlite") -> Path:
    return migrations_root() / dialect


def load_migrations(directory: Path | None = None, *, dialect: str = "sqlite") -> list[Migration]:
    directory = directory or _migrations_dir(dialect)
    files = sorted(p for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql") if p.is_file())
    if not files:
        raise StoreError(f"no migrations found in {directory}")
    for path in files:
        if not _NAME_RE.fullmatch(path.stem):
            raise StoreError(f"migration file name {path.name} must look like 0002_short_name.sql")
    return [Migration(p.stem, p.read_text(encoding="utf-8")) for p in files]


async def migrate(db: Database, migrations: list[Migration] | None = None) -> list[str]:
    """Bring the schema up to date; return the names applied now.

    Refuses a database that has a migration this code does not know (it is newer than us).
    """
    migrations = migrations if migrations is not None else load_migrations(dialect=db.dialect)
    if db.dialect == "postgresql":
        applied = await db.run(lambda conn: _apply_pg(conn.raw, migrations, db.where))
        db.forget_schema()
    else:
        applied = await db.run(lambda conn: _apply_sqlite(conn, migrations, db.where))
    for name in applied:
        log.info("migration_applied", migration=name)
    return applied


def _refuse_newer(done: set[str], migrations: list[Migration], where: str) -> None:
    unknown = sorted(done - {m.name for m in migrations})
    if unknown:
        raise StoreError(
            f"database {where} was migrated by a newer imagebot (it has {unknown[-1]}); "
            "upgrade imagebot or restore a backup"
        )


def split_statements(script: str) -> list[str]:
    """A SQLite script cut into whole statements (triggers' BEGIN … END kept together)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip().strip(";").strip():
                statements.append(current.strip())
            current = ""
    rest = current.strip()
    if rest and not all(
        part.strip().startswith("--") or not part.strip() for part in rest.splitlines()
    ):
        statements.append(rest)
    return statements


def _apply_sqlite(conn: sqlite3.Connection, migrations: list[Migration], where: str) -> list[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    applied: list[str] = []
    for migration in migrations:
        # The write lock is taken before the check: a second process starting now waits
        # here (busy_timeout), then sees the migration done.
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            _refuse_newer(done, migrations, where)
            if migration.name not in done:
                for statement in split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, iso()),
                )
                applied.append(migration.name)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {migration.name} failed: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if not migrations:
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        _refuse_newer(done, migrations, where)
    return applied


def _apply_pg(conn: Any, migrations: list[Migration], where: str) -> list[str]:
    import psycopg

    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for migration in migrations:
        try:
            with conn.transaction():
                # Held to the end of this transaction: a second process waits, then sees it.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
                done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
                _refuse_newer(done, migrations, where)
                if migration.name in done:
                    continue
                conn.execute(migration.sql.encode())  # a script: no parameters
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (migration.name,))
                applied.append(migration.name)
        except psycopg.Error as exc:
            raise StoreError(f"migration {migration.name} failed: {exc}") from exc
    return applied
