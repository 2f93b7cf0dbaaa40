"""Apply migrations/NNNN_name.sql in order, each with its record in one transaction."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from imagebot.clock import iso
from imagebot.errors import StoreError
from imagebot.logs import get_logger
from imagebot.store.db import Database

log = get_logger(__name__)
_NAME_RE = re.compile(r"[0-9]{4}_[a-z0-9_]+")


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


def _migrations_dir() -> Path:
    # In a wheel the files ship as imagebot/migrations; in a checkout they sit at the top level.
    packaged = resources.files("imagebot") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or _migrations_dir()
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
    migrations = migrations if migrations is not None else load_migrations()
    applied = await db.run(lambda conn: _apply(conn, migrations, str(db.path)))
    for name in applied:
        log.info("migration_applied", migration=name)
    return applied


def _apply(conn: sqlite3.Connection, migrations: list[Migration], where: str) -> list[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    unknown = sorted(done - {m.name for m in migrations})
    if unknown:
        raise StoreError(
            f"database {where} was migrated by a newer imagebot (it has {unknown[-1]}); "
            "upgrade imagebot or restore a backup"
        )
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        # executescript commits any open transaction first, so the script carries its own
        # BEGIN…COMMIT and the record of the migration commits with it.
        script = (
            "BEGIN;\n"
            f"{migration.sql}\n;\n"
            "INSERT INTO schema_migrations (name, applied_at) "
            f"VALUES ('{migration.name}', '{iso()}');\n"
            "COMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {migration.name} failed: {exc}") from exc
        applied.append(migration.name)
    return applied
