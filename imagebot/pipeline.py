"""The steps of one job: submit → save the vendor request id → wait → fetch → deliver → settle.

Each step records its phase in the job row first, so a restart resumes from the row. Two
durability rules live here: the vendor request id is committed before any waiting, and a
delivery is marked `delivering` before the send and its message ids are stored right after.
Every job ends through `end` (succeeded, failed or canceled): the final row with phase
`settling`, then the chat's tidy-up (`settle`), then phase `done`.
The sections that must not be cut short (a submit in flight, a send and its record) are run
through the `critical` callable the runner passes in (see `Critical`); everything else may be
canceled.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tenacity import RetryCallState

from imagebot import texts
from imagebot.breaker import CIRCUIT_OPEN, Breakers, is_vendor_failure
from imagebot.clock import iso, parse_iso, utcnow
from imagebot.config import Settings
from imagebot.delivery import Delivery, Sent, choice_rows
from imagebot.errors import (
    DeliveryError,
    ExternalError,
    MediaError,
    ProviderError,
    ProviderTimeout,
    SubmitOutcomeUnknown,
)
from imagebot.hints import CompletionHints
from imagebot.logs import get_logger, redact
from imagebot.metrics import Metrics
from imagebot.models import (
    IMAGES_MADE,
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
from imagebot.results import ResultStore
from imagebot.retries import retrying
from imagebot.store.jobs import JobStore

log = get_logger(__name__)
T = TypeVar("T")
# `critical(step)` runs `step` (a coroutine) to its end even if the job is canceled meanwhile,
# and returns its result. The pipeline wraps the two steps whose halves must not come apart:
# a submit and the record of its request id (else the vendor may run, and bill, a request we
# forgot), and a send and its record (else the chat gets the result twice). The runner owns
# cancellation, so it passes this in: its version (JobRunner._critical) runs the step as a
# task of its own that a user's cancel, the sweep and shutdown wait for before canceling the
# job's task. A caller that never cancels (a test) may pass `lambda step: step`.
Critical = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]

_RUNNING = (JobStatus.RUNNING,)
CANCEL_TIMEOUT_S = 10.0


class JobGone(Exception):
    """The job is no longer this process's to run: its row left `running` (canceled, swept)
    or another process took it over (its owner or lease token moved on). Stop quietly, with
    no further side effect."""


class Untrusted(JobGone):
    """This process's heartbeat is too old for it to be sure it still owns its jobs (it may
    have been declared dead: see Cluster.trusted): stop before any vendor call or send; the
    runner resumes the job once a heartbeat succeeds again (or drops it if it was taken)."""


class Pipeline:
    """Takes one running job from the phase its row records to a final status."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        providers: Mapping[JobKind, ImageProvider],
        delivery: Delivery,
        progress: Progress,
        metrics: Metrics,
        results: ResultStore,
        load_input: Callable[[Job], Awaitable[ImageFile]],
        hints: CompletionHints,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.delivery = delivery
        self.progress = progress
        self.metrics = metrics
        self.results = results
        self.load_input = load_input
        self.hints = hints
        self.timeouts = {kind: settings.operation(kind).timeout_s for kind in JobKind}
        self._max_attempts = settings.runner.max_attempts
        self.breakers = Breakers(
            threshold=settings.runner.circuit_failures,
            cooldown_s=settings.runner.circuit_cooldown_s,
            metrics=metrics,
            providers=sorted({p.name for p in providers.values()}),
        )
        # Called first in `settle` (every final status passes there): credits settle a job.
        self.on_final: Callable[[Job], Awaitable[None]] | None = None
        # Whether this process may start side effects for its jobs now (Cluster.trusted:
        # its heartbeat is recent enough that nobody can have taken its jobs over).
        self.trusted: Callable[[], bool] = lambda: True
        self._settling: set[int] = set()  # jobs whose chat is being tidied right now

    def _retrying(
        self,
        attempts: int | None = None,
        *,
        deadline: float | None = None,
        before_sleep: Callable[[RetryCallState], Awaitable[None]] | None = None,
    ) -> Any:
        runner = self.settings.runner
        return retrying(
            attempts=self._max_attempts if attempts is None else attempts,
            base_s=runner.retry_base_s,
            max_s=runner.retry_max_s,
            deadline=deadline,
            before_sleep=before_sleep,
        )

    async def set(self, job: Job, **values: Any) -> None:
        """Write columns of a running job (and mirror them on `job`), fenced by its owner and
        lease token; JobGone if it left running or is no longer ours."""
        if not await self.store.update(job.id, expect=_RUNNING, fence=job, **values):
            raise JobGone
        for key, value in values.items():
            setattr(job, key, value)

    def check_trusted(self) -> None:
        """Untrusted unless this process may start a side effect (a vendor create, a send)."""
        if not self.trusted():
            raise Untrusted

    async def advance(self, job: Job, critical: Critical) -> None:
        """Take a running job from the phase its row records to its ending (see `end`).

        Errors (ProviderError, MediaError, DeliveryError, JobGone) are the runner's to turn
        into `fail` or `park`; `critical` keeps a submit or a send whole (see `Critical`)."""
        provider = self.providers[job.kind]
        if job.phase is Phase.SUBMITTING:
            # We died between sending the submit and saving its id: it may exist at the
            # vendor, so sending it again could pay twice. Never resend blindly.
            raise SubmitOutcomeUnknown(provider.name, "stopped while a submit was in flight")
        resumed = job.phase is Phase.SUBMITTED
        if job.phase is Phase.NEW:
            await self._submit(job, provider, critical)
        if job.phase is Phase.SUBMITTED:
            self.progress.working(job)
            result = await self._wait(job, provider, poll_first=resumed)
            images = await self._fetch(job, provider, result)
            paths = await self.results.save(job.id, images)
            await self.set(
                job, phase=Phase.FETCHED, result_paths=paths, **self._image_counts(job, images)
            )
        else:
            images = await self.results.load(job.result_paths)
        # The send, its record and the chat's tidy-up: canceling the job must not split them.
        await critical(self._deliver(job, images))

    # -- submit ----------------------------------------------------------------------------

    async def _submit(self, job: Job, provider: ImageProvider, critical: Critical) -> None:
        if job.attempts >= self._max_attempts:
            raise ProviderError(provider.name, "no attempts left", code="too_many_attempts")
        deadline = self.deadline_monotonic(job)
        # The edit photo comes from Telegram: a network blip there is worth another try.
        async for attempt in self._retrying(
            deadline=deadline, before_sleep=self._on_retry(job, "input")
        ):
            with attempt:
                request = await self._request_for(job)
        # A create the vendor answered with 429/5xx created nothing (the provider looked up the
        # "maybe created" answers first): it is sent again with backoff, up to max_attempts.
        breaker = self.breakers.get(provider.name)
        async for attempt in self._retrying(
            self._max_attempts - job.attempts,
            deadline=deadline,
            before_sleep=self._on_retry(job, "submit"),
        ):
            with attempt:
                if time.monotonic() >= deadline:
                    raise ProviderTimeout(provider.name, "deadline passed before submitting")
                if not breaker.allow(job.id):
                    # The vendor is down (the circuit opened, maybe during our own retries):
                    # no more creates for this job.
                    self.metrics.provider_circuit_refusals.labels(provider.name).inc()
                    raise ProviderError(
                        provider.name, "the provider's circuit is open", code=CIRCUIT_OPEN
                    )
                await critical(self._submit_once(job, provider, request))

    async def _submit_once(
        self, job: Job, provider: ImageProvider, request: ProviderRequest
    ) -> None:
        self.check_trusted()
        await self.set(job, phase=Phase.SUBMITTING, attempts=job.attempts + 1)
        self.metrics.provider_calls.labels(provider.name, "submit").inc()
        breaker = self.breakers.get(provider.name)
        try:
            request_id = await provider.submit(request)
        except ProviderError as exc:
            self.metrics.provider_errors.labels(provider.name, exc.code).inc()
            if is_vendor_failure(exc, last_attempt=job.attempts >= self._max_attempts):
                breaker.failed(job.id)
            elif exc.code != "rate_limited":
                breaker.neutral(job.id)
            if not isinstance(exc, SubmitOutcomeUnknown):
                await self.set(job, phase=Phase.NEW)  # the vendor said no: nothing exists there
            raise
        breaker.succeeded(job.id)
        try:
            await self.set(
                job, phase=Phase.SUBMITTED, provider_request_id=request_id, submitted_at=iso()
            )
        except JobGone:
            # Canceled (or taken over) while the create was in flight: nobody else knows
            # this request, so stop it at the vendor rather than let it run (and bill).
            log.info("submitted_for_a_gone_job", request_id=request_id)
            await self.cancel_at_vendor(replace(job, provider_request_id=request_id))
            raise
        log.info("provider_submitted", request_id=request_id, attempt=job.attempts)

    async def _request_for(self, job: Job) -> ProviderRequest:
        image: ImageFile | None = None
        more: list[ImageFile] = []
        if job.kind is JobKind.EDIT:
            image = await self.load_input(job)
            # an album edit: the other photos, downloaded and checked the same way
            for file_id in job.input_file_ids[1:]:
                more.append(await self.load_input(replace(job, input_file_id=file_id)))
        elif job.kind is JobKind.UPSCALE:
            image = await self._upscale_input(job)
        return ProviderRequest(
            job_id=job.id,
            kind=job.kind,
            prompt=job.prompt + job.prompt_suffix,  # the style's words, recorded on the row
            params=dict(job.params),
            image=image.data if image else None,
            image_mime=image.mime if image else None,
            more_images=tuple((m.data, m.mime) for m in more),
            notify_url=self.hints.url_for(job.id),
            model=job.model,
        )

    async def _upscale_input(self, job: Job) -> ImageFile:
        """The result image to upscale: its full-size file on disk while it is kept, else the
        photo Telegram holds (downloaded by the bot: its URL never reaches the vendor)."""
        parent = await self.store.get(job.parent_job_id) if job.parent_job_id else None
        index = job.source_index or 0
        if parent is not None and index < len(parent.result_paths):
            try:
                return await self.results.load_one(parent.result_paths[index])
            except MediaError:
                log.info("upscale_input_from_telegram", parent_job_id=parent.id)
        return await self.load_input(job)

    def _image_counts(self, job: Job, images: list[ImageFile]) -> dict[str, Any]:
        """What a job with these images counts: a provider whose safety filter dropped some
        outputs (Replicate's FLUX does, silently) gave fewer than asked; caps, spend and
        credits count only those delivered, and the user is told about the rest."""
        asked = job.images_asked or len(images)
        withheld = max(0, asked - len(images))
        values: dict[str, Any] = {"images_delivered": len(images), "images_withheld": withheld}
        if withheld:
            per_image = job.cost_estimate_usd / asked if asked else 0.0
            values["cost_estimate_usd"] = round(per_image * len(images), 6)
            self.metrics.provider_errors.labels(job.provider, "safety_withheld").inc(withheld)
            log.warning("images_withheld", asked=asked, delivered=len(images), withheld=withheld)
        return values

    def deadline_monotonic(self, job: Job) -> float:
        if not job.deadline_at:
            return time.monotonic() + self.timeouts[job.kind]
        remaining = (parse_iso(job.deadline_at) - utcnow()).total_seconds()
        return time.monotonic() + remaining

    def _on_retry(
        self, job: Job, call: str, persist: Callable[[int], Awaitable[None]] | None = None
    ) -> Callable[[RetryCallState], Awaitable[None]]:
        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            code = exc.code if isinstance(exc, ExternalError) else type(exc).__name__
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
        interval = provider.poll_interval_s
        deadline = self.deadline_monotonic(job)
        started = last_poll = time.monotonic()
        result: PollResult | None = None
        if poll_first:
            # After a restart the vendor may have finished while we were down: look first.
            result = await self._poll(job, provider)
        try:
            with self.hints.waiting(job.id) as hinted:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    while result is None or result.state is PollState.PENDING:
                        # Polls keep to the interval from one start to the next (a poll's
                        # own round trip does not stretch it).
                        pause = self._wait_interval(interval) - (time.monotonic() - last_poll)
                        woken = await _sleep_unless(hinted, max(0.0, pause))
                        last_poll = time.monotonic()
                        result = await self._poll(job, provider)
                        if (
                            not woken
                            and not hinted.is_set()
                            and result.state is not PollState.PENDING
                        ):
                            self.hints.missed()
        except TimeoutError:
            await self.cancel_at_vendor(job)
            raise ProviderTimeout(
                provider.name, f"no result within {self.timeouts[job.kind]:.0f} s"
            ) from None
        submitted = parse_iso(job.submitted_at) if job.submitted_at else None
        elapsed = (
            (utcnow() - submitted).total_seconds() if submitted else time.monotonic() - started
        )
        self.metrics.provider_time.labels(provider.name).observe(max(0.0, elapsed))
        if result.state is PollState.SUCCEEDED:
            await self.set(job, output_urls=list(result.output_urls))
            return result
        code = result.error_code or (
            "provider_canceled" if result.state is PollState.CANCELED else "model_error"
        )
        self.metrics.provider_errors.labels(provider.name, code).inc()
        raise ProviderError(provider.name, result.error or code, code=code)

    def _wait_interval(self, interval: float) -> float:
        """While completion hints arrive, polling is only a safety net for a lost one."""
        if self.hints.arriving:
            return max(interval, self.settings.webhook.hint_safety_poll_s)
        return interval

    async def _poll(self, job: Job, provider: ImageProvider) -> PollResult:
        assert job.provider_request_id is not None

        async def persist(failures: int) -> None:
            await self.set(job, poll_failures=failures)

        async for attempt in self._retrying(
            self._max_attempts - job.poll_failures,
            before_sleep=self._on_retry(job, "poll", persist),
        ):
            with attempt:
                self.metrics.provider_calls.labels(provider.name, "poll").inc()
                try:
                    result: PollResult = await provider.poll(job.provider_request_id)
                except ProviderError as exc:
                    self.metrics.provider_errors.labels(provider.name, exc.code).inc()
                    raise
        if job.poll_failures:
            await self.set(job, poll_failures=0)
        return result

    async def cancel_at_vendor(self, job: Job) -> None:
        """Ask the vendor to stop the job's request (best effort, bounded)."""
        if not job.provider_request_id:
            return
        provider = self.providers[job.kind]
        self.metrics.provider_calls.labels(provider.name, "cancel").inc()
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await provider.cancel(job.provider_request_id)
        except ProviderError as exc:
            log.warning("provider_cancel_failed", error_code=exc.code)
        except TimeoutError:
            log.warning("provider_cancel_failed", error_code="timeout")
        else:
            log.info("provider_canceled", request_id=job.provider_request_id)

    # -- fetch and deliver -----------------------------------------------------------------

    async def _fetch(
        self, job: Job, provider: ImageProvider, result: PollResult
    ) -> list[ImageFile]:
        images: list[ImageFile] = []
        for url in result.output_urls:
            async for attempt in self._retrying(before_sleep=self._on_retry(job, "fetch")):
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
            # The last run died between a send and its record, or Telegram failed to answer
            # it: the chat may get it twice (the documented at-least-once window).
            log.warning("delivery_repeated", delivery_attempt=job.delivery_attempts)
        await self.set(job, phase=Phase.DELIVERING)
        self.progress.stop(job.id)
        self.check_trusted()
        sent: Sent | None = None
        # A parked result gets one try per turn: its backoff is between turns (see park).
        async for attempt in self._retrying(1 if job.delivery_attempts else None):
            with attempt:
                sent = await self.delivery.send_results(
                    job.chat_id,
                    job.id,
                    images,
                    caption=texts.result_caption(
                        job.prompt,
                        _style_name(self.settings, job),
                        job.images_withheld,
                        job.images_asked or len(images),
                    ),
                    reply_to=job.command_message_id,
                    extra_rows=choice_rows(job.id, _rerun_shapes(self.settings, job)),
                    spoiler=self.settings.delivery.spoiler,
                    # ⤴ Upscale and 🗑 Delete (issue 17); an upscale comes as a document
                    upscale=JobKind.UPSCALE in self.providers,
                    as_documents=job.kind is JobKind.UPSCALE,
                )
        assert sent is not None
        if not await self.end(job, JobStatus.SUCCEEDED, sent=sent, images=len(images)):
            raise JobGone

    # -- waiting for Telegram --------------------------------------------------------------

    def _next_try(self, job: Job) -> tuple[datetime, datetime, int] | None:
        """(waiting since, next try, attempt number) of a delivery Telegram refused, or None
        when `delivery.retry_window_s` has run out."""
        cfg = self.settings.delivery
        now = utcnow()
        since = parse_iso(job.delivery_waiting_since) if job.delivery_waiting_since else now
        window_end = since + timedelta(seconds=cfg.retry_window_s)
        if now >= window_end:
            return None
        attempt = job.delivery_attempts + 1
        wait = min(cfg.retry_max_s, cfg.retry_base_s * 2 ** min(attempt - 1, 30))
        wait *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret
        return since, min(now + timedelta(seconds=wait), window_end), attempt

    async def park(self, job: Job, exc: DeliveryError) -> None:
        """Telegram could not take a made result (unreachable, 5xx, flood): plan another
        try and let the job's task end, so it holds no provider slot while it waits. When
        `delivery.retry_window_s` has passed since the first refusal, the job fails
        `delivery_gave_up` (its quota unit returns, as for any failure)."""
        plan = self._next_try(job)
        if plan is None:
            window = self.settings.delivery.retry_window_s
            await self.fail(
                job,
                "delivery_gave_up",
                f"Telegram did not take the result within {window:.0f} s: {exc}",
            )
            return
        since, after, attempt = plan
        await self.set(
            job,
            deliver_after=iso(after),
            delivery_attempts=attempt,
            delivery_waiting_since=iso(since),
        )
        self.progress.stop(job.id)
        log.warning(
            "delivery_parked",
            error_code=exc.code,
            delivery_attempt=attempt,
            retry_in_s=round((after - utcnow()).total_seconds(), 1),
            waiting_s=round((utcnow() - since).total_seconds(), 1),
        )

    # -- endings ---------------------------------------------------------------------------

    async def end(
        self,
        job: Job,
        status: JobStatus,
        *,
        error_code: str | None = None,
        error: str = "",
        sent: Sent | None = None,
        images: int = 0,
        by: str = "user",
        fenced: bool = True,
    ) -> bool:
        """The one way a job ends (succeeded, failed, canceled): write the final row once,
        count `jobs_finished`, log the outcome, then tidy the chat (`settle`).

        The row is written with phase `settling` (the chat not tidied yet), so a crash before
        the tidy-up is finished later by `settle_due`. Returns False, doing nothing, when the
        job was final already (another ending got there first: a cancel, the sweep), or, for
        an unfenced ending, its images were made meanwhile (its runner delivers them).
        `sent`: the delivered result (succeeded); `error_code`/`error`: why it failed; `by`:
        who canceled it; `fenced=False`: a cancel or the sweep, which end the job whichever
        process runs it (the final write moves its lease token on, so that process stops).
        """
        values: dict[str, Any] = dict(_NOT_WAITING)  # a notice waits on its own clock
        if sent is not None:
            values.update(delivered_message_ids=sent.message_ids, result_file_ids=sent.file_ids)
        if error:
            values["error_message"] = redact(error)[:500]
        waited_since = job.delivery_waiting_since
        # Shielded: an ending that was decided is recorded even if our caller is canceled.
        finished = await asyncio.shield(
            self.store.finish(
                job.id,
                status,
                error_code=error_code,
                phase=Phase.SETTLING,
                fence=job if fenced else None,
                # Ended from outside its run (a cancel, the sweep): not once its images are
                # made, since its runner may be sending them this moment (another process).
                not_phases=() if fenced else IMAGES_MADE,
                **values,
            )
        )
        if not finished:
            return False
        _mirror(job, {**values, "status": status, "phase": Phase.SETTLING})
        job.error_code = error_code
        elapsed = (utcnow() - parse_iso(job.created_at)).total_seconds()
        self.metrics.jobs_finished.labels(job.kind.value, status.value).inc()
        if status is JobStatus.SUCCEEDED:
            self.metrics.end_to_end.labels(job.kind.value).observe(elapsed)
            self.metrics.cost_usd.labels(job.provider).inc(job.cost_estimate_usd)
            log.info(
                "job_delivered",
                job_id=job.id,
                outcome="succeeded",
                images=images,
                message_ids=job.delivered_message_ids,
                duration_ms=int(elapsed * 1000),
                # how long the result waited for Telegram (an outage), if it had to
                waited_for_telegram_s=round(
                    (utcnow() - parse_iso(waited_since)).total_seconds(), 1
                )
                if waited_since
                else None,
            )
        elif status is JobStatus.FAILED:
            log.warning(
                "job_failed",
                job_id=job.id,
                outcome="failed",
                error_code=error_code,
                error=redact(error)[:300],
                duration_ms=int(elapsed * 1000),
            )
        else:
            log.info("job_canceled", job_id=job.id, outcome="canceled", by=by)
            if not job.provider_request_id:
                # Another process may have saved the request id since `job` was read.
                current = await self.store.get(job.id)
                job.provider_request_id = current.provider_request_id if current else None
            await self.cancel_at_vendor(job)
        await self.settle(job)
        return True

    async def fail(self, job: Job, code: str, message: str, *, fenced: bool = True) -> None:
        """End the job `failed` and tell the user; its quota unit returns (see `end`)."""
        await self.end(job, JobStatus.FAILED, error_code=code, error=message, fenced=fenced)

    async def settle(self, job: Job) -> None:
        """After a final status: tidy the chat (remove the status line, or turn it into the
        failure/cancel message), then record phase `done`.

        Final statuses are written with phase `settling` first (see `end`), so a crash in
        between is finished later (`settle_due`); this step is at-least-once. When Telegram
        cannot take it now, the next try is planned on the row (deliver_after) and made by
        the runner's periodic `tend`, for up to `delivery.retry_window_s`.
        """
        if job.id in self._settling:
            return  # already being tidied (the inline ending and a late retry met)
        self._settling.add(job.id)
        try:
            await self._settle(job)
        finally:
            self._settling.discard(job.id)

    async def settle_due(self, job_id: int) -> None:
        """Tidy the chat of a final job whose earlier try did not get through, if still due."""
        if job_id in self._settling:
            return
        self._settling.add(job_id)
        try:
            job = await self.store.get(job_id)  # read after claiming: never a stale row
            if job is None or not job.status.is_final or job.phase is not Phase.SETTLING:
                return
            if job.deliver_after and parse_iso(job.deliver_after) > utcnow():
                return
            log.info(
                "job_settled_late",
                job_id=job.id,
                status=job.status.value,
                delivery_attempt=job.delivery_attempts,
            )
            await self._settle(job)
        finally:
            self._settling.discard(job_id)

    async def _settle(self, job: Job) -> None:
        if self.on_final is not None:
            # Credits: give back what a failed/canceled job reserved (idempotent: a retry
            # of this tidy-up settles nothing twice).
            await self.on_final(job)
        if job.status is JobStatus.SUCCEEDED:
            tidied = await self.progress.done(job)
        else:
            with texts.speaking(job.language):  # also when tidied from a maintenance task
                if job.status is JobStatus.CANCELED:
                    text = texts.status_canceled(job.id)
                else:
                    text = texts.job_failed(job.id, job.error_code)
            tidied = await self.progress.ended(job, text)
        if tidied:
            await self.store.update(job.id, phase=Phase.DONE, **_NOT_WAITING)
            return
        plan = self._next_try(job)
        if plan is None:
            log.warning("settle_gave_up", job_id=job.id, status=job.status.value)
            await self.store.update(job.id, phase=Phase.DONE, **_NOT_WAITING)
            return
        since, after, attempt = plan
        await self.store.update(
            job.id,
            deliver_after=iso(after),
            delivery_attempts=attempt,
            delivery_waiting_since=iso(since),
        )


def _style_name(settings: Settings, job: Job) -> str | None:
    """The style a result was made in, for its caption (when the operator has styles)."""
    found = next((s for s in settings.styles if s.id == job.style_id), None)
    return found.name if found else None


def _rerun_shapes(settings: Settings, job: Job) -> list[str]:
    """The shapes offered under a generated result (the same prompt again in that shape)."""
    if job.kind is not JobKind.GENERATE:
        return []
    return list(settings.generate.shapes)


_NOT_WAITING: dict[str, Any] = {
    "deliver_after": None,
    "delivery_attempts": 0,
    "delivery_waiting_since": None,
}


def _mirror(job: Job, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        setattr(job, key, value)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; return True early (and re-arm) when `event` is set."""
    if not event.is_set():
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
    event.clear()
    return True
