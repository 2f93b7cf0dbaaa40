"""The names result images are kept under, `<job id>-<n>.<ext>` (a file on disk, or the row
(job_id, n) of result_blobs): shared by the results store and `imagebot migrate-store`."""

from __future__ import annotations

import re
from pathlib import Path

NAME_RE = re.compile(r"([0-9]+)-([0-9]+)\.[A-Za-z0-9]+")


def parse_name(name: str) -> tuple[int, int] | None:
    """(job id, n) of a result name `<job id>-<n>.<ext>`; None for anything else."""
    match = NAME_RE.fullmatch(Path(name).name)
    return (int(match.group(1)), int(match.group(2))) if match else None
