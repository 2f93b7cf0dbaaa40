"""/metrics: every series the operator is promised exists and moves when its event happens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import updates
from tests.conftest import WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import (
    Samples,
    db_path,
    rows,
    scrape,
    scrape_text,
    value,
    webhook_url,
)

CHAT = updates.DEFAULT_CHAT_ID


# Every series issue 6 lists, as exported (counters gain `_total`, histograms `_count`).
PROMISED = {
    "imagebot_updates_received": "counter",
    "imagebot_updates_duplicate": "counter",
    "imagebot_jobs_created": "counter",
    "imagebot_jobs_finished": "counter",
    "imagebot_refusals": "counter",
    "imagebot_provider_calls": "counter",
    "imagebot_provider_retries": "counter",
    "imagebot_provider_errors": "counter",
    "imagebot_ack_latency_seconds": "histogram",
    "imagebot_queue_wait_seconds": "histogram",
    "imagebot_provider_seconds": "histogram",
    "imagebot_end_to_end_seconds": "histogram",
    "imagebot_jobs_running": "gauge",
    "imagebot_jobs_queued": "gauge",
    "imagebot_estimated_cost_usd": "counter",
    "imagebot_telegram_flood_waits": "counter",
    # beyond the list
    "imagebot_webhook_response_seconds": "histogram",
    "imagebot_delivery_errors": "counter",
    "process_resident_memory_bytes": "gauge",
}


async def scrape_until(
    app: Any, predicate: Callable[[Samples], bool], within: float = 10.0
) -> Samples:
    """Scrape until `predicate` holds on what /metrics shows (bounded)."""
    deadline = time.monotonic() + within
    while True:
        samples = await scrape(app)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics did not reach the expected state within {within} s")
        await asyncio.sleep(0.05)


async def test_every_promised_series_is_exported(bot) -> None:
    """/metrics is Prometheus text with every promised family, of the right type, from the
    first scrape on (no series appears only after its first event)."""
    async with bot() as app:
        status, content_type, text = await scrape_text(app)
    assert status == 200
    assert content_type.startswith("text/plain")
    parsed = list(text_string_to_metric_families(text))
    families = {f.name: f.type for f in parsed}
    for name, kind in PROMISED.items():
        assert families.get(name) == kind, name
    # No per-series creation timestamps cluttering the page.
    assert not [s.name for f in parsed for s in f.samples if s.name.endswith("_created")]


async def test_updates_received_by_type_and_duplicates(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Each webhook update counts under its type; a resent update_id also counts as a duplicate."""
    async with bot(telegram={"mode": "webhook"}) as app:
        before = await scrape(app)
        update = updates.command("/generate twice")
        await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        await updates.post_webhook(webhook_url(app), update, WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        photo = telegram.photos(CHAT)[0]
        press = updates.callback_query("a:999", message=updates.bot_message_dict(photo))
        await updates.post_webhook(webhook_url(app), press, WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.answered_callbacks) == 1)
        after = await scrape(app)
    received = "imagebot_updates_received_total"
    assert value(after, received, type="message") - value(before, received, type="message") == 2
    assert (
        value(after, received, type="callback_query")
        - value(before, received, type="callback_query")
        == 1
    )
    duplicates = "imagebot_updates_duplicate_total"
    assert value(after, duplicates) - value(before, duplicates) == 1
    answered = "imagebot_webhook_response_seconds_count"
    assert value(after, answered) - value(before, answered) == 3


