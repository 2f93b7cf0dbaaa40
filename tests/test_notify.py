"""Wake-ups across processes (issue 16): two bots on one PostgreSQL database, as two
processes behind a load balancer. A completion hint that reaches the process not running its
job wakes the job on the other one (NOTIFY); with the listener's connection killed, jobs still
finish (polling, and a look at every waiting job when the listener is back); a job created by
an intake-only process starts on a worker at once, not at the worker's next tend."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from imagebot.app import App
from imagebot.notify import LISTEN_APP_NAME, PgNotifier
from tests import updates
from tests.conftest import WEBHOOK_SECRET, SettingsFactory, running
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import query
from tests.support import deep_merge, scrape, value, webhook_url

CHAT = updates.DEFAULT_CHAT_ID
SLOW_POLL_S = 20.0  # a job here finishes within wait_until's bound only if something wakes it
HINTS = 20  # hints measured in the latency test


@asynccontextmanager
async def two_bots(
    make_settings: SettingsFactory,
    pg_url: str,
    a: dict[str, Any] | None = None,
    both: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[App, App]]:
    """Bots A and B in webhook mode on one PostgreSQL database (`a`: A's own sections,
    `both`: for both), polling the vendors too slowly to matter."""
    polls = {"poll_interval_s": SLOW_POLL_S}
    common: dict[str, Any] = {
        "telegram": {"mode": "webhook"},
        "webhook": {
            "hint_safety_poll_s": SLOW_POLL_S,
            "url": "http://127.0.0.1:9/telegram/webhook",
        },
        "replicate": polls,
        "fal": polls,
        "storage": {"database": pg_url},
    }
    common = deep_merge(common, both or {})
    async with (
        running(make_settings(**deep_merge(common, a or {}))) as first,
        running(make_settings(**common)) as second,
    ):
        yield first, second


def hint_path(replicate: FakeReplicate, n: int) -> tuple[int, str]:
    """(job id, path) of the hint URL the n-th create carried."""
    hook = replicate.creates[n].params["webhook"]
    path = "/" + hook.split("/", 3)[3]
    return int(path.rsplit("/", 2)[1]), path


async def post_hint(app: App, path: str) -> int:
    port = app.services.intake.webhook_port
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as resp:
        return resp.status


async def job_on_one(apps: tuple[App, App], job_id: int) -> tuple[App, App]:
    """(the bot running job `job_id`, the other one)."""
    await wait_until(lambda: any(app.services.runner.runs(job_id) for app in apps))
    owner = apps[0] if apps[0].services.runner.runs(job_id) else apps[1]
    return owner, apps[1] if owner is apps[0] else apps[0]


def listener_pid(app: App) -> int | None:
    notifier = app.services.notifier
    assert isinstance(notifier, PgNotifier)
    return notifier.listener_pid if notifier.listening else None


async def test_a_hint_on_the_other_process_wakes_the_job(
    make_settings: SettingsFactory,
    pg_url: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
) -> None:
    """Each of 20 jobs gets its completion hint at the process that does not run it; every
    one is woken on the other process and delivered long before its next poll would come."""
    replicate.callbacks_enabled = False  # the hints are posted here, to the other process
    replicate.latency_s = 0.05
    added: list[float] = []
    async with two_bots(make_settings, pg_url) as apps:
        for n in range(HINTS):
            receiver = apps[n % 2]  # updates reach both, as a load balancer spreads them
            update = updates.command(f"/generate kite {n}")
            assert await updates.post_webhook(webhook_url(receiver), update, WEBHOOK_SECRET) == (
                200,
                "",
            )
            await wait_until(lambda n=n: len(replicate.creates) == n + 1)
            job_id, path = hint_path(replicate, n)
            owner, other = await job_on_one(apps, job_id)
            await wait_until(lambda: replicate.last_prediction.is_final)
            polls = len(replicate.calls_of("get"))
            sent = time.time()
            assert await post_hint(other, path) == 204
            await wait_until(
                lambda n=n: len(telegram.photos(CHAT)) == n + 1, within=SLOW_POLL_S / 2
            )
            added.append(replicate.calls_of("get")[polls].at - sent)
            assert owner.services.runner.pipeline.hints.arriving
        forwarded = [await scrape(app) for app in apps]
    assert [p.caption for p in telegram.photos(CHAT)] == [f"kite {n}" for n in range(HINTS)]
    assert len(replicate.calls_of("get")) == HINTS  # one poll per job: the one its hint asked for
    assert (
        sum(value(s, "imagebot_completion_hints_total", verdict="accepted") for s in forwarded)
        == HINTS
    )
    ms = sorted(1000 * s for s in added)
    print(  # noqa: T201 - the figure for the report (pytest -s)
        f"\nhint at the other process -> status request: p50 {statistics.median(ms):.1f} ms,"
        f" p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms over {len(ms)}"
    )


async def test_jobs_finish_while_the_listener_is_away_and_it_comes_back(
    make_settings: SettingsFactory,
    pg_url: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
) -> None:
    """With every listener's connection terminated by the server, a job whose hint was sent
    meanwhile still finishes; the listeners reconnect (seen in pg_stat_activity under their
    application_name), and the next hint on the other process wakes its job again."""
    replicate.callbacks_enabled = False
    replicate.latency_s = 0.05
    async with two_bots(make_settings, pg_url) as apps:
        before = {listener_pid(app) for app in apps}
        assert None not in before
        listed = query(
            pg_url,
            "SELECT pid FROM pg_stat_activity WHERE application_name = ?"
            " AND datname = current_database()",
            (LISTEN_APP_NAME,),
        )
        assert {row[0] for row in listed} == before
        await updates.post_webhook(
            webhook_url(apps[0]), updates.command("/generate during"), WEBHOOK_SECRET
        )
        await wait_until(lambda: len(replicate.creates) == 1)
        job_id, path = hint_path(replicate, 0)
        _, other = await job_on_one(apps, job_id)
        await wait_until(lambda: replicate.last_prediction.is_final)
        killed = query(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = ? AND datname = current_database()",
            (LISTEN_APP_NAME,),
        )
        assert len(killed) == 2
        assert await post_hint(other, path) == 204  # may be lost: nobody listens right now
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=SLOW_POLL_S + 10)

        # Back, on new connections; and a hint at the other process wakes a job again.
        await wait_until(lambda: all(listener_pid(app) not in (None, *before) for app in apps))
        samples = await scrape(apps[0])
        assert value(samples, "imagebot_notify_listening") == 1
        await updates.post_webhook(
            webhook_url(apps[1]), updates.command("/generate after"), WEBHOOK_SECRET
        )
        await wait_until(lambda: len(replicate.creates) == 2)
        job_id, path = hint_path(replicate, 1)
        _, other = await job_on_one(apps, job_id)
        await wait_until(lambda: replicate.last_prediction.is_final)
        assert await post_hint(other, path) == 204
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2, within=SLOW_POLL_S / 2)
    assert [p.caption for p in telegram.photos(CHAT)] == ["during", "after"]


async def test_a_job_made_by_an_intake_process_starts_on_a_worker(
    make_settings: SettingsFactory,
    pg_url: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
) -> None:
    """A process with roles = ["intake"] saves the update and creates the job; the worker
    process starts it (it is told, not left to find it at its next tend) and delivers it."""
    replicate.latency_s = 0.05
    async with two_bots(
        make_settings,
        pg_url,
        a={"cluster": {"roles": ["intake"]}},
        # no tend for a minute: only being told makes the worker look at the queue
        both={"delivery": {"check_interval_s": 60}, "replicate": {"poll_interval_s": 0.05}},
    ) as (intake, worker):
        starts: list[float] = []
        for n in range(5):
            sent = time.time()
            await updates.post_webhook(
                webhook_url(intake), updates.command(f"/generate moon {n}"), WEBHOOK_SECRET
            )
            await wait_until(lambda n=n: len(replicate.creates) == n + 1)
            starts.append(replicate.creates[n].at - sent)
            job_id, _ = hint_path(replicate, n)
            assert worker.services.runner.runs(job_id) or len(telegram.photos(CHAT)) > n
            assert not intake.services.runner.runs(job_id)
            await wait_until(lambda n=n: len(telegram.photos(CHAT)) == n + 1)
    ms = sorted(1000 * s for s in starts)
    print(  # noqa: T201 - the figure for the report (pytest -s)
        f"\nupdate at the intake process -> vendor create by the worker: p50"
        f" {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms over {len(ms)}"
    )
