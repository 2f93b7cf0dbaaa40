"""The circuit breaker per provider: a vendor outage opens it after runner.circuit_failures
vendor-side failures, new requests are then told at once (job id, no quota used, no vendor
call), and after runner.circuit_cooldown_s one probe request closes it again."""

from __future__ import annotations

import re
from typing import Any

from imagebot.breaker import CircuitBreaker, CircuitState, is_vendor_failure
from imagebot.errors import ProviderError, ProviderRejected
from imagebot.metrics import Metrics
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, ops_get, rows

CHAT = updates.DEFAULT_CHAT_ID


class Clock:
    """A hand-driven monotonic clock for the state machine alone."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold: int = 3, cooldown_s: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker("replicate", threshold, cooldown_s, clock), clock


def test_opens_after_threshold_and_lets_one_probe_through_after_cooldown() -> None:
    """Three failures open it; nothing goes through during the cool-down; afterwards exactly one
    job (the probe) may call, and its success closes the circuit for everyone."""
    b, clock = breaker()
    for job in (1, 2, 3):
        assert b.allow(job)
        b.failed(job)
    assert b.state is CircuitState.OPEN
    assert not b.admit(4) and not b.allow(1)
    clock.now += 10
    assert b.state is CircuitState.HALF_OPEN
    assert b.admit(5)  # the probe
    assert not b.admit(6) and b.allow(5)
    b.succeeded(5)
    assert b.state is CircuitState.CLOSED and b.admit(6) and b.failures == 0


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    """The probe fails: open again for a full cool-down; failures of creates sent before the
    opening do not extend it."""
    b, clock = breaker()
    for job in (1, 2, 3):
        b.failed(job)
    clock.now += 10
    assert b.admit(7)
    b.failed(7)
    assert b.state is CircuitState.OPEN
    clock.now += 9
    b.failed(2)  # a straggler from before: no news
    clock.now += 1
    assert b.state is CircuitState.HALF_OPEN


def test_a_probe_that_never_calls_frees_its_slot_after_a_cooldown() -> None:
    """A probe job that never reaches the vendor (its photo download failed) holds the slot for
    one cool-down only; a refused input frees it at once."""
    b, clock = breaker()
    for job in (1, 2, 3):
        b.failed(job)
    clock.now += 10
    assert b.admit(8) and not b.admit(9)
    clock.now += 10
    assert b.admit(9)
    b.neutral(9)  # the vendor answered 422 to the probe: no verdict, the slot is free
    assert b.admit(10)


def test_only_vendor_side_failures_count() -> None:
    """5xx, connect errors and unanswered creates count; a 429 only once retries are used up; a
    refused input, a bad key or an empty balance never."""
    assert is_vendor_failure(ProviderError("r", "x", code="provider_unavailable"), last_attempt=0)
    assert is_vendor_failure(ProviderError("r", "x", code="connect"), last_attempt=False)
    assert is_vendor_failure(ProviderError("r", "x", code="submit_unknown"), last_attempt=False)
    assert not is_vendor_failure(ProviderError("r", "x", code="rate_limited"), last_attempt=False)
    assert is_vendor_failure(ProviderError("r", "x", code="rate_limited"), last_attempt=True)
    assert not is_vendor_failure(ProviderRejected("r", "x", code="invalid_input"), last_attempt=1)
    assert not is_vendor_failure(ProviderError("r", "x", code="auth"), last_attempt=True)
    assert not is_vendor_failure(ProviderError("r", "x", code="billing"), last_attempt=True)


def test_zero_threshold_never_opens() -> None:
    """runner.circuit_failures = 0 switches the breaker off."""
    b, _ = breaker(threshold=0)
    for job in range(50):
        b.failed(job)
    assert b.state is CircuitState.CLOSED and b.admit(99)


def test_metrics_object_has_the_circuit_series() -> None:
    """The gauge and the refusal counter are registered under their documented names."""
    text = Metrics().render().decode()
    assert "imagebot_provider_circuit_open" in text
    assert "imagebot_provider_circuit_refusals" in text


# -- end to end: an outage, through the real bot ---------------------------------------------


def jobs(app: Any) -> list[Any]:
    return rows(db_path(app))


async def request_and_settle(app: Any, telegram: FakeTelegram, prompt: str) -> Any:
    """Send /generate and wait until its job is final and the chat was told."""
    before = len(jobs(app))
    telegram.push_update(updates.command(f"/generate {prompt}"))
    await wait_until(lambda: len(jobs(app)) > before and jobs(app)[-1]["phase"] == "done", 15)
    return jobs(app)[-1]


async def circuit(app: Any) -> dict[str, Any]:
    _, health = await ops_get(app, "/healthz")
    state: dict[str, Any] = health["circuits"]["replicate"]
    return state


async def metric(app: Any, name: str) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{app.ops.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    match = re.search(rf'^{name}\{{provider="replicate"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_outage_opens_the_circuit_refuses_fast_and_recovers(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Replicate answers 503 to everything: the first requests spend the 5 allowed failures
    (3 + 2 creates), the next ones are told at once with their job id, cost no create and no
    quota; once the vendor is back and the cool-down passed, one probe closes the circuit and
    requests work again."""
    replicate.fail_next("create", 503, {"detail": "down"}, times=10_000)
    runner = {"circuit_failures": 5, "circuit_cooldown_s": 4}
    async with bot(runner=runner, generate={"daily_cap": 3}) as app:
        creates_per_request = []
        for n in range(6):
            seen = len(replicate.creates)
            row = await request_and_settle(app, telegram, f"outage {n}")
            creates_per_request.append(len(replicate.creates) - seen)
            assert row["status"] == "failed"
        assert (await circuit(app))["state"] == "open"
        assert await metric(app, "imagebot_provider_circuit_open") == 1
        refused = [r for r in jobs(app) if r["error_code"] == "circuit_open"]
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))

        replicate.clear_faults("create")
        await wait_until(
            lambda: (
                app.services.runner.pipeline.breakers.get("replicate").state
                is not CircuitState.OPEN
            ),
            within=10,
        )
        probe = await request_and_settle(app, telegram, "after the outage")
        after_probe = await circuit(app)
        again = await request_and_settle(app, telegram, "all good")
        closed_gauge = await metric(app, "imagebot_provider_circuit_open")

    # 3 creates for the first request, 2 for the second (the circuit opened on the 5th failure
    # and refused its third try), none for the rest.
    assert creates_per_request == [3, 2, 0, 0, 0, 0]
    assert [r["id"] for r in refused] == [2, 3, 4, 5, 6]
    texts = telegram.texts(CHAT)
    for job_id in (3, 4, 5, 6):
        notice = next(t for t in texts if t.startswith(f"Sorry, job {job_id} failed"))
        assert "image service is having trouble" in notice
        assert "didn't count against your daily limit" in notice
        # told at once: no "Generating…" status line was sent for a refused request
        assert not any(t.startswith("Generating") and f"(job {job_id})" in t for t in texts)
    usage = next(t for t in texts if "Today (UTC)" in t)
    assert "Generate: 0 of 3 used, 3 left" in usage
    assert probe["status"] == "succeeded" and again["status"] == "succeeded"
    assert after_probe["state"] == "closed"
    assert closed_gauge == 0
    assert len(replicate.predictions) == 2
    assert len(telegram.photos(CHAT)) == 2


