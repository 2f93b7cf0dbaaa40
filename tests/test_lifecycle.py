"""A job's lifecycle driven step by step, as arq tests its worker in burst mode: the real
Pipeline and JobRunner wired by `build` against the fake vendors and fake Telegram, a real store
on a temp SQLite file, no app boot (no intake, no ops server, no JobQueue): each test puts a job
row in a phase, runs one step (`advance`, `run`, `cancel`, `tend`, `settle_due`) and reads what
the chat, the vendor and the row say."""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from imagebot import texts
from imagebot.app import App, build
from imagebot.clock import iso, utcnow
from imagebot.models import Job, JobKind, JobStatus, NewJob, Phase, ProviderRequest
from imagebot.store.migrate import load_migrations, migrate
from tests import updates
from tests.conftest import SettingsFactory
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CHAT = updates.DEFAULT_CHAT_ID


@dataclass
class Allow:
    allowed: bool = True


@dataclass
class Rig:
    """The wired app (not started) and the jobs the runner asked to start."""

    app: App
    launched: list[int] = field(default_factory=list)

    @property
    def store(self) -> Any:
        return self.app.services.store

    @property
    def runner(self) -> Any:
        return self.app.services.runner

    @property
    def pipeline(self) -> Any:
        return self.app.services.runner.pipeline

    async def new_job(self, prompt: str = "a red fox", *, hold_s: float | None = None) -> Job:
        """A queued job, as the handler creates it (with its status message sent)."""
        new = NewJob(
            kind=JobKind.GENERATE,
            update_id=updates.next_update_id(),
            chat_id=CHAT,
            user_id=CHAT,
            chat_type="private",
            prompt=prompt,
            provider="replicate",
            params={"num_outputs": 1},
            cost_estimate_usd=0.003,
        )
        _, job = await self.store.create(new, lambda _: Allow(), hold_s=hold_s)
        assert job is not None
        return await self.app.services.progress.ensure_status(job)  # type: ignore[no-any-return]

    async def running_job(self, prompt: str = "a red fox", **row: Any) -> Job:
        """A job claimed by the runner (status running), its row then set to `row`."""
        job = await self.new_job(prompt)
        (claimed,) = await self.store.claim_next(2, self.pipeline.timeouts)
        assert claimed.id == job.id
        if row:
            await self.store.update(job.id, **row)
        fresh = await self.store.get(job.id)
        assert fresh is not None
        return fresh  # type: ignore[no-any-return]

    async def row(self, job_id: int) -> Job:
        job = await self.store.get(job_id)
        assert job is not None
        return job  # type: ignore[no-any-return]

    def finished(self, status: str) -> float:
        """imagebot_jobs_finished_total{kind=generate,status} so far."""
        value = self.app.services.metrics.registry.get_sample_value(
            "imagebot_jobs_finished_total", {"kind": "generate", "status": status}
        )
        return value or 0.0


async def whole(step: Coroutine[Any, Any, Any]) -> Any:
    """`critical` for a caller that never cancels: run the step as it is."""
    return await step


@pytest.fixture
async def rig(make_settings: SettingsFactory) -> AsyncIterator[Rig]:
    """The app's collaborators wired against the fakes, its database migrated, nothing run."""
    app = build(make_settings(runner={"max_running": 2}))
    await app.services.db.open()
    await migrate(app.services.db)
    await app.application.initialize()
    await app.services.cluster.start()  # the runner's jobs are owned by this node
    rig = Rig(app)
    app.services.runner.attach_launcher(rig.launched.append)
    try:
        yield rig
    finally:
        await app.services.cluster.stop()
        await app.services.progress.aclose()
        await app.application.shutdown()
        for provider in {id(p): p for p in app.providers.values()}.values():
            await provider.aclose()
        await app.fetcher.aclose()
        await app.services.db.close()


def photos(telegram: FakeTelegram) -> list[Any]:
    return [m for m in telegram.photos(CHAT) if not m.deleted]


