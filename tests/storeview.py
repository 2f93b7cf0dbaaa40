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