async def test_a_job_moves_the_job_provider_latency_and_cost_series(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """One delivered /generate: created and finished(succeeded) +1, submit and polls counted
    for replicate, one observation in each latency histogram, cost +0.003 USD."""
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imagebot_jobs_created_total", kind="generate") == 1
    assert delta("imagebot_jobs_finished_total", kind="generate", status="succeeded") == 1
    assert delta("imagebot_provider_calls_total", provider="replicate", call="submit") == 1
    assert delta("imagebot_provider_calls_total", provider="replicate", call="poll") >= 1
    assert delta("imagebot_ack_latency_seconds_count", kind="generate") == 1
    assert delta("imagebot_queue_wait_seconds_count", kind="generate") == 1
    assert delta("imagebot_provider_seconds_count", provider="replicate") == 1
    assert delta("imagebot_end_to_end_seconds_count", kind="generate") == 1
    assert delta("imagebot_end_to_end_seconds_sum", kind="generate") > 0
    assert delta("imagebot_estimated_cost_usd_total", provider="replicate") == pytest.approx(0.003)
    assert value(after, "imagebot_jobs_running") == 0
    assert value(after, "imagebot_jobs_queued") == 0


async def test_running_and_queued_gauges_follow_the_queue(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With one slot and two jobs, the gauges show 1 running and 1 queued, then 0 and 0."""
    replicate.latency_s = 1.0
    async with bot(runner={"max_running": 1}) as app:
        telegram.push_update(updates.command("/generate first"))
        telegram.push_update(updates.command("/generate second", user_id=2002, chat_id=2002))
        await wait_until(lambda: len(replicate.creates) == 1)
        busy = await scrape_until(app, lambda s: value(s, "imagebot_jobs_queued") == 1)
        # Both results, not only the second user's: the two chats' updates are handled at
        # once, so either job may be the one that waits (the other then starts after it).
        photos = (updates.DEFAULT_CHAT_ID, 2002)
        await wait_until(lambda: all(len(telegram.photos(c)) == 1 for c in photos), within=15)
        await wait_until(lambda: app.services.runner.running_count == 0)
        idle = await scrape(app)
    assert value(busy, "imagebot_jobs_running") == 1
    assert value(busy, "imagebot_jobs_queued") == 1
    assert value(idle, "imagebot_jobs_running") == 0
    assert value(idle, "imagebot_jobs_queued") == 0


@pytest.mark.parametrize(
    ("reason", "overrides", "texts"),
    [
        ("allowlist", {"access": {"open": False}}, ["/generate a cat"]),
        ("rate", {"limits": {"rate_per_minute": 1}}, ["/generate a cat", "/generate a dog"]),
        ("cap", {"generate": {"daily_cap": 1}}, ["/generate a cat", "/generate a dog"]),
        ("spend", {"limits": {"daily_spend_usd": 0.001}}, ["/generate a cat"]),
        ("input", {}, ["/generate"]),
    ],
)
async def test_refusals_count_by_reason(
    bot,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    reason: str,
    overrides: dict[str, Any],
    texts: list[str],
) -> None:
    """A refused request counts once under its reason, and the user is told."""
    async with bot(**overrides) as app:
        before = await scrape(app)
        for text in texts:
            telegram.push_update(updates.command(text))
        await wait_until(lambda: len(telegram.texts(CHAT)) >= len(texts))
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)
    for name in ("allowlist", "rate", "cap", "spend", "input"):
        moved = value(after, "imagebot_refusals_total", reason=name) - value(
            before, "imagebot_refusals_total", reason=name
        )
        assert moved == (1 if name == reason else 0), name
    created = value(after, "imagebot_jobs_created_total", kind="generate")
    assert created == len(texts) - 1


async def test_provider_retries_and_errors_by_class(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 429 on create is retried (retries +1, errors{rate_limited} +1, job succeeds); a failed
    prediction counts errors{safety} and jobs_finished{failed}."""
    replicate.fail_next("create", 429, {"detail": "slow down"}, headers={"Retry-After": "0"})
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(updates.command("/generate a retried fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        replicate.outcome = "failed"
        telegram.push_update(updates.command("/generate something spicy"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert len(replicate.creates) == 3  # 429, retry, then the failing one
    assert delta("imagebot_provider_retries_total", provider="replicate") == 1
    assert delta("imagebot_provider_errors_total", provider="replicate", error="rate_limited") == 1
    assert delta("imagebot_provider_errors_total", provider="replicate", error="safety") == 1
    assert delta("imagebot_provider_calls_total", provider="replicate", call="submit") == 3
    assert delta("imagebot_jobs_finished_total", kind="generate", status="succeeded") == 1
    assert delta("imagebot_jobs_finished_total", kind="generate", status="failed") == 1
    # A failed job costs nothing in the estimate.
    assert delta("imagebot_estimated_cost_usd_total", provider="replicate") == pytest.approx(0.003)


async def test_telegram_429_is_counted_and_the_photo_still_arrives(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Telegram answering sendPhoto with 429 retry_after counts one flood wait; the photo is
    sent again after the wait and arrives."""
    telegram.fail_method("sendPhoto", 429, "Too Many Requests: retry after 1", retry_after=1)
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(updates.command("/generate a patient fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=15)
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)
    name = "imagebot_telegram_flood_waits_total"
    assert value(after, name) - value(before, name) == 1
    assert value(after, "imagebot_jobs_finished_total", kind="generate", status="succeeded") == 1


async def test_an_edit_counts_under_kind_edit_and_provider_fal(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A photo with /edit in its caption counts as an edit job at fal: created, submitted,
    finished(succeeded) and its estimated cost (0.039 USD)."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(
            updates.photo_message(file_id, caption="/edit make it blue", width=64, height=48)
        )
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imagebot_jobs_created_total", kind="edit") == 1
    assert delta("imagebot_jobs_finished_total", kind="edit", status="succeeded") == 1
    assert delta("imagebot_provider_calls_total", provider="fal", call="submit") == 1
    assert delta("imagebot_provider_seconds_count", provider="fal") == 1
    assert delta("imagebot_estimated_cost_usd_total", provider="fal") == pytest.approx(0.039)


async def test_a_blocked_output_counts_as_a_provider_error(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """An output URL on a host outside media.allowed_hosts is never fetched; the job fails
    with blocked_address and /metrics counts it for the provider."""
    replicate.output_url_base = f"http://localhost:{replicate.port}"
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(updates.command("/generate from a strange cdn"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        await wait_until(lambda: app.services.runner.running_count == 0)
        after = await scrape(app)
    name = "imagebot_provider_errors_total"
    moved = value(after, name, provider="replicate", error="blocked_address") - value(
        before, name, provider="replicate", error="blocked_address"
    )
    assert moved == 1
    assert replicate.downloads == {} or set(replicate.downloads.values()) == {0}
    assert rows(db_path(app))[0]["error_code"] == "blocked_address"


async def test_a_chat_that_blocked_the_bot_counts_a_delivery_error(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """When Telegram refuses the result with 403 (the user blocked the bot), the job fails
    and delivery_errors{code="blocked"} moves."""
    telegram.forbid_chat(CHAT)
    async with bot() as app:
        before = await scrape(app)
        telegram.push_update(updates.command("/generate for nobody"))
        await wait_until(lambda: len(replicate.creates) == 1)
        after = await scrape_until(
            app,
            lambda s: (
                value(s, "imagebot_jobs_finished_total", kind="generate", status="failed") == 1
            ),
        )
    name = "imagebot_delivery_errors_total"
    assert value(after, name, code="blocked") - value(before, name, code="blocked") == 1
    assert rows(db_path(app))[0]["error_code"] == "blocked"
    assert telegram.photos(CHAT) == []


def test_process_metrics_survive_a_hidden_proc_stat(tmp_path: Path) -> None:
    """Under systemd's ProcSubset=pid only /proc/<pid> is visible; process memory and start
    time are still exported (the boot time comes from CLOCK_BOOTTIME instead of /proc/stat)."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    from imagebot.metrics import _ProcessCollector

    def exported(collector: type[ProcessCollector], proc: Path) -> dict[str, float]:
        registry = CollectorRegistry()
        collector(proc=str(proc), registry=registry)
        text = generate_latest(registry).decode()
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)}

    (tmp_path / "self").symlink_to("/proc/self")  # a /proc with pids only
    hidden = exported(_ProcessCollector, tmp_path)
    full = exported(ProcessCollector, Path("/proc"))
    assert exported(ProcessCollector, tmp_path) == {}  # what the library alone would do
    assert hidden["process_resident_memory_bytes"] > 0
    assert abs(hidden["process_start_time_seconds"] - full["process_start_time_seconds"]) < 2