async def test_new_job_goes_submitted_fetched_delivered(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """From phase new, one `advance` submits once, waits, fetches and delivers: the photo is in
    the chat, the status line is gone, the row ends succeeded/done with its message id."""
    job = await rig.running_job()
    await rig.pipeline.advance(job, whole)
    row = await rig.row(job.id)
    assert (row.status, row.phase) == (JobStatus.SUCCEEDED, Phase.DONE)
    assert len(replicate.creates) == 1 and row.attempts == 1
    (photo,) = photos(telegram)
    assert row.delivered_message_ids == [photo.message_id]
    assert row.result_paths and row.provider_request_id
    status_lines = [m for m in telegram.messages(CHAT, include_deleted=True) if m.kind == "text"]
    assert status_lines and all(m.deleted for m in status_lines)
    assert rig.finished("succeeded") == 1


async def test_resume_from_submitted_polls_and_never_resubmits(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A row in phase submitted (a restart) is polled for its saved request id and delivered,
    with no second create at the vendor."""
    first = await rig.running_job("first")
    await rig.pipeline.advance(first, whole)
    request_id = (await rig.row(first.id)).provider_request_id
    job = await rig.running_job(
        "again", phase=Phase.SUBMITTED, provider_request_id=request_id, attempts=1
    )
    await rig.pipeline.advance(job, whole)
    row = await rig.row(job.id)
    assert (row.status, row.phase) == (JobStatus.SUCCEEDED, Phase.DONE)
    assert len(replicate.creates) == 1  # only the first job's
    assert len(photos(telegram)) == 2


async def test_submitting_row_fails_submit_unknown_without_a_resend(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A row left in phase submitting (died with a submit in flight) is never sent again: the
    runner ends it failed `submit_unknown` and the user is told."""
    job = await rig.running_job(phase=Phase.SUBMITTING, attempts=1)
    await rig.runner.run(job.id)
    row = await rig.row(job.id)
    assert (row.status, row.phase, row.error_code) == (
        JobStatus.FAILED,
        Phase.DONE,
        "submit_unknown",
    )
    assert replicate.creates == []
    assert texts.job_failed(job.id, "submit_unknown") in telegram.texts(CHAT)
    assert rig.finished("failed") == 1


async def test_vendor_failure_ends_failed_and_tells_the_user(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A prediction the vendor fails ends the job failed through the one ending: the status
    line becomes the failure text, no photo is sent, jobs_finished{failed} counts it."""
    replicate.next_behaviours.append({"outcome": "failed", "error_text": "CUDA out of memory"})
    job = await rig.running_job()
    await rig.runner.run(job.id)
    row = await rig.row(job.id)
    assert (row.status, row.phase) == (JobStatus.FAILED, Phase.DONE)
    assert photos(telegram) == []
    assert any(t.startswith(f"Sorry, job {job.id} failed") for t in telegram.texts(CHAT))
    assert rig.finished("failed") == 1 and rig.finished("succeeded") == 0


async def test_cancel_of_a_job_at_the_vendor(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Canceling a running job asks the vendor to stop it, ends it canceled/done, turns its
    status line into the cancel text and counts jobs_finished{canceled}; a second cancel
    finds it finished."""
    replicate.next_behaviours.append({"latency_s": 600})
    provider = rig.pipeline.providers[JobKind.GENERATE]
    request_id = await provider.submit(
        ProviderRequest(job_id=0, kind=JobKind.GENERATE, prompt="slow", params={})
    )
    job = await rig.running_job(phase=Phase.SUBMITTED, provider_request_id=request_id, attempts=1)
    assert (await rig.runner.cancel(job.id, user_id=CHAT)).value == "canceled"
    row = await rig.row(job.id)
    assert (row.status, row.phase, row.error_code) == (JobStatus.CANCELED, Phase.DONE, "canceled")
    assert len(replicate.cancels) == 1
    assert texts.status_canceled(job.id) in telegram.texts(CHAT)
    assert rig.finished("canceled") == 1
    assert (await rig.runner.cancel(job.id, user_id=CHAT)).value == "finished"


async def test_telegram_outage_parks_the_result_and_tend_delivers_it(
    rig: Rig, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """When Telegram refuses the photo, the made result is parked (row running, next try
    planned, no slot held) instead of failing; once Telegram is back and the try is due,
    `tend` starts it and it is delivered, without a second create."""
    job = await rig.running_job()
    telegram.outage(502, methods=frozenset({"sendPhoto"}))
    await rig.runner.run(job.id)
    row = await rig.row(job.id)
    assert row.status is JobStatus.RUNNING and row.phase in (Phase.FETCHED, Phase.DELIVERING)
    assert row.deliver_after and row.delivery_attempts == 1 and row.delivery_waiting_since
    assert rig.runner.running_count == 0 and photos(telegram) == []
    telegram.end_outage()
    await rig.store.update(job.id, deliver_after=iso(utcnow() - timedelta(seconds=1)))
    rig.launched.clear()
    await rig.runner.tend()
    assert job.id in rig.launched and rig.runner.running_count == 0  # slotless
    await rig.runner.run(job.id)
    row = await rig.row(job.id)
    assert (row.status, row.phase) == (JobStatus.SUCCEEDED, Phase.DONE)
    assert row.deliver_after is None and len(photos(telegram)) == 1
    assert len(replicate.creates) == 1


async def test_failure_notice_waits_in_settling_and_is_retried(
    rig: Rig, telegram: FakeTelegram
) -> None:
    """A failure whose notice Telegram cannot take stays final in phase `settling` with a
    next try planned; `settle_due` sends it once due and the row reaches `done`."""
    job = await rig.running_job()
    telegram.outage(502, methods=frozenset({"editMessageText", "sendMessage"}))
    await rig.pipeline.fail(job, "model_error", "the model broke")
    row = await rig.row(job.id)
    assert (row.status, row.phase) == (JobStatus.FAILED, Phase.SETTLING)
    assert row.deliver_after and row.delivery_attempts == 1
    assert [j.id for j in await rig.store.unsettled()] == [job.id]
    telegram.end_outage()
    await rig.pipeline.settle_due(job.id)  # not due yet: nothing sent
    assert (await rig.row(job.id)).phase is Phase.SETTLING
    await rig.store.update(job.id, deliver_after=iso(utcnow() - timedelta(seconds=1)))
    await rig.pipeline.settle_due(job.id)
    row = await rig.row(job.id)
    assert row.phase is Phase.DONE and row.deliver_after is None
    assert texts.job_failed(job.id, "model_error") in telegram.texts(CHAT)
    assert rig.finished("failed") == 1  # counted once, at the ending, not per notice try


async def test_held_job_is_not_claimed_until_released(rig: Rig) -> None:
    """A job its handler still holds (status message not saved yet) is skipped by the claim;
    once released it starts; a hold whose process died is released when that process is
    reaped, and the job then starts."""
    held = await rig.new_job("held", hold_s=60)
    other = await rig.new_job("other")
    await rig.runner.pump()
    assert rig.launched == [other.id]
    await rig.store.release(held.id)
    await rig.runner.pump()
    assert rig.launched == [other.id, held.id]
    for job in (held, other):  # their slots free again
        await rig.store.finish(job.id, JobStatus.SUCCEEDED)
        await rig.runner.run(job.id)  # finds it final: does nothing but free the slot
    orphan = await rig.new_job("orphan", hold_s=60)
    await rig.runner.pump()
    assert orphan.id not in rig.launched
    await rig.app.services.db.execute_write(  # as if a process that has died created it
        "UPDATE jobs SET owner = 'dead-node' WHERE id = ?", (orphan.id,)
    )
    await rig.app.services.cluster.reap()
    await rig.runner.recover()
    assert orphan.id in rig.launched


async def test_migration_moves_old_untidied_final_rows_to_settling(
    make_settings: SettingsFactory,
) -> None:
    """Schema 6: final rows a version before it left in phase `delivering` (chat not tidied)
    become `settling`; a running job's `delivering` and finished rows stay as they were."""
    app = build(make_settings())
    db = app.services.db
    await db.open()
    try:
        before = [m for m in load_migrations(dialect=db.dialect) if m.name < "0006"]
        await migrate(db, before)
        stamp = iso()

        def insert(conn: Any) -> None:
            for n, (status, phase) in enumerate(
                [("failed", "delivering"), ("running", "delivering"), ("succeeded", "done")]
            ):
                conn.execute(
                    "INSERT INTO jobs (kind, status, phase, update_id, chat_id, user_id,"
                    " chat_type, prompt, provider, params, created_at, updated_at)"
                    " VALUES ('generate', ?, ?, ?, 1, 1, 'private', 'p', 'replicate', '{}',"
                    " ?, ?)",
                    (status, phase, 9000 + n, stamp, stamp),
                )

        await db.write(insert)
        await migrate(db)
        phases = [
            (r["status"], r["phase"])
            for r in await db.fetchall("SELECT status, phase FROM jobs ORDER BY id")
        ]
        assert phases == [
            ("failed", "settling"),
            ("running", "delivering"),
            ("succeeded", "done"),
        ]
    finally:
        await db.close()
        for provider in {id(p): p for p in app.providers.values()}.values():
            await provider.aclose()
        await app.fetcher.aclose()
