"""Result images, kept once fetched so a restart (or another process) can deliver them and
📎 Original can send the full file later without a new provider call.

Two stores behind one interface (`ResultStore`), picked by `storage.results_store`:
- `ResultFiles`: files in `storage.results_dir` on this host (the default with SQLite: one
  process, and the cheapest path: a write never waits for, nor holds up, the database writer);
- `ResultBlobs`: rows of the `result_blobs` table (the default with PostgreSQL: every process
  on every host reads what any of them fetched).

Either way a job row's `result_paths` holds the names `<job id>-<n>.<ext>`: a name maps to a
file, or to the row (job_id, n), so rows keep their meaning when the store changes (and
`imagebot migrate-store` copies the files into rows under the same names).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from PIL import Image

from imagebot.clock import iso, utcnow
from imagebot.errors import MediaExpired
from imagebot.media import ACCEPTED_FORMATS
from imagebot.models import ImageFile
from imagebot.store.db import Conn, Database
from imagebot.store.resultnames import parse_name


def result_names(job_id: int, images: Sequence[ImageFile]) -> list[str]:
    return [f"{job_id}-{n}.{img.extension}" for n, img in enumerate(images)]


def image_of(data: bytes, mime: str | None = None) -> ImageFile:
    """The ImageFile of stored bytes (the header gives its size; the mime is kept or read)."""
    with Image.open(io.BytesIO(data)) as img:
        found = ACCEPTED_FORMATS.get(img.format or "", "application/octet-stream")
        return ImageFile(data, mime or found, img.width, img.height)


class ResultStore(ABC):
    """Where fetched result images live until retention removes them."""

    kind: str  # "disk" or "database", for logs and /healthz readers

    @abstractmethod
    async def save(self, job_id: int, images: Sequence[ImageFile]) -> list[str]:
        """Keep a job's images durably (all of them, or none on an error); their names."""

    @abstractmethod
    async def load_one(self, name: str) -> ImageFile:
        """One kept image; MediaExpired when it is gone (pruned, or never kept here)."""

    async def load(self, names: Sequence[str]) -> list[ImageFile]:
        if not names:
            raise MediaExpired("no stored results")
        return [await self.load_one(name) for name in names]

    @abstractmethod
    async def remove(self, names: Sequence[str]) -> int:
        """Forget these images (a pruned job's, or older than retention); how many went."""

    @abstractmethod
    async def remove_older_than(self, days: float) -> int:
        """Forget every image kept longer than `days`, whether or not a row names it."""


class ResultFiles(ResultStore):
    """`<results_dir>/<job id>-<n>.<ext>` on this host's disk."""

    kind = "disk"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _write(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / name
        tmp = final.with_suffix(final.suffix + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(final)

    async def save(self, job_id: int, images: Sequence[ImageFile]) -> list[str]:
        names = result_names(job_id, images)
        for name, img in zip(names, images, strict=True):
            await asyncio.to_thread(self._write, name, img.data)
        return names

    def _read(self, name: str) -> ImageFile:
        path = self.directory / Path(name).name  # a row never points outside the directory
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MediaExpired(f"result file {path.name} is gone") from None
        return image_of(data)

    async def load_one(self, name: str) -> ImageFile:
        return await asyncio.to_thread(self._read, name)

    def _remove(self, names: Sequence[str]) -> int:
        removed = 0
        for name in names:
            try:
                (self.directory / Path(name).name).unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    async def remove(self, names: Sequence[str]) -> int:
        return await asyncio.to_thread(self._remove, names) if names else 0

    def _remove_older_than(self, days: float) -> int:
        """Files not written for `days`: also results of jobs that failed after their files
        were saved, and `.tmp` files of a write that a crash cut short."""
        cutoff = time.time() - days * 86400
        try:
            paths = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        removed = 0
        for path in paths:
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    async def remove_older_than(self, days: float) -> int:
        return await asyncio.to_thread(self._remove_older_than, days)


class ResultBlobs(ResultStore):
    """Rows of `result_blobs (job_id, n, mime, size_bytes, data, created_at)`.

    A job's images are written in one transaction (a second save of the same job, after a
    restart fetched again, replaces them). Files a disk store kept before the switch are
    still read from `legacy` (this host's results_dir) until retention removes them."""

    kind = "database"

    def __init__(self, db: Database, legacy: ResultFiles | None = None) -> None:
        self.db = db
        self.legacy = legacy

    async def save(self, job_id: int, images: Sequence[ImageFile]) -> list[str]:
        names = result_names(job_id, images)
        saved_at = iso()
        rows = [
            (job_id, n, img.mime, len(img.data), img.data, saved_at)
            for n, img in enumerate(images)
        ]

        def write(conn: Conn) -> None:
            conn.execute("DELETE FROM result_blobs WHERE job_id = ?", (job_id,))
            conn.executemany(
                "INSERT INTO result_blobs (job_id, n, mime, size_bytes, data, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

        await self.db.write_aside(write)
        return names

    async def load_one(self, name: str) -> ImageFile:
        key = parse_name(name)
        if key is None:
            raise MediaExpired(f"result {name!r} is not a result name")
        found = await self.db.fetchall_binary(
            "SELECT mime, data FROM result_blobs WHERE job_id = ? AND n = ?", key
        )
        row = found[0] if found else None
        if row is None:
            if self.legacy is not None:  # kept on this host's disk before the switch?
                return await self.legacy.load_one(name)
            raise MediaExpired(f"result {name} is gone")
        return image_of(bytes(row["data"]), str(row["mime"]))

    async def remove(self, names: Sequence[str]) -> int:
        keys = [key for key in map(parse_name, names) if key is not None]
        if not keys:
            return 0

        def delete(conn: Conn) -> int:
            removed = 0
            for key in keys:
                removed += conn.execute(
                    "DELETE FROM result_blobs WHERE job_id = ? AND n = ?", key
                ).rowcount
            return removed

        removed = await self.db.write_aside(delete)
        if self.legacy is not None:
            removed += await self.legacy.remove(names)
        return removed

    async def remove_older_than(self, days: float) -> int:
        cutoff = iso(utcnow() - timedelta(days=days))

        def delete(conn: Conn) -> int:
            sql = "DELETE FROM result_blobs WHERE created_at < ?"
            return conn.execute(sql, (cutoff,)).rowcount

        removed = await self.db.write_aside(delete)
        if self.legacy is not None:
            removed += await self.legacy.remove_older_than(days)
        return removed


def make_result_store(in_database: bool, db: Database, directory: Path) -> ResultStore:
    """The store `storage.results_store` asks for (see StorageSettings.results_in_database)."""
    if in_database:
        return ResultBlobs(db, legacy=ResultFiles(directory))
    return ResultFiles(directory)
