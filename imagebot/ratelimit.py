"""Outgoing Telegram rate limiting: overall, per private chat, per group, and RetryAfter waits.

PTB's AIORateLimiter throttles overall and per group only, and its leaky buckets start full,
so a burst can send twice the rate inside one second. Telegram's limits are sliding windows:
~30 messages/s overall, 1/s in one chat, 20/min in a group. Each bucket here is sized so that
no window can ever hold more than the limit: capacity C plus rate R over the window stays under
it. A RetryAfter from Telegram pauses every request for the time it names, then the request is
sent again (up to `max_retries`), so no result message is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
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
_SAFETY_S = 0.1  # margin so network jitter cannot squeeze two sends into one window
_MAX_CHAT_LIMITERS = 2048


def retry_after_s(exc: RetryAfter) -> float:
    """Seconds from a RetryAfter without PTB's int/timedelta deprecation dance."""
    # The public property warns (int vs timedelta) unless PTB_TIMEDELTA is set.
    value = exc._retry_after
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class TelegramRateLimiter(BaseRateLimiter[int]):
    """Keeps every outgoing request inside Telegram's flood limits."""

    def __init__(
        self, settings: TelegramSettings, on_flood_wait: Callable[[float], None] | None = None
    ) -> None:
        rate = settings.rate_overall_per_s
        burst = max(1, int(rate // 8))
        self._overall = AsyncLimiter(burst, burst / rate)
        self._chat_period = 1 / settings.rate_per_chat_per_s + _SAFETY_S
        self._group_period = 60 / max(1.0, settings.rate_group_per_min - 1) + _SAFETY_S
        self._chats: dict[int | str, AsyncLimiter] = {}
        self._max_retries = settings.max_send_retries
        self._open = asyncio.Event()
        self._open.set()
        self._on_flood_wait = on_flood_wait

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    def _chat_limiter(self, chat_id: int | str) -> AsyncLimiter:
        limiter = self._chats.get(chat_id)
        if limiter is None:
            if len(self._chats) > _MAX_CHAT_LIMITERS:
                idle = [k for k, v in self._chats.items() if v.has_capacity(v.max_rate)]
                for key in idle:
                    del self._chats[key]
            is_group = isinstance(chat_id, str) or chat_id < 0
            period = self._group_period if is_group else self._chat_period
            limiter = self._chats[chat_id] = AsyncLimiter(1, period)
        return limiter

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
                self._open.clear()
                try:
                    await asyncio.sleep(wait)
                finally:
                    self._open.set()
            else:
                return result
        raise AssertionError("unreachable")

    async def _send(
        self,
        callback: Callable[..., Coroutine[Any, Any, Any]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        chat_id: int | str | None,
    ) -> Any:
        chat_limited = chat_id is not None and endpoint in SEND_METHODS
        async with contextlib.AsyncExitStack() as stack:
            if chat_limited:
                assert chat_id is not None
                await stack.enter_async_context(self._chat_limiter(chat_id))
            await self._open.wait()
            await stack.enter_async_context(self._overall)
            return await callback(*args, **kwargs)
