"""JobRunner: claims queued jobs in FIFO order under `limits.max_running`, runs each on PTB's
JobQueue, and resumes whatever a restart interrupted from the phase its row records.

The two durability rules live here: the vendor request id is committed before any waiting,
and a delivery is marked `delivering` before the send and its message ids are stored right
after. The sections that must not be cut short (a submit in flight, a send and its record) run
as shielded tasks that a shutdown waits for; everything else may be canceled and resumed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, TypeVar, cast

import structlog
from telegram.ext import CallbackContext, JobQueue
from tenacity import RetryCallState

from imagebot.bot import texts
from imagebot.config import Settings
from imagebot.delivery import Delivery, Sent
from imagebot.errors import (
    DeliveryError,
    MediaError,
    ProviderError,
    ProviderTimeout,
    SubmitOutcomeUnknown,
)
from imagebot.logs import get_logger, redact
from imagebot.metrics import Metrics
from imagebot.models import (
    ImageFile,
    Job,
    JobKind,
    JobStatus,
    Phase,
    PollResult,
    PollState,
    ProviderRequest,
)
from imagebot.progress import Progress
from imagebot.providers.base import ImageProvider
from imagebot.results import ResultFiles
from imagebot.retries import retrying
from imagebot.store.db import iso, parse_iso, utcnow
from imagebot.store.jobs import JobStore

log = get_logger(__name__)
T = TypeVar("T")

_RUNNING = (JobStatus.RUNNING,)
_CANCEL_TIMEOUT_S = 10.0


class _JobGone(Exception):
    """The row left `running` under us (canceled, swept): stop quietly."""


class CancelOutcome(StrEnum):
    CANCELED = "canceled"
    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"
    FINISHED = "finished"
    TOO_LATE = "too_late"


@dataclass
class _Run:
    job: Job
    task: asyncio.Task[Any]
    critical: asyncio.Task[Any] | None = None
    cancel_reason: str | None = None


class JobRunner:
    """Schedules, runs, cancels and recovers jobs."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        providers: Mapping[JobKind, ImageProvider],
        delivery: Delivery,
        progress: Progress,
        metrics: Metrics,
        results: ResultFiles,
        load_input: Callable[[Job], Awaitable[ImageFile]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.delivery = delivery
        self.progress = progress
        self.metrics = metrics
        self.results = results
        self.load_input = load_input
        self._job_queue: JobQueue[Any] | None = None
        self._scheduled: set[int] = set()
        self._runs: dict[int, _Run] = {}
        self._acks: dict[int, asyncio.Event] = {}
        self._pump_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        limits = settings.limits
        self._timeouts = {
            JobKind.GENERATE: settings.generate.timeout_s,
            JobKind.EDIT: settings.edit.timeout_s,
        }
        self._max_attempts = limits.max_attempts
        # Read at scrape time, so the gauge is never behind the runner.
        metrics.jobs_running.set_function(lambda: len(self._scheduled))

    # -- scheduling ------------------------------------------------------------------------

    def attach(self, job_queue: JobQueue[Any]) -> None:
        self._job_queue = job_queue

    @property
    def running_count(self) -> int:
        return len(self._scheduled)

    @asynccontextmanager
    async def acknowledging(self, update_id: int) -> AsyncIterator[None]:
        """Hold a new job's start until its handler has sent and saved the status message."""
        event = self._acks[update_id] = asyncio.Event()
        try:
            yield
        finally:
            event.set()
            self._acks.pop(update_id, None)

    async def submit(self, job_id: int) -> bool:
        """A job was created: start it if a slot is free. True if it started."""
        await self.pump()
        return job_id in self._scheduled

    async def pump(self) -> None:
        """Claim the oldest queued jobs into free slots and schedule them."""
        if self._stopping:
            return
        async with self._pump_lock:
            free = self.settings.limits.max_running - len(self._scheduled)
            for job in await self.store.claim_next(free, self._timeouts):
                self._schedule(job)
        counts = await self.store.counts()
        self.metrics.jobs_queued.set(counts["queued"])

    def _schedule(self, job: Job) -> None:
        assert self._job_queue is not None, "attach() the JobQueue first"
        self._scheduled.add(job.id)
        # misfire_grace_time=None: a late job still runs (the default silently drops it).
        self._job_queue.run_once(
            self._job_callback,
            when=0,
            data=job.id,
            name=f"job-{job.id}",
            job_kwargs={"misfire_grace_time": None, "coalesce": False},
        )

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _job_callback(self, context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.job is not None
        job_id = cast(int, context.job.data)
        task = asyncio.current_task()
        assert task is not None
        try:
            await self._run(job_id, task)
        except asyncio.CancelledError:
            run = self._runs.get(job_id)
            if run is None or run.cancel_reason is None:
                raise
            task.uncancel()
        finally:
            self._runs.pop(job_id, None)
            self._scheduled.discard(job_id)
            self.progress.stop(job_id)
            structlog.contextvars.clear_contextvars()
            if not self._stopping:
                self._in_background(self.pump())

    async def _critical(self, run: _Run, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` so that canceling the job does not cut it short."""
        task = asyncio.get_running_loop().create_task(coro)
        run.critical = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                run.critical = None

    # -- one job ---------------------------------------------------------------------------

    async def _run(self, job_id: int, task: asyncio.Task[Any]) -> None:
        job = await self.store.get(job_id)
        if job is None or job.status.is_final:
            return
        ack = self._acks.get(job.update_id)
        if ack is not None:
            await ack.wait()
            job = await self.store.get(job_id)
            if job is None or job.status.is_final:
                return
        run = self._runs[job_id] = _Run(job, task)
        structlog.contextvars.bind_contextvars(
            job_id=job.id,
            update_id=job.update_id,
            chat_id=job.chat_id,
            user_id=job.user_id,
            kind=job.kind.value,
            provider=job.provider,
        )
        log.info("job_started", phase=job.phase.value, attempt=job.attempts)
        if job.phase is Phase.NEW and job.attempts == 0 and job.started_at:
            wait = (parse_iso(job.started_at) - parse_iso(job.created_at)).total_seconds()
            self.metrics.queue_wait.labels(job.kind.value).observe(max(0.0, wait))
        job = await self.progress.ensure_status(job)
        try:
            await self._advance(run, job)
        except _JobGone:
            log.info("job_left_running")
        except (ProviderError, MediaError, DeliveryError) as exc:
            if isinstance(exc, DeliveryError):
                self.metrics.delivery_errors.labels(exc.code).inc()
            await self._fail(job, exc.code, str(exc))
        except asyncio.CancelledError:
            if run.cancel_reason == "shutdown":
                log.info("job_suspended", phase=(await self._phase(job_id)))
            raise
        except Exception as exc:
            log.exception("job_crashed")
            await self._fail(job, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _phase(self, job_id: int) -> str:
        job = await self.store.get(job_id)
        return job.phase.value if job else "gone"

    async def _set(self, job: Job, **values: Any) -> None:
        if not await self.store.update(job.id, expect=_RUNNING, **values):
            raise _JobGone
        for key, value in values.items():
            setattr(job, key, value)

    async def _advance(self, run: _Run, job: Job) -> None:
        provider = self.providers[job.kind]
        if job.phase is Phase.SUBMITTING:
            # We died between sending the submit and saving its id: it may exist at the
            # vendor, so sending it again could pay twice. Never resend blindly.
            raise SubmitOutcomeUnknown(provider.name, "stopped while a submit was in flight")
        resumed = job.phase is Phase.SUBMITTED
        if job.phase is Phase.NEW:
            await self._submit(run, job, provider)
        if job.phase is Phase.SUBMITTED:
            self.progress.working(job)
            result = await self._wait(job, provider, poll_first=resumed)
            images = await self._fetch(job, provider, result)
            paths = await self.results.save(job.id, images)
            await self._set(job, phase=Phase.FETCHED, result_paths=paths)
        else:
            images = await self.results.load(job.result_paths)
        await self._critical(run, self._deliver(job, images))
        await self._settle(job)

    # -- submit ----------------------------------------------------------------------------

    async def _submit(self, run: _Run, job: Job, provider: ImageProvider) -> None:
        if job.attempts >= self._max_attempts:
            raise ProviderError(provider.name, "no attempts left", code="too_many_attempts")
        deadline = self._deadline_monotonic(job)
        # The edit photo comes from Telegram: a network blip there is worth another try.
        async for attempt in retrying(
            attempts=self._max_attempts,
            base_s=self.settings.limits.retry_base_s,
            max_s=self.settings.limits.retry_max_s,
            deadline=deadline,
            before_sleep=self._on_retry(job, "input"),
        ):
            with attempt:
                request = await self._request_for(job)
        async for attempt in retrying(
            attempts=self._max_attempts - job.attempts,
            base_s=self.settings.limits.retry_base_s,
            max_s=self.settings.limits.retry_max_s,
            deadline=deadline,
            before_sleep=self._on_retry(job, "submit"),
        ):
            with attempt:
                if time.monotonic() >= deadline:
                    raise ProviderTimeout(provider.name, "deadline passed before submitting")
                await self._critical(run, self._submit_once(job, provider, request))

    async def _submit_once(
        self, job: Job, provider: ImageProvider, request: ProviderRequest
    ) -> None:
        await self._set(job, phase=Phase.SUBMITTING, attempts=job.attempts + 1)
        self.metrics.provider_calls.labels(provider.name, "submit").inc()
        try:
            request_id = await provider.submit(request)
        except ProviderError as exc:
            self.metrics.provider_errors.labels(provider.name, exc.code).inc()
            if not isinstance(exc, SubmitOutcomeUnknown):
                await self._set(job, phase=Phase.NEW)  # the vendor said no: nothing exists there
            raise
        await self._set(
            job, phase=Phase.SUBMITTED, provider_request_id=request_id, submitted_at=iso()
        )
        log.info("provider_submitted", request_id=request_id, attempt=job.attempts)

    async def _request_for(self, job: Job) -> ProviderRequest:
        image: ImageFile | None = None
        if job.kind is JobKind.EDIT:
            image = await self.load_input(job)
        return ProviderRequest(
            job_id=job.id,
            kind=job.kind,
            prompt=job.prompt,
            params=dict(job.params),
            image=image.data if image else None,
            image_mime=image.mime if image else None,
        )

    def _deadline_monotonic(self, job: Job) -> float:
        if not job.deadline_at:
            return time.monotonic() + self._timeouts[job.kind]
        remaining = (parse_iso(job.deadline_at) - utcnow()).total_seconds()
        return time.monotonic() + remaining

    def _on_retry(
        self, job: Job, call: str, persist: Callable[[int], Awaitable[None]] | None = None
    ) -> Callable[[RetryCallState], Awaitable[None]]:
        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            code = getattr(exc, "code", type(exc).__name__)
            self.metrics.provider_retries.labels(job.provider).inc()
            if persist is not None:
                await persist(state.attempt_number)
            log.warning(
                "provider_retry",
                call=call,
                attempt=state.attempt_number,
                error_code=code,
                wait_s=round(state.upcoming_sleep, 2),
            )

        return before_sleep

    # -- wait ------------------------------------------------------------------------------

    async def _wait(self, job: Job, provider: ImageProvider, *, poll_first: bool) -> PollResult:
        interval = self._poll_interval(provider)
        deadline = self._deadline_monotonic(job)
        started = time.monotonic()
        result: PollResult | None = None
        if poll_first:
            # After a restart the vendor may have finished while we were down: look first.
            result = await self._poll(job, provider)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while result is None or result.state is PollState.PENDING:
                    await asyncio.sleep(interval)
                    result = await self._poll(job, provider)
        except TimeoutError:
            await self._cancel_at_vendor(job, provider)
            raise ProviderTimeout(
                provider.name, f"no result within {self._timeouts[job.kind]:.0f} s"
            ) from None
        submitted = parse_iso(job.submitted_at) if job.submitted_at else None
        elapsed = (
            (utcnow() - submitted).total_seconds() if submitted else time.monotonic() - started
        )
        self.metrics.provider_time.labels(provider.name).observe(max(0.0, elapsed))
        if result.state is PollState.SUCCEEDED:
            await self._set(job, output_urls=list(result.output_urls))
            return result
        code = result.error_code or (
            "provider_canceled" if result.state is PollState.CANCELED else "model_error"
        )
        self.metrics.provider_errors.labels(provider.name, code).inc()
        raise ProviderError(provider.name, result.error or code, code=code)

    def _poll_interval(self, provider: ImageProvider) -> float:
        if provider.name == "replicate":
            return self.settings.replicate.poll_interval_s
        if provider.name == "fal":
            return self.settings.fal.poll_interval_s
        return 0.1

    async def _poll(self, job: Job, provider: ImageProvider) -> PollResult:
        assert job.provider_request_id is not None

        async def persist(failures: int) -> None:
            await self._set(job, poll_failures=failures)

        async for attempt in retrying(
            attempts=self._max_attempts - job.poll_failures,
            base_s=self.settings.limits.retry_base_s,
            max_s=self.settings.limits.retry_max_s,
            before_sleep=self._on_retry(job, "poll", persist),
        ):
            with attempt:
                self.metrics.provider_calls.labels(provider.name, "poll").inc()
                try:
                    result = await provider.poll(job.provider_request_id)
                except ProviderError as exc:
                    self.metrics.provider_errors.labels(provider.name, exc.code).inc()
                    raise
        if job.poll_failures:
            await self._set(job, poll_failures=0)
        return result

    async def _cancel_at_vendor(self, job: Job, provider: ImageProvider) -> None:
        if not job.provider_request_id:
            return
        self.metrics.provider_calls.labels(provider.name, "cancel").inc()
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                await provider.cancel(job.provider_request_id)
        except (ProviderError, TimeoutError) as exc:
            log.warning("provider_cancel_failed", error_code=getattr(exc, "code", "timeout"))
        else:
            log.info("provider_canceled", request_id=job.provider_request_id)

    # -- fetch and deliver -----------------------------------------------------------------

    async def _fetch(
        self, job: Job, provider: ImageProvider, result: PollResult
    ) -> list[ImageFile]:
        images: list[ImageFile] = []
        for url in result.output_urls:
            async for attempt in retrying(
                attempts=self._max_attempts,
                base_s=self.settings.limits.retry_base_s,
                max_s=self.settings.limits.retry_max_s,
                before_sleep=self._on_retry(job, "fetch"),
            ):
                with attempt:
                    self.metrics.provider_calls.labels(provider.name, "fetch").inc()
                    try:
                        images.append(await provider.fetch_output(url))
                    except MediaError as exc:
                        self.metrics.provider_errors.labels(provider.name, exc.code).inc()
                        raise
        return images

    async def _deliver(self, job: Job, images: list[ImageFile]) -> None:
        if job.phase is Phase.DELIVERING:
            # The last run died between a send and its record: the chat may get it twice.
            log.warning("delivery_repeated")
        await self._set(job, phase=Phase.DELIVERING)
        self.progress.stop(job.id)
        sent: Sent | None = None
        async for attempt in retrying(
            attempts=self._max_attempts,
            base_s=self.settings.limits.retry_base_s,
            max_s=self.settings.limits.retry_max_s,
        ):
            with attempt:
                sent = await self.delivery.send_results(
                    job.chat_id,
                    job.id,
                    images,
                    caption=texts.caption(job.prompt),
                    reply_to=job.command_message_id,
                )
        assert sent is not None
        finished = await self.store.finish(
            job.id,
            JobStatus.SUCCEEDED,
            phase=Phase.DELIVERING,  # until the status line is removed (see _settle)
            delivered_message_ids=sent.message_ids,
            result_file_ids=sent.file_ids,
        )
        if not finished:
            raise _JobGone
        job.status = JobStatus.SUCCEEDED
        elapsed = (utcnow() - parse_iso(job.created_at)).total_seconds()
        self.metrics.jobs_finished.labels(job.kind.value, JobStatus.SUCCEEDED.value).inc()
        self.metrics.end_to_end.labels(job.kind.value).observe(elapsed)
        self.metrics.cost_usd.labels(job.provider).inc(job.cost_estimate_usd)
        log.info(
            "job_delivered",
            outcome="succeeded",
            images=len(images),
            message_ids=sent.message_ids,
            duration_ms=int(elapsed * 1000),
        )

    async def _fail(self, job: Job, code: str, message: str) -> None:
        async def write() -> bool:
            # phase `delivering` until the user is told (see _settle).
            return await self.store.finish(
                job.id,
                JobStatus.FAILED,
                error_code=code,
                error_message=redact(message)[:500],
                phase=Phase.DELIVERING,
            )

        if not await asyncio.shield(write()):
            return
        self.metrics.jobs_finished.labels(job.kind.value, JobStatus.FAILED.value).inc()
        log.warning(
            "job_failed",
            outcome="failed",
            error_code=code,
            error=redact(message)[:300],
            duration_ms=int((utcnow() - parse_iso(job.created_at)).total_seconds() * 1000),
        )
        job.status, job.error_code = JobStatus.FAILED, code
        await self._settle(job)

    async def _settle(self, job: Job) -> None:
        """After a final status: tidy the chat (remove the status line, or turn it into the
        failure/cancel message), then record phase `done`.

        Final statuses are written with phase `delivering` first, so a crash in between is
        finished by `recover`; this step is at-least-once (best effort: a refused send is not
        retried forever).
        """
        if job.status is JobStatus.SUCCEEDED:
            await self.progress.done(job)
        elif job.status is JobStatus.CANCELED:
            await self.progress.ended(job, texts.status_canceled(job.id))
        else:
            await self.progress.ended(job, texts.job_failed(job.id, job.error_code))
        await self.store.update(job.id, phase=Phase.DONE)

    # -- cancel, sweep, recover, shutdown --------------------------------------------------

    async def cancel(self, job_id: int, *, user_id: int) -> CancelOutcome:
        """Cancel a user's queued or running job, at the vendor too; the quota unit returns."""
        job = await self.store.get(job_id)
        if job is None:
            return CancelOutcome.NOT_FOUND
        if job.user_id != user_id:
            return CancelOutcome.NOT_YOURS
        if job.status.is_final:
            return CancelOutcome.FINISHED
        if job.phase in (Phase.FETCHED, Phase.DELIVERING):
            return CancelOutcome.TOO_LATE
        await self._stop_run(job_id, "user")
        job = await self.store.get(job_id)
        assert job is not None
        if job.status.is_final:
            return CancelOutcome.FINISHED
        if job.phase in (Phase.FETCHED, Phase.DELIVERING):
            return CancelOutcome.TOO_LATE
        if not await self.store.finish(
            job_id, JobStatus.CANCELED, error_code="canceled", phase=Phase.DELIVERING
        ):
            return CancelOutcome.FINISHED
        self.metrics.jobs_finished.labels(job.kind.value, JobStatus.CANCELED.value).inc()
        log.info("job_canceled", job_id=job_id, outcome="canceled", by="user")
        await self._cancel_at_vendor(job, self.providers[job.kind])
        job.status = JobStatus.CANCELED
        await self._settle(job)
        self._in_background(self.pump())
        return CancelOutcome.CANCELED

    async def _stop_run(self, job_id: int, reason: str) -> None:
        """Cancel a job's task, letting a critical section (submit, delivery) finish first."""
        run = self._runs.get(job_id)
        if run is None:
            return
        run.cancel_reason = reason
        if run.critical is not None:
            await asyncio.wait([run.critical], timeout=_CANCEL_TIMEOUT_S)
        run.task.cancel()
        await asyncio.wait([run.task], timeout=_CANCEL_TIMEOUT_S)

    async def sweep(self) -> None:
        """Fail running jobs past their deadline plus slack, even if their task vanished."""
        slack = self.settings.limits.stale_slack_s
        for job in await self.store.overdue(utcnow(), slack):
            run = self._runs.get(job.id)
            if run is not None and job.phase is Phase.DELIVERING:
                continue  # the send is in flight; its own retries bound it
            await self._stop_run(job.id, "stale")
            fresh = await self.store.get(job.id)
            if fresh is None or fresh.status.is_final:
                continue
            await self._cancel_at_vendor(fresh, self.providers[fresh.kind])
            structlog.contextvars.bind_contextvars(job_id=job.id, chat_id=job.chat_id)
            await self._fail(fresh, "timeout", "still running after its deadline (sweep)")
            structlog.contextvars.clear_contextvars()
            self._scheduled.discard(job.id)
        await self.pump()

    async def recover(self) -> int:
        """At start-up: take up every running job again, then fill free slots from the queue."""
        running = await self.store.by_status(JobStatus.RUNNING)
        for job in running:
            if job.phase is not Phase.SUBMITTED:
                # Not yet at the vendor (or already back): the wait starts over.
                fresh = iso(utcnow() + timedelta(seconds=self._timeouts[job.kind]))
                await self.store.update(job.id, deadline_at=fresh)
            self._schedule(job)
        if running:
            log.info("jobs_recovered", count=len(running), job_ids=[j.id for j in running])
        for job in await self.store.unsettled():
            log.info("job_settled_late", job_id=job.id, status=job.status.value)
            self._in_background(self._settle(job))
        await self.pump()
        return len(running)

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking jobs; let critical sections finish; leave the rest resumable."""
        self._stopping = True
        runs = list(self._runs.values())
        critical = [run.critical for run in runs if run.critical is not None]
        for run in runs:
            run.cancel_reason = "shutdown"
            run.task.cancel()
        if critical:
            _, pending = await asyncio.wait(critical, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown_cut_critical_sections", count=len(pending))
        tasks = [run.task for run in runs]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for task in list(self._background):
            task.cancel()
        await self.progress.aclose()
        log.info("runner_stopped", suspended=len(runs))
