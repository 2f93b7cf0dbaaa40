"""The ImageProvider protocol and the one place vendor HTTP outcomes become ProviderErrors."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import httpx
from aiolimiter import AsyncLimiter

from imagebot.errors import (
    ProviderError,
    ProviderRejected,
    SubmitOutcomeUnknown,
)
from imagebot.logs import get_logger
from imagebot.models import ImageFile, PollResult, ProviderRequest

# Words vendors use when a safety filter refused the prompt or the output.
_SAFETY_WORDS = ("nsfw", "safety", "content policy", "content_policy", "moderation", "flagged")

log = get_logger(__name__)


class ImageProvider(Protocol):
    """A vendor that turns a ProviderRequest into images, in three resumable steps."""

    name: str
    # Seconds from one poll's start to the next while a request is pending (set from the
    # provider's config section when it is built).
    poll_interval_s: float

    async def submit(self, request: ProviderRequest) -> str:
        """Create the vendor request and return its id (sent once; never retried blindly)."""
        ...

    async def poll(self, request_id: str) -> PollResult:
        """Ask the vendor where the request is."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Ask the vendor to stop the request (best effort)."""
        ...

    async def fetch_output(self, url: str) -> ImageFile:
        """Download one output image (through the SSRF guard for remote vendors)."""
        ...

    async def aclose(self) -> None: ...

    def share_rate(self, processes: int) -> None:
        """`processes` processes call this vendor now: pace this one at its share of the
        account's request cap."""
        ...


class RequestRate:
    """A vendor account's request cap (`max_requests_per_s`), which every process calling the
    vendor shares: each paces itself at the cap divided by the live worker processes
    (re-counted after each heartbeat), so N processes do not ask N times the cap (and draw
    the vendor's 429s). Jobs spread evenly over the workers, so even shares fit the load."""

    def __init__(self, vendor: str, per_s: float) -> None:
        self.vendor = vendor
        self.per_s = per_s
        self.processes = 1
        self.limiter = self._limiter(per_s)

    @staticmethod
    def _limiter(per_s: float) -> AsyncLimiter:
        # a bucket of at least one request (aiolimiter refuses to take more than it holds)
        capacity = max(1.0, per_s)
        return AsyncLimiter(capacity, capacity / per_s)

    def share(self, processes: int) -> None:
        processes = max(1, processes)
        if processes != self.processes:
            self.processes = processes
            self.limiter = self._limiter(self.per_s / processes)
            log.info(
                "vendor_rate_shared",
                vendor=self.vendor,
                processes=processes,
                max_requests_per_s=round(self.per_s / processes, 2),
            )


def retry_after_seconds(headers: Mapping[str, str] | httpx.Headers | None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date)."""
    if not headers:
        return None
    value = (headers.get("Retry-After") or headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def is_safety_refusal(text: str | None) -> bool:
    lowered = (text or "").lower()
    return any(word in lowered for word in _SAFETY_WORDS)


# Which answers to a create/submit prove that the vendor created nothing (so sending it again
# cannot pay twice), and which may hide a created request (look it up before sending again)?
#   429 Too Many Requests, 503 Service Unavailable: the service refused to take work (rate
#       limit, overload shedding, maintenance) before doing any: certainly NOT created.
#   502 Bad Gateway, 504 Gateway Timeout: answered by a proxy in front of the API on behalf of
#       a backend that failed or did not answer in time; the backend may have received and
#       stored the create: MAYBE created.
#   500 and every other 5xx: the API failed somewhere in handling the create, possibly after
#       storing it: MAYBE created.
# The vendors refine this (fal: its request-id header says whether the request reached its
# queue), and a body that names the created request settles it.
CERTAINLY_NOT_CREATED = frozenset({429, 503})


def create_may_exist(status: int) -> bool:
    """A create answered with this status may have created the request (see above)."""
    return status >= 500 and status not in CERTAINLY_NOT_CREATED


def error_for_status(
    provider: str,
    status: int,
    detail: str,
    *,
    submit: bool,
    retry_after_s: float | None = None,
) -> ProviderError:
    """Map a vendor HTTP error status to a ProviderError with the right retry decision.

    429 and 5xx are retried, on a submit too: the providers call this for a submit only once
    they know nothing was created (a "maybe created" answer is looked up at the vendor first,
    see `create_may_exist`). 4xx are the request's own fault and never retried.
    """
    if status == 429:
        return ProviderError(
            provider,
            detail or "rate limited",
            code="rate_limited",
            is_retryable=True,
            retry_after_s=retry_after_s,
            status=status,
        )
    if status in (401, 403):
        return ProviderError(provider, detail, code="auth", status=status)
    if status == 402:
        return ProviderError(provider, detail, code="billing", status=status)
    if status == 404 and not submit:
        return ProviderError(provider, detail, code="not_found", status=status)
    if 400 <= status < 500:
        code = "safety" if is_safety_refusal(detail) else "invalid_input"
        return ProviderRejected(provider, detail, code=code, status=status)
    return ProviderError(
        provider,
        detail or f"HTTP {status}",
        code="provider_unavailable",
        is_retryable=True,
        retry_after_s=retry_after_s,
        status=status,
    )


def lost_create(provider: str, status: int, why: str) -> SubmitOutcomeUnknown:
    """A create that may exist at the vendor and could not be found or ruled out."""
    return SubmitOutcomeUnknown(provider, f"HTTP {status} to the create, and {why}")


@contextmanager
def map_transport_errors(provider: str, *, submit: bool) -> Iterator[None]:
    """Turn httpx transport errors into ProviderErrors.

    A connection that never opened is safe to retry. Anything later on a submit (the request
    may have reached the vendor) is an unknown outcome and must not be resent blindly.
    """
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise ProviderError(
            provider, f"cannot connect: {type(exc).__name__}", code="connect", is_retryable=True
        ) from exc
    except httpx.TransportError as exc:
        if submit:
            raise SubmitOutcomeUnknown(
                provider, f"no answer to the submit: {type(exc).__name__}"
            ) from exc
        raise ProviderError(
            provider, f"network error: {type(exc).__name__}", code="network", is_retryable=True
        ) from exc
