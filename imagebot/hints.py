"""Completion hints: Replicate and fal call a per-job URL when a request finishes, so the job
polls at once instead of at its next interval.

A hint is only a wake-up: its body is never trusted or read. The job still learns the outcome
by polling the vendor's authenticated API, so a forged or repeated hint costs one early poll at
most, and a lost one costs the usual poll interval. The URL carries the job id and an HMAC of
it keyed from the webhook secret (never the secret itself), so strangers cannot wake jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_MAX_EARLY = 10_000  # hints for jobs not (yet) waiting, kept until a job starts waiting
TRUST_S = 3600.0  # hints count as arriving if one came within this long
ROUTE_SUFFIX = "/done/{job_id}/{token}"


class CompletionHints:
    """Per-job wake-up events, set by the webhook thread, awaited on the main loop."""

    def __init__(self, *, public_url: str | None, secret: str) -> None:
        self._base = public_url.rstrip("/") + "/done" if public_url else None
        self._key = hashlib.sha256(b"imagebot completion hints\0" + secret.encode()).digest()
        self._events: dict[int, asyncio.Event] = {}
        self._waiting: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_hint: float | None = None  # loop time of the last hint that woke a wait
        # Several processes (issue 16): whether this one runs a job, and how a hint for a
        # job it does not run reaches the others (see `route_to`).
        self._runs_here: Callable[[int], bool] | None = None
        self._forward: Callable[[int], None] | None = None

    @property
    def enabled(self) -> bool:
        return self._base is not None

    @property
    def arriving(self) -> bool:
        """Hints reach us (one came lately and none was found missing since): jobs may then
        poll at the slow safety interval. Until one arrives (say the proxy does not pass
        them) jobs poll at the vendor's usual interval."""
        if self._last_hint is None or self._loop is None:
            return False
        return self._loop.time() - self._last_hint < TRUST_S

    def missed(self) -> None:
        """A poll found a request finished that no hint announced: stop relying on hints
        until the next one arrives."""
        self._last_hint = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the jobs wait on (hints arrive on another thread)."""
        self._loop = loop

    def token(self, job_id: int) -> str:
        return hmac.new(self._key, f"job:{job_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def url_for(self, job_id: int) -> str | None:
        """The URL a vendor calls when the job's request finishes (None: hints are off)."""
        if self._base is None:
            return None
        return f"{self._base}/{job_id}/{self.token(job_id)}"

    def verify(self, job_id: int, token: str) -> bool:
        return hmac.compare_digest(self.token(job_id), token)

    def route_to(self, runs_here: Callable[[int], bool], forward: Callable[[int], None]) -> None:
        """Hints arriving here for a job this process does not run (`runs_here(job_id)` is
        False) go to `forward(job_id)`, which tells the other processes (thread-safe both)."""
        self._runs_here = runs_here
        self._forward = forward

    def received(self, job_id: int) -> None:
        """A verified hint came in (on any thread): wake the job here if it runs here, else
        pass it on to the process that does."""
        if self._forward is None or self._runs_here is None or self._runs_here(job_id):
            self.notify(job_id)
        else:
            self._forward(job_id)

    def passed_on(self, job_id: int) -> None:
        """Another process received a hint for job `job_id`: wake it if it runs here."""
        if self._runs_here is None or self._runs_here(job_id):
            self.notify(job_id)

    def wake_all(self) -> None:
        """Every waiting job polls once now (hints may have been missed: the listener was
        away). Not counted as a hint arriving. Called on the loop."""
        for job_id in self._waiting:
            event = self._events.get(job_id)
            if event is not None:
                event.set()

    def notify(self, job_id: int) -> None:
        """Wake the job's wait (thread-safe). A hint that comes before the wait is kept."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._set, job_id)

    def _set(self, job_id: int) -> None:
        assert self._loop is not None
        self._last_hint = self._loop.time()
        if job_id not in self._events and len(self._events) >= _MAX_EARLY:
            for stale in [j for j in self._events if j not in self._waiting]:
                del self._events[stale]
        self._events.setdefault(job_id, asyncio.Event()).set()

    @contextmanager
    def waiting(self, job_id: int) -> Iterator[asyncio.Event]:
        """The job's wake-up event while it waits on its vendor; forgotten afterwards."""
        event = self._events.setdefault(job_id, asyncio.Event())
        self._waiting.add(job_id)
        try:
            yield event
        finally:
            self._waiting.discard(job_id)
            self._events.pop(job_id, None)
