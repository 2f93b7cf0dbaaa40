"""Time as the store writes it: aware UTC datetimes and their ISO-8601 text (a leaf module)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds and a Z, so text order is time order."""
    moment = moment or utcnow()
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
