"""`imagebot migrate-store`: copy a SQLite store into an empty PostgreSQL database.

Run with the bot stopped. Both databases are brought to this code's schema first (as a start
would). The copy holds SQLite's write lock (a bot started by mistake waits instead of writing
rows that would be missed) and is one PostgreSQL transaction: every table, in foreign-key
order, with its ids; identity sequences continue after the highest id SQLite ever gave (ids
are never reused: buttons name them); the row counts of both sides are compared before the
commit. A target that already holds data is refused.

Result images the SQLite bot kept as files (`results/` next to the database, or
`--results-dir`) become rows of `result_blobs` in the same transaction, under the names the
job rows already hold, so 📎 Original keeps working from any process on PostgreSQL; the
verified count of result_blobs is SQLite's rows plus the files copied.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from imagebot.clock import iso
from imagebot.errors import StoreError
from imagebot.store.migrate import load_migrations, migrate
from imagebot.store.postgresql import PostgresDatabase, connect
from imagebot.store.resultnames import parse_name
from imagebot.store.sqlite import ProcessLock, SqliteDatabase, StoreInUse

_SEED_RE = re.compile(r"INSERT\s+INTO\s+(\w+)", re.IGNORECASE)


@dataclass
class CopyReport:
    source: str
    target: str
    applied_source: list[str] = field(default_factory=list)
    applied_target: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    results_dir: str = ""
    result_files: int = 0  # result files copied into result_blobs
    result_files_missing: int = 0  # named by a job row but not in results_dir (pruned)

    def lines(self) -> list[str]:
        out = []
        if self.applied_source:
            out.append(f"brought {self.source} up to date: {', '.join(self.applied_source)}")
        if self.applied_target:
            out.append(
                f"created the schema in {self.target}: {len(self.applied_target)} migrations"
            )
        total = sum(self.rows.values())
        out.append(f"copied {total} rows from {self.source} to {self.target}:")
        out.extend(f"  {table:<24} {n:>9}" for table, n in self.rows.items())
        if self.results_dir:
            line = (
                f"copied {self.result_files} result files from {self.results_dir}"
                " into result_blobs"
            )
            if self.result_files_missing:
                line += f" ({self.result_files_missing} named by jobs were already gone)"
            out.append(line)
        out.append("row counts verified on both sides; point storage.database at the new URL")
        return out


def _seeded_tables() -> set[str]:
    """Tables whose rows a migration inserts (a fresh database has them, so they are replaced)."""
    return {
        match.group(1).lower()
        for migration in load_migrations(dialect="postgresql")
        for match in _SEED_RE.finditer(migration.sql)
        if match.group(1).lower() != "schema_migrations"
    }


def _table_order(src: sqlite3.Connection, tables: list[str]) -> list[str]:
    """Tables ordered so that every table comes after the tables it references."""
    refs = {
        table: {
            str(row[2])
            for row in src.execute(f'PRAGMA foreign_key_list("{table}")')
            if str(row[2]) != table and str(row[2]) in tables
        }
        for table in tables
    }
    ordered: list[str] = []
    while refs:
        ready = sorted(t for t, deps in refs.items() if deps <= set(ordered))
        if not ready:  # a cycle: keep the rest in name order (no such schema today)
            ready = sorted(refs)
        for table in ready:
            ordered.append(table)
            del refs[table]
    return ordered


async def _migrate_both(source: Path, target: str, report: CopyReport) -> None:
    src_db = SqliteDatabase(source)
    await src_db.open()
    try:
        report.applied_source = await migrate(src_db)
    finally:
        await src_db.close()
    dst_db = PostgresDatabase(target)
    await dst_db.open()
    try:
        report.applied_target = await migrate(dst_db)
    finally:
        await dst_db.close()


def copy_store(source: Path, target: str, results_dir: Path | None = None) -> CopyReport:
    """Copy every table of the SQLite file `source` into the PostgreSQL database `target`,
    and the result files in `results_dir` (default: `results` beside `source`) into
    result_blobs."""
    if not source.is_file():
        raise StoreError(f"--from {source}: no such SQLite database file")
    if results_dir is not None and not results_dir.is_dir():
        raise StoreError(f"--results-dir {results_dir}: no such directory")
    # Held for the whole copy: a running bot refuses it (it could write after a table was
    # copied), and no bot can start on the file until the copy is done.
    bot_lock = ProcessLock(source)
    try:
        bot_lock.acquire()
    except StoreInUse as exc:
        raise StoreError(f"--from {exc}: stop the bot first, then copy") from exc
    try:
        check = PostgresDatabase(target)
        report = CopyReport(str(source), check.where)
        files = results_dir if results_dir is not None else source.parent / "results"
        if files.is_dir():
            report.results_dir = str(files)
        asyncio.run(_migrate_both(source, target, report))
        src = sqlite3.connect(source, isolation_level=None, timeout=30)
        try:
            src.execute("BEGIN IMMEDIATE")  # hold writers off: nothing slips past the copy
            with connect(target) as dst:
                _copy(src, dst, report, files if report.results_dir else None)
            src.execute("ROLLBACK")
        finally:
            src.close()
    finally:
        bot_lock.release()
    return report


def _copy(
    src: sqlite3.Connection, dst: Any, report: CopyReport, results_dir: Path | None = None
) -> None:
    tables = [
        str(row[0])
        for row in src.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations' ORDER BY name"
        )
    ]
    target_columns: dict[str, set[str]] = {}
    for row in dst.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
    ):
        target_columns.setdefault(str(row[0]), set()).add(str(row[1]))
    missing = [t for t in tables if t not in target_columns]
    if missing:
        raise StoreError(f"the target has no table {missing[0]} (is it another application's?)")
    seeded = _seeded_tables()
    busy = {
        table: int(dst.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608
        for table in tables
        if table not in seeded
    }
    busy = {t: n for t, n in busy.items() if n}
    if busy:
        table, n = next(iter(busy.items()))
        raise StoreError(
            f"the target database is not empty ({table} has {n} rows): "
            "migrate-store only copies into a new, empty database"
        )
    sequences = {
        str(r[0]): int(r[1]) for r in src.execute("SELECT name, seq FROM sqlite_sequence")
    }
    with dst.transaction():
        for table in _table_order(src, tables):
            columns = [str(r[1]) for r in src.execute(f'PRAGMA table_info("{table}")')]
            unknown = [c for c in columns if c not in target_columns[table]]
            if unknown:
                raise StoreError(f"the target's {table} has no column {unknown[0]}")
            if table in seeded:
                dst.execute(f'DELETE FROM "{table}"')  # noqa: S608 - names from the schema
            names = ", ".join(f'"{c}"' for c in columns)
            order = " ORDER BY id" if "id" in columns else ""
            count = 0
            with dst.cursor().copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
                for row in src.execute(f'SELECT {names} FROM "{table}"{order}'):  # noqa: S608
                    copy.write_row(row)
                    count += 1
            report.rows[table] = count
            if "id" in columns:
                top = max(
                    sequences.get(table, 0),
                    int(src.execute(f'SELECT coalesce(max(id), 0) FROM "{table}"').fetchone()[0]),  # noqa: S608
                )
                sequence = dst.execute(
                    "SELECT pg_get_serial_sequence(%s, 'id')", (table,)
                ).fetchone()[0]
                if sequence and top > 0:
                    dst.execute("SELECT setval(%s, %s)", (sequence, top))
        if results_dir is not None and "result_blobs" in tables:
            _copy_result_files(src, dst, results_dir, report)
        for table in tables:
            expected = int(src.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608
            if table == "result_blobs":
                expected += report.result_files
            got = int(dst.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608
            if expected != got:
                raise StoreError(
                    f"row counts differ for {table}: {expected} in SQLite, {got} copied; "
                    "nothing was committed"
                )


def _copy_result_files(
    src: sqlite3.Connection, dst: Any, results_dir: Path, report: CopyReport
) -> None:
    """Every result file a job row names, into result_blobs (unless SQLite held it as a row
    already), with the file's time as created_at: retention still counts from the fetch."""
    held = {(int(r[0]), int(r[1])) for r in src.execute("SELECT job_id, n FROM result_blobs")}
    rows = src.execute("SELECT id, result_paths FROM jobs WHERE result_paths != '[]' ORDER BY id")
    for job_id, paths in rows.fetchall():
        for name in json.loads(paths or "[]"):
            key = parse_name(str(name))
            if key is None or key[0] != int(job_id) or key in held:
                continue
            path = results_dir / Path(str(name)).name
            try:
                data = path.read_bytes()
                written = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
            except FileNotFoundError:
                report.result_files_missing += 1
                continue
            except OSError as exc:
                raise StoreError(f"cannot read result file {path}: {exc.strerror or exc}") from exc
            try:
                with Image.open(io.BytesIO(data)) as img:  # the header: what format it is
                    mime = Image.MIME.get(img.format or "", "application/octet-stream")
            except (OSError, ValueError, Image.DecompressionBombError):  # not an image any more
                report.result_files_missing += 1
                continue
            dst.execute(
                "INSERT INTO result_blobs (job_id, n, mime, size_bytes, data, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (key[0], key[1], mime, len(data), data, iso(written)),
            )
            held.add(key)
            report.result_files += 1
