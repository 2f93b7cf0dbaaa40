"""Result images on disk: written once fetched, so a restart can deliver them and 📎 Original
can send the full file later without a new provider call."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from imagebot.errors import MediaExpired
from imagebot.media import ACCEPTED_FORMATS
from imagebot.models import ImageFile


class ResultFiles:
    """`<results_dir>/<job id>-<n>.<ext>`; rows store the file names."""

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
        names = [f"{job_id}-{n}.{img.extension}" for n, img in enumerate(images)]
        for name, img in zip(names, images, strict=True):
            await asyncio.to_thread(self._write, name, img.data)
        return names

    def _read(self, name: str) -> ImageFile:
        path = self.directory / Path(name).name  # a row never points outside the directory
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MediaExpired(f"result file {path.name} is gone") from None
        with Image.open(io.BytesIO(data)) as img:
            mime = ACCEPTED_FORMATS.get(img.format or "", "application/octet-stream")
            return ImageFile(data, mime, img.width, img.height)

    async def load(self, names: Sequence[str]) -> list[ImageFile]:
        if not names:
            raise MediaExpired("no stored results")
        return [await asyncio.to_thread(self._read, name) for name in names]

    async def load_one(self, name: str) -> ImageFile:
        return await asyncio.to_thread(self._read, name)

    def remove(self, names: Sequence[str]) -> int:
        removed = 0
        for name in names:
            try:
                (self.directory / Path(name).name).unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def remove_older_than(self, days: float) -> int:
        """Remove files not written for `days`, whether or not a row names them: results of
        jobs that failed after their files were saved, and `.tmp` files of a write that a
        crash cut short, would otherwise stay forever."""
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
