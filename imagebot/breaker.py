"""A circuit breaker per provider: during a vendor outage new requests are refused at once
instead of each one sending `runner.max_attempts` creates to a vendor that is down.

States: **closed** (calls go through; consecutive vendor-side failures are counted), **open**
(after `runner.circuit_failures` of them: no create is sent, new requests are told at once),
**half-open** (once `runner.circuit_cooldown_s` has passed: exactly one job, the probe, may
send a create; its success closes the circuit, its failure opens it for another cool-down).

The probe is a real user's job, chosen when the request arrives (`admit`) and checked again
right before each create (`allow`), so it holds a lease: a probe that never reaches the vendor
(its photo download failed, it waited in the queue) frees the slot after one cool-down.

Hand-written rather than taken from purgatory/aiobreaker/pybreaker: those wrap one call, while
here the decision is made twice at different places (the chat handler before a job row exists,
the worker before each create) for the same probe job; purgatory's half-open state admits
every caller instead of one probe, pybreaker's async support is tornado-based and aiobreaker
has had no release since 2021. The whole state machine is the ~80 lines below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from imagebot.errors import ProviderError
from imagebot.logs import get_logger
from imagebot.metrics import Metrics

log = get_logger(__name__)

# Vendor-side failures of a create: the vendor (or the way to it) is in trouble. A refusal of
# the user's input (4xx validation, safety), a bad key or an empty balance is not an outage:
# those are neutral and never open the circuit.
VENDOR_FAILURE_CODES = frozenset(
    {"provider_unavailable", "connect", "network", "submit_unknown", "timeout", "bad_response"}
)
CIRCUIT_OPEN = "circuit_open"  # error code of a job refused while the circuit is open


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def is_vendor_failure(exc: ProviderError, *, last_attempt: bool) -> bool:
    """Whether a failed create counts toward opening the circuit. A 429 counts only once the
    job's retries are used up (one 429 followed by success is the vendor pacing us)."""
    if exc.code == "rate_limited":
        return last_attempt
    return exc.code in VENDOR_FAILURE_CODES


@dataclass
class CircuitBreaker:
    """The circuit of one provider."""

    provider: str
    threshold: int  # 0: never opens
    cooldown_s: float
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probe_job: int | None = None
    probe_since: float = 0.0

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at < self.cooldown_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def retry_in_s(self) -> float:
        """Seconds until a probe may go (0 when closed or already half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def allow(self, job_id: int) -> bool:
        """May this job send a create now? In half-open, only the probe (taking the lease if
        it is free or has lapsed)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        now = self.clock()
        lapsed = now - self.probe_since >= self.cooldown_s
        if self.probe_job in (None, job_id) or lapsed:
            if self.probe_job != job_id:
                log.info("provider_circuit_probe", provider=self.provider, job_id=job_id)
            self.probe_job, self.probe_since = job_id, now
            return True
        return False

    admit = allow  # a new request is admitted on the same terms as a create

    def succeeded(self, job_id: int) -> None:
        """A create went through: the vendor works, the circuit closes."""
        was_open = self.opened_at is not None
        self.failures, self.opened_at, self.probe_job = 0, None, None
        if was_open:
            log.info("provider_circuit_closed", provider=self.provider, job_id=job_id)

    def failed(self, job_id: int) -> None:
        """A create failed on the vendor's side."""
        if self.opened_at is None:
            self.failures += 1
            if self.threshold and self.failures >= self.threshold:
                self._open(job_id)
        elif self.probe_job == job_id:
            self._open(job_id)  # the probe failed: another cool-down
        # Other failures while open come from creates sent before it opened: no news.

    def neutral(self, job_id: int) -> None:
        """The vendor answered but refused the input: no verdict; a probe frees its slot."""
        if self.probe_job == job_id:
            self.probe_job = None

    def _open(self, job_id: int) -> None:
        self.opened_at, self.probe_job = self.clock(), None
        log.warning(
            "provider_circuit_opened",
            provider=self.provider,
            failures=self.failures,
            cooldown_s=self.cooldown_s,
            job_id=job_id,
        )


class Breakers:
    """One CircuitBreaker per provider name, exported as metrics."""

    def __init__(
        self,
        *,
        threshold: int,
        cooldown_s: float,
        metrics: Metrics,
        providers: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.metrics = metrics
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        for name in providers:
            self.get(name)

    def get(self, provider: str) -> CircuitBreaker:
        breaker = self._breakers.get(provider)
        if breaker is None:
            breaker = self._breakers[provider] = CircuitBreaker(
                provider, self.threshold, self.cooldown_s, self.clock
            )
            # Read at scrape time, so half-open (a time, not an event) needs no timer.
            self.metrics.provider_circuit_open.labels(provider).set_function(_is_open(breaker))
        return breaker

    def states(self) -> dict[str, dict[str, object]]:
        """For /healthz: each provider's state, counted failures and seconds to the probe."""
        return {
            name: {
                "state": b.state.value,
                "failures": b.failures,
                "probe_in_s": round(b.retry_in_s(), 1),
            }
            for name, b in sorted(self._breakers.items())
        }


def _is_open(breaker: CircuitBreaker) -> Callable[[], float]:
    return lambda: float(breaker.state is not CircuitState.CLOSED)
