"""Read and write the bot's database from a test, whichever store runs (a path or a URL).

The SQL is the store's own subset (`?` placeholders); PostgreSQL rows come back as the store
returns them (timestamps as ISO text, jsonb as JSON text), so assertions read the same.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def is_pg(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def query(target: str | Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Every row of `sql` (sqlite3.Row on SQLite, its twin on PostgreSQL)."""
    if is_pg(target):
        from imagebot.store.postgresql import connect, translate

        with connect(str(target)) as conn:
            return conn.execute(translate(sql), params).fetchall()
    conn = sqlite3.connect(str(target), timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def execute(target: str | Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    """One statement in its own transaction; the rows it changed."""
    if is_pg(target):
        from imagebot.store.postgresql import connect, translate

        with connect(str(target)) as conn:
            return conn.execute(translate(sql), params).rowcount
    conn = sqlite3.connect(str(target), timeout=30, isolation_level=None)
    try:
        return conn.execute(sql, params).rowcount
    finally:
        conn.close()


def tables(target: str | Path) -> list[str]:
    """The store's own tables, by name (schema_migrations included)."""
    if is_pg(target):
        sql = (
            "SELECT table_name AS name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " ORDER BY table_name"
        )
    else:
        sql = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    return [str(row["name"]) for row in query(target, sql)]


def dump(target: str | Path) -> str:
    """Every row of every table as text (what a backup of the database would hold)."""
    lines = []
    for name in tables(target):
        for row in query(target, f'SELECT * FROM "{name}"'):  # noqa: S608 - names from the catalog
            lines.append(f"{name}: {tuple(row)!r}")
    return "\n".join(lines)


def backdate(target: str | Path, table: str, column: str, seconds: float, where: str = "") -> int:
    """Move `column` (a timestamp) of `table`'s rows (all, or those `where` picks) `seconds`
    into the past, as if that much time had gone by; the rows changed."""
    if is_pg(target):
        change = f"{column} - make_interval(secs => ?)"
    else:
        change = f"strftime('%Y-%m-%dT%H:%M:%fZ', {column}, '-' || ? || ' seconds')"
    sql = f"UPDATE {table} SET {column} = {change}"  # noqa: S608 - test helper, literal names
    if where:
        sql += f" WHERE {where}"
    return execute(target, sql, (seconds,))
