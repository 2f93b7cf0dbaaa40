"""Migrations: applied in order once, recorded, all-or-nothing, newer databases refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from imagebot.errors import StoreError
from imagebot.store.db import Database
from imagebot.store.migrate import Migration, load_migrations, migrate


async def open_db(path: Path) -> Database:
    db = Database(path)
    await db.open()
    return db


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


async def test_empty_database_gets_the_schema(tmp_path: Path) -> None:
    """A new database gets every table and a record of each migration; WAL is on."""
    db = await open_db(tmp_path / "new.db")
    try:
        applied = await migrate(db)
    finally:
        await db.close()
    assert applied == [m.name for m in load_migrations()]
    assert {"inbox", "jobs", "notices", "schema_migrations"} <= tables(tmp_path / "new.db")
    conn = sqlite3.connect(tmp_path / "new.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


async def test_existing_database_is_left_alone(tmp_path: Path) -> None:
    """Migrating twice applies nothing the second time and keeps the data."""
    path = tmp_path / "old.db"
    db = await open_db(path)
    await migrate(db)
    await db.execute_write(
        "INSERT INTO notices (user_id, reason, sent_at) VALUES (1, 'x', '2026-01-01T00:00:00Z')"
    )
    await db.close()
    db = await open_db(path)
    try:
        assert await migrate(db) == []
        row = await db.fetchone("SELECT count(*) AS n FROM notices")
    finally:
        await db.close()
    assert row is not None and row["n"] == 1


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    """A database that knows a migration this code does not is refused with a clear error."""
    path = tmp_path / "future.db"
    db = await open_db(path)
    await migrate(db)
    await db.execute_write(
        "INSERT INTO schema_migrations (name, applied_at) VALUES ('9999_from_the_future', 'x')"
    )
    try:
        with pytest.raises(StoreError, match="newer imagebot"):
            await migrate(db)
    finally:
        await db.close()


async def test_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    """A migration that fails halfway is rolled back whole and not recorded."""
    path = tmp_path / "broken.db"
    good = Migration("0001_good", "CREATE TABLE a (x INTEGER);")
    bad = Migration("0002_bad", "CREATE TABLE b (x INTEGER);\nINSERT INTO nowhere VALUES (1);")
    db = await open_db(path)
    try:
        with pytest.raises(StoreError, match="0002_bad failed"):
            await migrate(db, [good, bad])
        row = await db.fetchone("SELECT group_concat(name) AS names FROM schema_migrations")
    finally:
        await db.close()
    assert row is not None and row["names"] == "0001_good"
    assert "a" in tables(path)
    assert "b" not in tables(path)


def test_migrations_ship_in_the_wheel() -> None:
    """pyproject maps migrations/ into the package, so an installed bot finds them."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"migrations" = "imagebot/migrations"' in pyproject
    assert all(m.name[:4].isdigit() for m in load_migrations())
