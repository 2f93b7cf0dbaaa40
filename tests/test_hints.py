"""Completion hints: in webhook mode Replicate and fal are given a per-job URL to call when a
request finishes, and the job polls at once instead of waiting out its poll interval."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from imagebot.hints import CompletionHints
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.front_door import FrontDoor
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import behind_front_door, scrape, value

CHAT = updates.DEFAULT_CHAT_ID
SLOW_POLL_S = 30.0  # without the hint no job here could finish within wait_until's bound


def hinted_bot(bot: Any, webhook: dict[str, Any] | None = None, **sections: Any) -> Any:
    """Webhook mode behind a FrontDoor (its URL is webhook.url), polls too slow to matter
    (unless `sections` say otherwise)."""
    polls = {"poll_interval_s": SLOW_POLL_S}
    return behind_front_door(bot, webhook, **{"replicate": polls, "fal": polls, **sections})


def hook_base(door: FrontDoor) -> str:
    return f"{door.url}/telegram/webhook/done/"


def no_secret_in(url: str) -> None:
    for secret in (BOT_TOKEN, WEBHOOK_SECRET, REPLICATE_TOKEN, FAL_KEY, FAL_KEY.split(":")[1]):
        assert secret not in url


async def post(url: str, body: bytes = b"{}") -> int:
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as resp:
        return resp.status


async def test_replicate_hint_wakes_the_job(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Replicate is asked to call <webhook.url>/done/<job>/<token> on completion (and only
    then); its call wakes the job, which delivers long before its next poll would have."""
    replicate.latency_s = 0.3
    async with hinted_bot(bot) as (app, door):
        update = updates.command("/generate a kite")
        assert await updates.post_webhook(
            f"{door.url}/telegram/webhook", update, WEBHOOK_SECRET
        ) == (200, "")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=SLOW_POLL_S / 3)
        samples = await scrape(app)

    body = replicate.creates[0].params
    hook = body["webhook"]
    assert hook.startswith(hook_base(door) + "1/")
    assert body["webhook_events_filter"] == ["completed"]
    no_secret_in(hook)
    assert replicate.callbacks == [(hook, 204)]
    # one poll right after the submit's wait began was skipped: the hint's poll found it done
    assert replicate.last_prediction.polls == 1
    assert telegram.photos(CHAT)[0].caption == "a kite"
    assert value(samples, "imagebot_completion_hints_total", verdict="accepted") == 1


async def test_fal_hint_wakes_the_edit(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """fal gets the hint URL as `fal_webhook` on the submit; its call wakes the edit job."""
    fal.latency_s = 0.3
    file_id = telegram.add_file(make_image(64, 48))
    async with hinted_bot(bot) as (_, door):
        update = updates.photo_message(file_id, width=64, height=48, caption="/edit make it red")
        await updates.post_webhook(f"{door.url}/telegram/webhook", update, WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=SLOW_POLL_S / 3)

    hook = fal.last_request.webhook_url
    assert hook is not None
    assert hook.startswith(hook_base(door) + "1/")
    no_secret_in(hook)
    assert fal.callbacks == [(hook, 204)]
    assert telegram.photos(CHAT)[0].caption == "make it red"


async def test_forged_hints_are_refused(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A wrong token, another job's token or a non-numeric id gets 403 and wakes nothing; a
    good token for a job that is not waiting is accepted and harmless."""
    replicate.callbacks_enabled = False  # only the calls made here
    replicate.latency_s = 0.3
    async with hinted_bot(bot) as (app, door):
        await updates.post_webhook(
            f"{door.url}/telegram/webhook",
            updates.command("/generate a boat"),
            WEBHOOK_SECRET,
        )
        await wait_until(lambda: len(replicate.creates) == 1)
        good = replicate.creates[0].params["webhook"]
        token = good.rsplit("/", 1)[1]
        base = hook_base(door)
        # Done at the vendor: from now on, any wake-up would poll and deliver at once.
        await wait_until(lambda: replicate.last_prediction.is_final)
        polls = len(replicate.calls_of("get"))
        assert await post(f"{base}1/{'0' * 32}") == 403
        assert await post(f"{base}2/{token}") == 403
        assert await post(f"{base}one/{token}") == 403
        assert await post(f"{base}99/{app.services.runner.pipeline.hints.token(99)}") == 204
        good_sent_at = time.time()
        assert await post(good) == 204
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=SLOW_POLL_S / 3)
        # Only the good hint woke the job: every poll since the forged ones came after it.
        woken = replicate.calls_of("get")[polls:]
        assert woken and all(call.at >= good_sent_at for call in woken)
        samples = await scrape(app)
    assert value(samples, "imagebot_completion_hints_total", verdict="forbidden") == 3
    assert value(samples, "imagebot_completion_hints_total", verdict="accepted") == 2


async def test_hints_can_be_turned_off(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """webhook.completion_hints = false: no URL goes to the vendor and no route listens."""
    async with hinted_bot(
        bot, {"completion_hints": False}, replicate={"poll_interval_s": 0.05}
    ) as (_, door):
        await updates.post_webhook(
            f"{door.url}/telegram/webhook",
            updates.command("/generate a tree"),
            WEBHOOK_SECRET,
        )
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        assert await post(f"{hook_base(door)}1/{'0' * 32}") in (404, 405)
    assert "webhook" not in replicate.creates[0].params


async def test_a_hint_before_the_wait_is_kept() -> None:
    """A vendor may call back before the job starts waiting: the wait then ends at once."""
    hints = CompletionHints(public_url="https://bot.example/telegram/webhook", secret="s3cret")
    hints.bind(asyncio.get_running_loop())
    hints.notify(7)
    await asyncio.sleep(0)  # the hand-over to the loop
    with hints.waiting(7) as event:
        await asyncio.wait_for(event.wait(), 1)
    url = hints.url_for(7)
    assert url is not None
    assert url.startswith("https://bot.example/telegram/webhook/done/7/")
    assert "s3cret" not in url
    assert hints.verify(7, url.rsplit("/", 1)[1])
    assert not hints.verify(8, url.rsplit("/", 1)[1])
    other = CompletionHints(public_url="https://bot.example/telegram/webhook", secret="other")
    assert other.token(7) != hints.token(7)
    assert CompletionHints(public_url=None, secret="s3cret").url_for(7) is None
    assert hints.arriving  # the hint above came
    hints.missed()
    assert not hints.arriving


async def test_polls_slow_down_once_hints_arrive(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Until a hint has arrived a job polls at replicate.poll_interval_s; after one, the next
    job polls only at webhook.hint_safety_poll_s and is finished by its hint alone."""
    replicate.latency_s = 0.4
    async with hinted_bot(
        bot, {"hint_safety_poll_s": SLOW_POLL_S}, replicate={"poll_interval_s": 0.05}
    ) as (_, door):
        url = f"{door.url}/telegram/webhook"
        await updates.post_webhook(url, updates.command("/generate one"), WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: len(replicate.callbacks) == 1)
        first = replicate.last_prediction
        await updates.post_webhook(url, updates.command("/generate two"), WEBHOOK_SECRET)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2, within=SLOW_POLL_S / 3)
        second = replicate.last_prediction
    assert first.polls >= 3  # 0.4 s at 0.05 s, no hint yet trusted
    assert second.polls == 1  # only the poll its hint asked for
    assert [status for _, status in replicate.callbacks] == [204, 204]