async def test_without_the_breaker_every_request_spends_max_attempts(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """circuit_failures = 0 (off): during the same outage each request sends max_attempts (3)
    creates: the amplification the breaker removes."""
    replicate.fail_next("create", 503, {"detail": "down"}, times=10_000)
    async with bot(runner={"circuit_failures": 0}) as app:
        for n in range(4):
            row = await request_and_settle(app, telegram, f"outage {n}")
            assert (row["status"], row["error_code"]) == ("failed", "provider_unavailable")
        state = await circuit(app)
    assert len(replicate.creates) == 12
    assert state["state"] == "closed"


async def test_refused_inputs_do_not_open_the_circuit(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Vendor 422s (a user's bad input) are not an outage: after more of them than the
    threshold, the next request still goes to the vendor and succeeds."""
    replicate.fail_next("create", 422, {"detail": "prompt: invalid"}, times=3)
    async with bot(runner={"circuit_failures": 2}) as app:
        for n in range(3):
            row = await request_and_settle(app, telegram, f"bad {n}")
            assert row["error_code"] == "invalid_input"
        row = await request_and_settle(app, telegram, "fine")
        state = await circuit(app)
    assert row["status"] == "succeeded"
    assert state == {"state": "closed", "failures": 0, "probe_in_s": 0.0}
    assert len(replicate.creates) == 4
