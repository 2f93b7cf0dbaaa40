"""Retry policy (tenacity): only retryable errors, exponential backoff with jitter, Retry-After."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from imagebot.errors import ExternalError

MAX_RETRY_AFTER_S = 120.0  # a vendor asking for longer than this is as good as down


def is_retryable(exc: BaseException) -> bool:
    """Retry what the boundary that raised it marked retryable; nothing else."""
    return isinstance(exc, ExternalError) and exc.is_retryable


def retrying(
    *,
    attempts: int,
    base_s: float,
    max_s: float,
    deadline: float | None = None,
    before_sleep: Callable[[RetryCallState], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    """An AsyncRetrying for at most `attempts` tries of a call.

    Waits follow the error's `retry_after_s` when it has one (a vendor's Retry-After, plus
    jitter so that jobs told the same Retry-After do not all come back in the same instant),
    else exponential backoff with jitter; no wait runs past `deadline` (a time.monotonic value).
    """
    jitter = wait_random(0, base_s)
    backoff = wait_exponential(multiplier=base_s, max=max_s) + jitter

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = exc.retry_after_s if isinstance(exc, ExternalError) else None
        asked = min(float(hint), MAX_RETRY_AFTER_S) if hint else None
        seconds = backoff(state) if asked is None else asked + jitter(state)
        if deadline is not None:
            seconds = max(0.0, min(seconds, deadline - time.monotonic()))
        return seconds

    return AsyncRetrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait,
        retry=retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
