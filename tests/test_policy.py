"""Policy decisions from settings and counters alone (no Telegram, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from imagebot.config import Settings
from imagebot.models import JobKind
from imagebot.policy import Policy, Reason
from imagebot.store.usage import Counters

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def policy(**sections: object) -> Policy:
    return Policy(
        Settings(TELEGRAM_BOT_TOKEN="1:abc", REPLICATE_API_TOKEN="r", FAL_KEY="k", **sections)
    )


def counters(recent: int = 0, used: int = 0, spent: float = 0.0) -> Counters:
    times = tuple(NOW - timedelta(seconds=50 - i) for i in range(recent))
    return Counters(times, used, spent)


def test_empty_allowlist_means_nobody() -> None:
    """With no users listed and access.open unset, nobody may use the bot."""
    assert not policy().may_use(42, 42)


def test_open_mode_users_admins_and_group_chats() -> None:
    """open lets anyone in; otherwise listed users, admins and members of listed groups."""
    assert policy(access={"open": True}).may_use(42, 42)
    listed = policy(access={"users": [7], "admins": [9], "chats": [-100]})
    assert listed.may_use(7, 7)
    assert listed.may_use(9, 9)
    assert listed.may_use(55, -100)
    assert not listed.may_use(55, 55)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "empty"),
        ("   \n\t  ", "empty"),
        ("draw\x07 a bell", "control_chars"),
        ("x" * 501, "too_long"),
    ],
)
def test_bad_text_is_refused(text: str, code: str) -> None:
    """Empty, whitespace-only, control characters and overlong texts are refused with a code."""
    _, decision = policy().clean_text(text)
    assert not decision.allowed
    assert decision.reason is Reason.INPUT
    assert decision.code == code


def test_text_is_normalised() -> None:
    """Newlines and runs of spaces fold to one space; bidi overrides are dropped; emoji stay."""
    clean, decision = policy().clean_text("  a\nred\u202e  fox 🦊\u200d ")
    assert decision.allowed
    assert clean == "a red fox 🦊\u200d"


def test_rate_limit_says_when_to_come_back() -> None:
    """The N+1th request inside a sliding minute is refused with the wait until a slot frees."""
    p = policy(limits={"rate_per_minute": 3})
    assert p.decide(1, JobKind.GENERATE, counters(recent=2), NOW).allowed
    decision = p.decide(1, JobKind.GENERATE, counters(recent=3), NOW)
    assert decision.reason is Reason.RATE
    assert decision.retry_after_s == pytest.approx(10)  # the oldest of 3 was 50 s ago


def test_daily_cap_and_switched_off_operation() -> None:
    """At the cap the request waits for 00:00 UTC; a cap of 0 switches the operation off."""
    p = policy(generate={"daily_cap": 2}, edit={"daily_cap": 0})
    assert p.decide(1, JobKind.GENERATE, counters(used=1), NOW).allowed
    capped = p.decide(1, JobKind.GENERATE, counters(used=2), NOW)
    assert capped.reason is Reason.CAP
    assert capped.retry_after_s == pytest.approx(12 * 3600)
    off = p.decide(1, JobKind.EDIT, counters(), NOW)
    assert (off.reason, off.code) == (Reason.CAP, "disabled")


def test_spend_cap_counts_this_job_too() -> None:
    """The spend cap refuses a job whose estimate would take today's spend over it."""
    p = policy(limits={"daily_spend_usd": 0.01}, generate={"cost_per_image_usd": 0.004})
    assert p.decide(1, JobKind.GENERATE, counters(spent=0.006), NOW).allowed
    assert p.decide(1, JobKind.GENERATE, counters(spent=0.007), NOW).reason is Reason.SPEND


def test_admins_bypass_every_cap() -> None:
    """Admins are not held by the rate limit, daily caps or the spend cap."""
    p = policy(
        access={"admins": [9]},
        limits={"rate_per_minute": 1, "daily_spend_usd": 0.001},
        generate={"daily_cap": 1},
    )
    assert p.decide(9, JobKind.GENERATE, counters(recent=5, used=5, spent=1.0), NOW).allowed
    assert not p.decide(8, JobKind.GENERATE, counters(recent=5, used=5, spent=1.0), NOW).allowed


def test_cost_estimate_uses_outputs_per_job() -> None:
    """A job's cost estimate is the per-image price times the images the params ask for."""
    p = policy(generate={"cost_per_image_usd": 0.01, "params": {"num_outputs": 3}})
    assert p.cost_estimate(JobKind.GENERATE) == pytest.approx(0.03)
