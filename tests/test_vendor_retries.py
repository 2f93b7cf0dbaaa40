"""Creates the vendor answered with 429/5xx: resent with backoff up to runner.max_attempts when
nothing was created, looked up and adopted when the answer may hide a created request, never
resent when that cannot be told. Through the real clients against the fake vendors."""

from __future__ import annotations

from typing import Any

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID


def jobs(app: Any) -> list[Any]:
    return rows(db_path(app))


async def settled(app: Any, count: int = 1) -> list[Any]:
    """Wait until `count` jobs are final and their chat was told (phase done)."""
    await wait_until(lambda: len([r for r in jobs(app) if r["phase"] == "done"]) >= count, 15)
    return jobs(app)


async def usage_text(telegram: FakeTelegram) -> str:
    telegram.push_update(updates.command("/usage"))
    await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
    return next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)


def failure_notices(telegram: FakeTelegram) -> list[str]:
    return [t for t in telegram.texts(CHAT) if "failed" in t]


# -- Replicate ------------------------------------------------------------------------------


async def test_create_rate_limited_waits_retry_after_then_delivers(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 429 with Retry-After: 1 on the create: the bot waits at least that long, creates again,
    and the user gets the image from the one prediction (one job, two creates)."""
    replicate.fail_next("create", 429, {"detail": "slow down"}, headers={"Retry-After": "1"})
    async with bot() as app:
        telegram.push_update(updates.command("/generate a red fox"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(replicate.creates) == 2 and len(replicate.predictions) == 1
    assert replicate.creates[1].at - replicate.creates[0].at >= 0.9
    assert row["provider_request_id"] == replicate.last_prediction.id
    assert row["attempts"] == 2
    assert len(telegram.photos(CHAT)) == 1


async def test_create_503_every_time_fails_after_max_attempts(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """503 to every create: exactly max_attempts creates, no prediction, the job fails with
    provider_unavailable, the user is told once, and the unit of the daily cap comes back."""
    replicate.fail_next("create", 503, {"detail": "overloaded"}, times=3)
    async with bot(generate={"daily_cap": 1}) as app:
        telegram.push_update(updates.command("/generate a red fox"))
        (row,) = await settled(app)
        usage = await usage_text(telegram)
    assert (row["status"], row["error_code"], row["attempts"]) == (
        "failed",
        "provider_unavailable",
        3,
    )
    assert len(replicate.creates) == 3 and not replicate.predictions
    (notice,) = failure_notices(telegram)
    assert notice.startswith("Sorry, job 1 failed: the image service is having trouble")
    assert "Generate: 0 of 1 used, 1 left" in usage


async def test_create_answer_lost_by_gateway_is_found_and_adopted(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """The prediction was created but a gateway answered 502: the bot finds it in Replicate's
    prediction list, adopts it instead of creating a second one, and delivers its image."""
    replicate.fail_after_create(502, b"<html>502 Bad Gateway</html>")
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(replicate.creates) == 1 and len(replicate.predictions) == 1
    assert len(replicate.lists) == 1
    assert "created_after" in replicate.lists[0].path
    assert row["provider_request_id"] == replicate.last_prediction.id
    (photo,) = telegram.photos(CHAT)
    assert photo.caption == "a lighthouse"


async def test_create_error_naming_its_prediction_is_adopted(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 500 whose body names the created prediction: that prediction is looked up directly
    (no list search) and adopted; one create, one image."""
    replicate.fail_after_create(500, lambda p: {"detail": "internal error", "id": p["id"]})
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(replicate.creates) == 1 and not replicate.lists
    assert row["provider_request_id"] == replicate.last_prediction.id
    assert len(telegram.photos(CHAT)) == 1


async def test_maybe_created_but_not_found_is_created_again(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 504 that created nothing: the list shows no prediction of ours, so the create is sent
    again; one prediction, one image."""
    replicate.fail_next("create", 504, {"detail": "gateway timeout"})
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(replicate.creates) == 2 and len(replicate.predictions) == 1
    assert len(replicate.lists) == 1
    assert len(telegram.photos(CHAT)) == 1


async def test_another_jobs_prediction_is_never_adopted(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Two jobs with the same prompt: the second one's create gets a 502 that created nothing;
    the first job's prediction matches its input but is taken, so a new one is created and each
    user gets an image of their own prediction."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate same prompt"))
        await settled(app)
        replicate.fail_next("create", 502, {"detail": "bad gateway"})
        telegram.push_update(updates.command("/generate same prompt"))
        first, second = await settled(app, 2)
    assert first["status"] == second["status"] == "succeeded"
    assert first["provider_request_id"] != second["provider_request_id"]
    assert len(replicate.predictions) == 2 and len(replicate.creates) == 3
    assert len(telegram.photos(CHAT)) == 2


async def test_maybe_created_and_lookup_failed_is_never_resent(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 502 to the create and the prediction list failing too: the bot cannot tell whether a
    prediction exists, so it does not create again (submit_unknown, the user is told once)."""
    replicate.fail_after_create(502, {"detail": "bad gateway"})
    replicate.fail_next("list", 500, {"detail": "internal error"})
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert (row["status"], row["error_code"]) == ("failed", "submit_unknown")
    assert len(replicate.creates) == 1
    assert len(failure_notices(telegram)) == 1


async def test_create_without_answer_is_never_resent(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A create sent with no answer (read timeout) may exist: failed submit_unknown after the
    one create, nothing looked up or resent."""
    replicate.delay_next("create", 1.5)
    async with bot(replicate={"request_timeout_s": 0.3}) as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert (row["status"], row["error_code"]) == ("failed", "submit_unknown")
    assert len(replicate.creates) == 1 and not replicate.lists


async def test_a_refused_prompt_is_not_retried(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A 422 is the request's own fault: one create, the job fails as invalid_input."""
    replicate.fail_next("create", 422, {"detail": "prompt: too long"})
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        (row,) = await settled(app)
    assert (row["status"], row["error_code"]) == ("failed", "invalid_input")
    assert len(replicate.creates) == 1


# -- fal ------------------------------------------------------------------------------------


def photo_upd(file_id: str, caption: str) -> dict[str, Any]:
    return updates.photo_message(file_id, width=64, height=48, caption=caption)


async def test_fal_submit_503_is_resent_and_delivered(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A 503 without fal's request id never reached the queue: submitted again, one request at
    fal, the edited photo delivered."""
    fal.fail_next("submit", 503, {"detail": "runner_scheduling_failure"})
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit make it blue"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(fal.submits) == 2 and len(fal.requests) == 1
    assert len(telegram.photos(CHAT)) == 1


async def test_fal_5xx_naming_its_request_is_adopted(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A 502 carrying x-fal-request-id: the request reached fal's queue, so the bot looks it up
    and adopts it; one submit, one request, the photo delivered."""
    fal.fail_after_submit(502)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit make it blue"))
        (row,) = await settled(app)
    assert row["status"] == "succeeded"
    assert len(fal.submits) == 1 and len(fal.requests) == 1
    assert row["provider_request_id"] == fal.last_request.id
    assert len(telegram.photos(CHAT)) == 1


async def test_fal_500_without_request_id_is_never_resent(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A 500 naming no request may have queued one that cannot be looked up: not resent
    (submit_unknown), the user told once."""
    fal.fail_after_submit(500, name_request=False)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit make it blue"))
        (row,) = await settled(app)
    assert (row["status"], row["error_code"]) == ("failed", "submit_unknown")
    assert len(fal.submits) == 1
    assert len(failure_notices(telegram)) == 1


async def test_fal_submit_429_three_times_fails_after_max_attempts(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """429 to every submit: exactly max_attempts submits, the job fails rate_limited and the
    user is told once that the service is busy."""
    fal.fail_next("submit", 429, {"detail": "Too many requests"}, {"Retry-After": "0"}, times=3)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit make it blue"))
        (row,) = await settled(app)
    assert (row["status"], row["error_code"]) == ("failed", "rate_limited")
    assert len(fal.submits) == 3 and not fal.requests
    (notice,) = failure_notices(telegram)
    assert "too busy" in notice
