"""Outgoing Telegram rate limiting: overall, per private chat, per group, and RetryAfter waits.

PTB's AIORateLimiter throttles overall and per group only, and its leaky buckets start full,
so a burst can send twice the rate inside one second. Telegram's limits are sliding windows:
~30 messages/s overall, 1/s in one chat, 20/min in a group. So:
- the overall bucket is sized so that no one-second window can hold more than the limit
  (capacity C plus rate R stays under it);
- one chat's sends are serialised and spaced at the moment they are sent (a slot taken before
  a wait elsewhere would let two sends reach Telegram closer than the spacing);
- progress traffic (edits, chat actions, deletions) may use at most a share of the overall
  rate, so results are never stuck behind it;
- a RetryAfter from Telegram pauses every request for the time it names, then the request is
  sent again (up to `max_retries`), so no result message is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from aiolimiter import AsyncLimiter
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

from imagebot.config import TelegramSettings
from imagebot.logs import get_logger

log = get_logger(__name__)

# Methods that create a message and so count against the per-chat and group limits.
SEND_METHODS = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendMediaGroup",
        "copyMessage",
        "forwardMessage",
    }
)
# Methods that are not chat traffic (or must never wait behind it).
UNLIMITED_METHODS = frozenset(
    {"getUpdates", "getMe", "getFile", "setWebhook", "deleteWebhook", "answerCallbackQuery"}
)
# Chat-bound calls that are progress, not results: they may use only a share of the rate.
LOW_PRIORITY_METHODS = frozenset(
    {"editMessageText", "editMessageReplyMarkup", "sendChatAction", "deleteMessage"}
)
_LOW_PRIORITY_SHARE = 0.3
_SAFETY_S = 0.1  # margin so network jitter cannot squeeze two sends into one window
_MAX_CHAT_SLOTS = 2048


def retry_after_s(exc: RetryAfter) -> float:
    """Seconds from a RetryAfter without PTB's int/timedelta deprecation dance."""
    # The public property warns (int vs timedelta) unless PTB_TIMEDELTA is set.
    value = exc._retry_after
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class _ChatSlot:
    """One chat: its sends go one at a time, at least `period` seconds apart."""

    __slots__ = ("last_sent", "lock", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self.lock = asyncio.Lock()
        self.last_sent = float("-inf")


class TelegramRateLimiter(BaseRateLimiter[int]):
    """Keeps every outgoing request inside Telegram's flood limits."""

    def __init__(
        self, settings: TelegramSettings, on_flood_wait: Callable[[float], None] | None = None
    ) -> None:
        self._set_overall_rate(settings.rate_overall_per_s)
        self._chat_period = 1 / settings.rate_per_chat_per_s + _SAFETY_S
        self._group_period = 60 / max(1.0, settings.rate_group_per_min - 1) + _SAFETY_S
        self._chats: dict[int | str, _ChatSlot] = {}
        self._max_retries = settings.max_send_retries
        self._open = asyncio.Event()
        self._open.set()
        self._on_flood_wait = on_flood_wait

    async def initialize(self) -> None:
        """Nothing to set up."""

    def reserve_ahead(self, chat_id: int) -> None:
        """A send to `chat_id` follows shortly: prepare its slot now, if that takes time.
        Here nothing does (the limits are in memory); see SharedRateLimiter."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    def _slot(self, chat_id: int | str) -> _ChatSlot:
        slot = self._chats.get(chat_id)
        if slot is None:
            if len(self._chats) > _MAX_CHAT_SLOTS:
                now = time.monotonic()
                for key, old in list(self._chats.items()):
                    if not old.lock.locked() and now - old.last_sent > old.period:
                        del self._chats[key]
            is_group = isinstance(chat_id, str) or chat_id < 0
            slot = self._chats[chat_id] = _ChatSlot(
                self._group_period if is_group else self._chat_period
            )
        return slot

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        if endpoint in UNLIMITED_METHODS:
            return await callback(*args, **kwargs)
        chat_id: int | str | None = data.get("chat_id")
        with contextlib.suppress(ValueError, TypeError):
            chat_id = int(chat_id)  # type: ignore[arg-type]
        max_retries = self._max_retries if rate_limit_args is None else rate_limit_args
        for attempt in range(max_retries + 1):
            try:
                result: bool | dict[str, Any] | list[dict[str, Any]] = await self._send(
                    callback, args, kwargs, endpoint, chat_id
                )
            except RetryAfter as exc:
                wait = retry_after_s(exc) + _SAFETY_S
                if self._on_flood_wait:
                    self._on_flood_wait(wait)
                if attempt >= max_retries:
                    raise
                log.warning(
                    "telegram_flood_wait",
                    method=endpoint,
                    wait_s=round(wait, 2),
                    attempt=attempt + 1,
                )
                await self._flood_pause(wait)
            else:
                return result
        raise AssertionError("unreachable")

    async def _flood_pause(self, wait: float) -> None:
        """Telegram said "retry after": every request of this limiter waits `wait` seconds."""
        self._open.clear()
        try:
            await asyncio.sleep(wait)
        finally:
            self._open.set()

    def _set_overall_rate(self, rate: float) -> None:
        """Pace this process's requests at `rate` per second overall (and its share of it for
        progress traffic)."""
        burst = max(1, int(rate // 8))
        self._overall = AsyncLimiter(burst, burst / rate)
        low_rate = max(1.0, rate * _LOW_PRIORITY_SHARE)
        self._low_priority = AsyncLimiter(1, 1 / low_rate)

    async def _send(
        self,
        callback: Callable[..., Coroutine[Any, Any, Any]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        chat_id: int | str | None,
    ) -> Any:
        if chat_id is None or endpoint not in SEND_METHODS:
            # Progress traffic (and anything without a chat): overall budget, lower priority.
            if endpoint in LOW_PRIORITY_METHODS:
                await self._low_priority.acquire()
            await self._open.wait()
            async with self._overall:
                return await callback(*args, **kwargs)
        slot = self._slot(chat_id)
        async with slot.lock:
            # Spacing first, then the overall token: a token taken before a sleep would let
            # sends bunch up in a later second. Waiting after the spacing only widens it.
            wait = slot.last_sent + slot.period - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._open.wait()
            await self._overall.acquire()
            slot.last_sent = time.monotonic()
            return await callback(*args, **kwargs)
