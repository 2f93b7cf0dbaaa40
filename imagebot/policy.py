"""Guards decided before a job exists: access, input limits, rate, daily caps, spend cap.

Pure decisions from settings and store counters; no Telegram types, no I/O.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from imagebot.config import Settings
from imagebot.models import JobKind
from imagebot.store.usage import RATE_WINDOW, Counters, day_start

# Bidirectional overrides make a prompt display differently from what it says; drop them.
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


class Reason(StrEnum):
    """Why a request was refused; also the `reason` label of the refusals metric."""

    ALLOWLIST = "allowlist"
    RATE = "rate"
    CAP = "cap"
    SPEND = "spend"
    INPUT = "input"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason | None = None
    code: str | None = None  # finer cause, e.g. "too_long" for INPUT
    retry_after_s: float | None = None
    limit: float | None = None
    used: float | None = None


ALLOW = Decision(allowed=True)


class Policy:
    """The operator's rules, applied the same way to every request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admins = frozenset(settings.access.admins)
        self._users = frozenset(settings.access.users)
        self._chats = frozenset(settings.access.chats)
        # Users let in from the chat, the shell or an invite (the database's allowed_users),
        # kept here by imagebot/control.py so no update waits for a database read.
        self._listed: frozenset[int] = frozenset()

    def is_admin(self, user_id: int) -> bool:
        return user_id in self._admins

    def may_use(self, user_id: int, chat_id: int) -> bool:
        """Allowlist: admins, listed users, members of listed group chats, or everyone if open."""
        return (
            self.settings.access.open
            or user_id in self._admins
            or user_id in self._users
            or user_id in self._listed
            or chat_id in self._chats
        )

    def set_listed(self, user_ids: frozenset[int]) -> None:
        """Replace the database-backed part of the allowlist (one assignment: atomic)."""
        self._listed = user_ids

    def config_role(self, user_id: int) -> str | None:
        """ "admin" or "user" when config.toml lists `user_id` (read-only there), else None."""
        if user_id in self._admins:
            return "admin"
        if user_id in self._users:
            return "user"
        return None

    def clean_text(self, text: str | None) -> tuple[str, Decision]:
        """Normalise a prompt or instruction and check it; returns (clean text, decision)."""
        limit = self.settings.limits.max_prompt_chars
        raw = (text or "").translate(_BIDI_CONTROLS)
        if any(unicodedata.category(ch) == "Cc" and ch not in "\n\r\t" for ch in raw):
            return "", Decision(False, Reason.INPUT, "control_chars", limit=limit)
        clean = " ".join(raw.split())
        if not clean:
            return "", Decision(False, Reason.INPUT, "empty", limit=limit)
        if len(clean) > limit:
            return clean, Decision(False, Reason.INPUT, "too_long", limit=limit, used=len(clean))
        return clean, ALLOW

    def cost_estimate(self, kind: JobKind, images: int | None = None) -> float:
        """What a job of `images` images (default: the operation's usual count) may cost."""
        op = self.settings.operation(kind)
        count = op.outputs_per_job if images is None else images
        return round(op.cost_per_image_usd * count, 6)

    def decide(
        self,
        user_id: int,
        kind: JobKind,
        counters: Counters,
        now: datetime,
        images: int | None = None,
    ) -> Decision:
        """Rate limit, daily cap and spend cap for one new job of `images` images (admins
        bypass all three). Caps count images: the job must fit in what is left today
        (`images` defaults to the operation's usual count)."""
        if self.is_admin(user_id):
            return ALLOW
        limits = self.settings.limits
        recent = [t for t in counters.recent_requests if t > now - RATE_WINDOW]
        if len(recent) >= limits.rate_per_minute:
            oldest_counted = recent[-limits.rate_per_minute]
            wait = (oldest_counted + RATE_WINDOW - now).total_seconds()
            return Decision(
                False,
                Reason.RATE,
                "rate",
                retry_after_s=max(1.0, wait),
                limit=limits.rate_per_minute,
                used=len(recent),
            )
        op = self.settings.operation(kind)
        images = op.outputs_per_job if images is None else max(1, images)
        cap = op.daily_cap
        if counters.used_today + images > cap:
            tomorrow = day_start(now) + timedelta(days=1)
            return Decision(
                False,
                Reason.CAP,
                # "cap_images": some are left today, but fewer than this request asks for
                "disabled" if not cap else "cap_images" if counters.used_today < cap else "cap",
                retry_after_s=(tomorrow - now).total_seconds(),
                limit=cap,
                used=counters.used_today,
            )
        return self.spend_decision(kind, images, counters, now)

    def spend_decision(
        self, kind: JobKind, images: int, counters: Counters, now: datetime
    ) -> Decision:
        """The daily spend cap alone (a job paid with credits still passes it)."""
        spend_cap = self.settings.limits.daily_spend_usd
        estimate = self.cost_estimate(kind, images)
        if spend_cap and counters.spent_today_usd + estimate > spend_cap:
            tomorrow = day_start(now) + timedelta(days=1)
            return Decision(
                False,
                Reason.SPEND,
                "spend",
                retry_after_s=(tomorrow - now).total_seconds(),
                limit=spend_cap,
                used=counters.spent_today_usd,
            )
        return ALLOW
