"""JobRunner: claims queued jobs in FIFO order under `runner.max_running` (a cap across every
process on the database), runs each on PTB's JobQueue through the Pipeline, and adopts the
running jobs a dead or stopped process left, resuming each by phase.

It also owns a job's lifecycle around the pipeline: the user's cancel and the sweep (which end
a job whichever process runs it), adoption at start-up, dropping the runs this process no
longer owns (taken over, or ended elsewhere), and the shutdown that lets critical sections (a
submit in flight, a send and its record) finish and hands the rest back for adoption.

Several processes (issue 16): every write for a running job carries its owner and lease
token (see JobStore.update `fence`), so a process whose job was taken over writes nothing
more for it; side effects wait while the process is not `trusted` (Cluster.trusted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import structlog
from telegram.ext import CallbackContext, JobQueue

from imagebot import texts
from imagebot.clock import iso, parse_iso, utcnow
from imagebot.cluster import MAINTENANCE, Cluster
from imagebot.errors import DeliveryError, ExternalError
from imagebot.logs import get_logger
from imagebot.metrics import Metrics
from imagebot.models import IMAGES_MADE, CancelOutcome, Job, JobStatus, Phase
from imagebot.pipeline import CANCEL_TIMEOUT_S, JobGone, Pipeline, Untrusted
from imagebot.store.db import is_storage_fault
from imagebot.store.jobs import Claimed, JobStore

log = get_logger(__name__)
T = TypeVar("T")
# How long a claim that found no room is trusted without a word of a freed slot (a
# notification lost while the listener reconnects, a share grown as a process joined)
FULL_TRUST_S = 1.0


@dataclass
class _Run:
    job: Job
    task: asyncio.Task[Any]
    critical: asyncio.Task[Any] | None = None
    cancel_reason: str | None = None


class JobRunner:
    """Schedules, runs, cancels and recovers jobs."""

    def __init__(
        self, *, pipeline: Pipeline, store: JobStore, metrics: Metrics, cluster: Cluster
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.metrics = metrics
        self.cluster = cluster
        self.settings = pipeline.settings
        # A process without the worker role claims nothing (its handlers still create jobs).
        self.worker = cluster.has_role("worker")
        # No vendor call and no send while this process may have been declared dead.
        pipeline.trusted = lambda: cluster.trusted
        pipeline.progress.trusted = lambda: cluster.trusted
        cluster.on_lost(self.drop_all)
        self._launch: Callable[[int], object] | None = None
        self._scheduled: set[int] = set()  # jobs holding a provider slot
        # jobs whose images are made, being offered to Telegram again: no slot held
        self._slotless: set[int] = set()
        # jobs whose run stopped because the database refused a write: resumed once it
        # takes writes again (the row still says where they are)
        self._suspended: set[int] = set()
        # New jobs whose handler could not release them (a storage fault at that moment):
        # released by the next pump once writes work, not left held for the whole lease.
        self._unreleased: set[int] = set()
        self._writes_were_ok = True
        # Telegram refused the last delivery try: offer it one parked result at a time
        self._telegram_failing = False
        self._runs: dict[int, _Run] = {}
        self._pump_lock = asyncio.Lock()
        # A claim that found no room (the cap, or this node's share of it, all taken) is not
        # made again until a slot may have been freed (`room_may_have_freed`: a job ended
        # here or elsewhere, a process died, the periodic tend) or FULL_TRUST_S passed: at 200
        # updates a second each new job's release pumped every process, and each pump was a
        # claim transaction under the cluster-wide lock that could take nothing.
        self._frees = 0  # events that may have freed a slot, counted
        self._no_room: tuple[int, float] | None = None  # (_frees, monotonic) of that claim
        self._next_pump: asyncio.Future[None] | None = None  # the pump callers wait for
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._started = 0  # runs launched (recover reports how many it started)
        # Called when a job may have become claimable for other processes (released, or a
        # slot freed: the argument); app.py makes it a NOTIFY (issue 16). This process pumps
        # by itself.
        self.on_claimable: Callable[[bool], None] = lambda slot_freed: None
        # Read at scrape time, so the gauge is never behind the runner.
        metrics.jobs_running.set_function(lambda: len(self._scheduled))

    # -- scheduling ------------------------------------------------------------------------

    def attach(self, job_queue: JobQueue[Any]) -> None:
        """Run each job as a task of PTB's JobQueue (how the app runs them)."""

        def launch(job_id: int) -> None:
            # misfire_grace_time=None: a late job still runs (the default silently drops it).
            job_queue.run_once(
                self._job_callback,
                when=0,
                data=job_id,
                name=f"job-{job_id}",
                job_kwargs={"misfire_grace_time": None, "coalesce": False},
            )

        self._launch = launch

    def attach_launcher(self, launch: Callable[[int], object]) -> None:
        """Start jobs by calling `launch(job_id)`, which must see that `run(job_id)` is
        awaited (a test may collect the ids and run them itself, one by one)."""
        self._launch = launch

    @property
    def running_count(self) -> int:
        return len(self._scheduled)

    def runs(self, job_id: int) -> bool:
        """This process runs job `job_id` now (thread-safe: a set lookup)."""
        return job_id in self._runs or job_id in self._scheduled

    async def place_in_line(self, job_id: int) -> int | None:
        """Where job `job_id`, just created, stands: None when it would start at once (fewer
        than `runner.max_running` jobs hold a provider slot), else its 1-based place among
        the queued jobs. On a shared database the cluster-wide count and the place come in
        one query (each awaited query costs a handler a turn of a busy loop before its user
        sees an answer); on SQLite (one process) the count is this runner's own."""
        cap = self.settings.runner.max_running
        if self.store.db.shared and not self._stopping:
            placed = self.store.placed(job_id)  # read when the job was created
            if placed is None:
                try:
                    placed = await self.store.busy_and_position(job_id)
                except Exception as exc:
                    if not is_storage_fault(exc):
                        raise
            if placed is not None:
                busy, position = placed
                return None if busy < cap else position
        if not self._stopping and len(self._scheduled) < cap:
            return None
        return await self.store.queue_position(job_id)

    async def submit(self, job_id: int) -> bool:
        """A job was created: start it if a slot is free. True if it started (here, or in
        another process that claimed it first)."""
        await self.pump()
        if job_id in self._scheduled:
            return True
        if not self.store.db.shared:
            return False
        try:
            job = await self.store.get(job_id)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            return False
        return job is not None and job.status is not JobStatus.QUEUED

    async def release(self, job_id: int, *, written: bool = False) -> None:
        """The handler that created job `job_id` (held) is done with it: the runner may claim
        it. `written`: the hold was lifted already (with the status message id, see
        Progress.ensure_status), only the other processes are told. A storage fault now
        leaves the release to the next pump."""
        if written:
            self.on_claimable(False)
            return
        try:
            await self.store.release(job_id)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            self._unreleased.add(job_id)
            log.warning("job_release_deferred", job_id=job_id, error=str(exc))
        else:
            self.on_claimable(False)

    async def pump(self) -> None:
        """Release deferred holds and resume suspended jobs, then adopt ownerless running
        jobs and claim the oldest queued ones, under the cluster-wide cap (see
        JobStore.claim_next). Runs at every job's end, every `tend`, and when a job is made.

        Callers that ask while a pump runs share the next one, which starts once the running
        one has ended and so sees every job they made: at 200 updates a second each handler's
        own pump (a claim transaction under the cluster-wide claim lock) queued behind the
        others for seconds, and so did the update's handler and its chat's next update."""
        if self._stopping:
            return
        waiter = self._next_pump
        if waiter is not None:
            await asyncio.shield(waiter)
            return
        waiter = self._next_pump = asyncio.get_running_loop().create_future()
        try:
            async with self._pump_lock:
                if self._next_pump is waiter:
                    self._next_pump = None  # from here on, a caller needs a pump after this one
                await self._pump_once()
        finally:
            if self._next_pump is waiter:
                self._next_pump = None
            if not waiter.done():
                waiter.set_result(None)

    async def _pump_once(self) -> None:
        if self._stopping:
            return
        try:
            for job_id in sorted(self._unreleased):
                await self.store.release(job_id)
                self._unreleased.discard(job_id)
                self.on_claimable(False)
            if not self.worker or not self.cluster.trusted:
                return
            if self._suspended and self.store.db.writes.ok:
                await self._resume_suspended()
            no_room = self._no_room
            if (
                no_room is not None
                and no_room[0] == self._frees
                and time.monotonic() - no_room[1] < FULL_TRUST_S
            ):
                return  # nothing freed since the last claim found no room: it would take nothing
            frees = self._frees
            claimed = await self.store.claim_next(
                self.settings.runner.max_running,
                self.pipeline.timeouts,
                lease_s=self.cluster.config.lease_s,
            )
            self._no_room = (frees, time.monotonic()) if claimed.no_room else None
            self._take(claimed)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            log.warning("pump_store_fault", error=str(exc))

    def room_may_have_freed(self) -> None:
        """A slot may be free now (a job ended, here or elsewhere; a process died): the next
        pump claims again even if the last claim found no room."""
        self._frees += 1

    def _take(self, claimed: Claimed, *, slot: bool = True) -> None:
        """Start what a claim handed over; a job taken over from dead processes more than
        `cluster.max_rescues` times fails instead (it may be what killed them), unless its
        images are made: then the vendor's part and the image checks are behind it, and its
        photos may have reached the chat already (a process killed between a send and its
        record). Failing it would tell a user who has the photo that the job failed; it is
        delivered (at least once), as any made result."""
        for job in claimed:
            if job.id in claimed.adopted:
                log.warning(
                    "job_adopted",
                    job_id=job.id,
                    phase=job.phase.value,
                    rescues=job.rescues,
                    slot=slot,
                )
                if job.rescues > self.cluster.config.max_rescues and job.phase not in IMAGES_MADE:
                    self._in_background(self._give_up(job))
                    continue
            self._schedule(job, slot=slot)

    async def _give_up(self, job: Job) -> None:
        try:
            await self.pipeline.cancel_at_vendor(job)
            await self.pipeline.fail(
                job,
                "rescued_too_often",
                f"taken over from stopped processes {job.rescues} times",
            )
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            log.warning("rescue_give_up_store_fault", job_id=job.id, error=str(exc))

    async def _resume_suspended(self) -> None:
        """Put jobs a storage fault stopped back into slots, ahead of the queue; the fault
        was not theirs, so their deadline starts over. Jobs with made images are left to
        `tend` (they need no slot)."""
        for job_id in sorted(self._suspended):
            if len(self._scheduled) >= self.settings.runner.max_running:
                return
            # Left suspended until its row was read and its deadline moved: a storage fault
            # here (the first use of a connection a server restart broke) raises out of the
            # pump with the job still suspended, for the next pump (it was dropped from the
            # set before, and waited for the sweep: seen under the server-crash test).
            job = await self._resumable(job_id)
            self._suspended.discard(job_id)
            if job is not None:
                log.info("job_resumed", job_id=job.id, phase=job.phase.value)
                self._schedule(job)

    async def _resumable(self, job_id: int) -> Job | None:
        """The suspended job `job_id` with a fresh deadline, if it is still this process's
        to resume in a slot (None: ended, taken over, running, or its images made)."""
        job = await self.store.get(job_id)
        if job is None or job.status is not JobStatus.RUNNING:
            return None
        if job.owner != self.store.node_id:
            return None  # taken over meanwhile (this process was silent too long)
        if job.id in self._scheduled or job.id in self._slotless:
            return None
        if job.phase in IMAGES_MADE:
            return None
        timeout = self.pipeline.timeouts[job.kind]
        fresh = iso(utcnow() + timedelta(seconds=timeout))
        if not await self.store.update(job.id, fence=job, deadline_at=fresh):
            return None
        job.deadline_at = fresh
        return job

    def _schedule(self, job: Job, *, slot: bool = True) -> None:
        assert self._launch is not None, "attach() the JobQueue first"
        self._started += 1
        (self._scheduled if slot else self._slotless).add(job.id)
        self._launch(job.id)

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _job_callback(self, context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.job is not None
        await self.run(cast(int, context.job.data))

    async def run(self, job_id: int) -> None:
        """Run one scheduled job (in the current task) until it ends, parks or stops, then
        free its slot and look for more work."""
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
            self._slotless.discard(job_id)
            self.pipeline.progress.stop(job_id)
            structlog.contextvars.clear_contextvars()
            if not self._stopping:
                self.room_may_have_freed()
                self._in_background(self.pump())
                self.on_claimable(True)

    async def _run(self, job_id: int, task: asyncio.Task[Any]) -> None:
        try:
            await self._run_job(job_id, task)
        except Untrusted:
            self._suspended.add(job_id)
            log.warning("job_paused_untrusted", job_id=job_id)
        except JobGone:  # (from a park or a failure notice after the job was taken)
            log.info("job_left_running", job_id=job_id)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            # The database (or the results directory) refused a write: the row still says
            # where the job is, so stop here without failing it and resume once writes work.
            self._suspended.add(job_id)
            log.warning("job_suspended_store_fault", job_id=job_id, error=str(exc))

    async def _run_job(self, job_id: int, task: asyncio.Task[Any]) -> None:
        job = await self.store.get(job_id)
        if job is None or job.status.is_final:
            return
        if job.owner != self.store.node_id:
            log.info("job_not_ours", job_id=job_id, owner=job.owner)
            return  # ended here but taken over (or handed on) before this run began
        if not self.cluster.trusted:
            raise Untrusted  # resumed once a heartbeat succeeds again
        if self._stopping:
            # Shutdown began before this run was registered, so it was not told to stop and
            # the clients it would use are about to close: leave the row for the next start.
            return
        if (
            job_id in self._slotless
            and job.deliver_after
            and parse_iso(job.deliver_after) > utcnow()
        ):
            return  # parked again since it was found due: its next try is later
        run = self._runs[job_id] = _Run(job, task)
        # This task (the job's own) speaks the requester's language: status line, caption,
        # buttons, failure notice, whenever the job runs (after a restart too).
        texts.use_language(job.language)
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
        if job_id not in self._slotless:  # a parked result needs no new status line
            job = await self.pipeline.progress.ensure_status(job)

        async def critical(coro: Coroutine[Any, Any, T]) -> T:
            return await self._critical(run, coro)

        try:
            await self.pipeline.advance(job, critical)
            self._telegram_failing = False
        except Untrusted:
            raise
        except JobGone:
            log.info("job_left_running")
        except DeliveryError as exc:
            self.metrics.delivery_errors.labels(exc.code).inc()
            if exc.is_retryable and job.phase in IMAGES_MADE:
                # Telegram is down or busy, the images are made: wait for it without a slot.
                self._telegram_failing = True
                await self.pipeline.park(job, exc)
            else:
                await self.pipeline.fail(job, exc.code, str(exc))
        except ExternalError as exc:  # a vendor or media failure the boundary did not retry
            await self.pipeline.fail(job, exc.code, str(exc))
        except asyncio.CancelledError:
            if run.cancel_reason == "shutdown":
                current = await self.store.get(job_id)
                log.info("job_suspended", phase=current.phase.value if current else "gone")
            raise
        except Exception as exc:
            if is_storage_fault(exc):
                raise
            log.exception("job_crashed")
            await self.pipeline.fail(job, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _critical(self, run: _Run, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` (a step the pipeline marked critical: see pipeline.Critical) so that
        canceling the job does not cut it short: it runs as its own task, shielded from the
        job task's cancel, and is recorded on the run so that `_stop_run` (a user's cancel,
        the sweep) and `shutdown` wait for it before canceling the job's task."""
        task = asyncio.get_running_loop().create_task(coro)
        run.critical = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                run.critical = None

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
        if job.phase in IMAGES_MADE:
            return CancelOutcome.TOO_LATE
        await self._stop_run(job_id, "user")
        job = await self.store.get(job_id)
        assert job is not None
        if job.status.is_final:
            return CancelOutcome.FINISHED
        if job.phase in IMAGES_MADE:
            return CancelOutcome.TOO_LATE
        # Whichever process runs the job: the final write moves its lease token on, so that
        # process's next write is refused and it stops (its status line edits too).
        if not await self.pipeline.end(
            job, JobStatus.CANCELED, error_code="canceled", fenced=False
        ):
            # Final already, or its images were made meanwhile (on another process, maybe):
            # the result is on its way.
            latest = await self.store.get(job_id)
            if latest is not None and latest.phase in IMAGES_MADE:
                return CancelOutcome.TOO_LATE
            return CancelOutcome.FINISHED
        self.room_may_have_freed()
        self._in_background(self.pump())
        return CancelOutcome.CANCELED

    async def _stop_run(self, job_id: int, reason: str) -> None:
        """Cancel a job's task, letting a critical section (submit, delivery) finish first."""
        run = self._runs.get(job_id)
        if run is None:
            return
        run.cancel_reason = reason
        if run.critical is not None:
            await asyncio.wait([run.critical], timeout=CANCEL_TIMEOUT_S)
        run.task.cancel()
        await asyncio.wait([run.task], timeout=CANCEL_TIMEOUT_S)

    async def sweep(self) -> None:
        """Fail running jobs past their deadline plus slack, even if their task vanished."""
        slack = self.settings.runner.stale_slack_s
        if not self.store.db.writes.ok:
            return  # nothing could be recorded; a storage fault is no job's timeout
        swept = False
        for job in await self.store.overdue(utcnow(), slack):
            if job.id in self._suspended:
                continue  # stopped by a storage fault: resumed with a fresh deadline
            run = self._runs.get(job.id)
            if run is not None and job.phase is Phase.DELIVERING:
                continue  # the send is in flight; its own retries bound it
            await self._stop_run(job.id, "stale")
            fresh = await self.store.get(job.id)
            if fresh is None or fresh.status.is_final:
                continue
            await self.pipeline.cancel_at_vendor(fresh)
            structlog.contextvars.bind_contextvars(job_id=job.id, chat_id=job.chat_id)
            await self.pipeline.fail(
                fresh, "timeout", "still running after its deadline (sweep)", fenced=False
            )
            structlog.contextvars.clear_contextvars()
            self._scheduled.discard(job.id)
            swept = True
        if swept:
            self.on_claimable(True)  # (jobs of other processes too: their slots are free)
        self.room_may_have_freed()
        await self.pump()

    async def recover(self) -> int:
        """At start-up, once the cluster has reaped what dead processes left (on SQLite: every
        job of this process's last run): adopt the ownerless running jobs, resumed by phase
        (submitted: polled by the saved id; mid-submit: `submit_unknown`, never a second
        create), then fill free slots from the queue. Jobs whose images are made are offered
        to Telegram by `tend`, without a slot. Returns the number of jobs started."""
        before = self._started
        await self.tend()
        return self._started - before

    async def tend(self) -> None:
        """Periodic (delivery.check_interval_s): check the database takes writes when in
        doubt; start the deliveries and chat notices whose next try is due; resume jobs a
        storage fault stopped."""
        if self._stopping:
            return
        db = self.store.db
        cfg = self.settings.delivery
        if not db.writes.ok or time.monotonic() - db.writes.last_ok_at >= (
            cfg.write_probe_interval_s
        ):
            await db.probe_write()
        if not db.writes.ok:
            if self._writes_were_ok:
                log.error("store_writes_failing", error=db.writes.last_error)
            self._writes_were_ok = False
            return
        if not self._writes_were_ok:
            log.info("store_writes_recovered", suspended=len(self._suspended))
            self._writes_were_ok = True
        now = utcnow()
        if self.worker and self.cluster.trusted:
            async with self._pump_lock:
                due = await self.store.deliveries_due(now)  # own and ownerless ones
                for job in due:
                    if job.id in self._scheduled or job.id in self._slotless:
                        continue
                    if self._telegram_failing and self._slotless:
                        break  # while Telegram refuses, one parked result at a time probes it
                    self._suspended.discard(job.id)
                    one = Claimed([job])
                    one.adopted = due.adopted & {job.id}
                    self._take(one, slot=False)
        if self.cluster.holds(MAINTENANCE):
            # Chat tidy-ups a stopped run left: one process (the maintenance leader) sends them.
            for job in await self.store.unsettled(due_by=now):
                self._in_background(self.pipeline.settle_due(job.id))
        await self._drop_lost()
        self.room_may_have_freed()  # the periodic look whatever was missed
        await self.pump()

    async def _drop_lost(self) -> None:
        """Stop the runs of jobs this process no longer owns: canceled or swept by another
        process, or taken over after this one was silent too long (no write, no send)."""
        runs = [run.job for run in self._runs.values() if not run.job.status.is_final]
        for job_id in await self.store.not_owned(runs):
            log.warning("job_run_dropped", job_id=job_id, reason="no_longer_ours")
            await self._stop_run(job_id, "lost")

    async def drop_all(self) -> None:
        """This process was declared dead (Cluster.on_lost): others may run its jobs now.
        Stop every run at once, writing nothing for them; then the jobs still recorded as
        this node's (nobody reaped them yet: e.g. the database itself was away) lose their
        owner, so that they are adopted afresh rather than left running nowhere."""
        runs = list(self._runs.values())
        for run in runs:
            run.cancel_reason = "lost"
            run.task.cancel()
            if run.critical is not None:
                # a send or submit in flight finishes; its record is refused (the fence)
                run.critical.add_done_callback(_consume)
        self._suspended.clear()  # (their jobs are disowned below; held ones stay to release)
        if runs:
            log.warning("runs_dropped", job_ids=sorted(r.job.id for r in runs))
        try:
            disowned = await self.store.disown_running()
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            log.warning("disown_failed", error=str(exc))
            return
        if disowned:
            log.warning("jobs_disowned", job_ids=disowned)

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
        await self.pipeline.progress.aclose()
        # What this process ran goes back at once (owner cleared, token moved on): another
        # live process, or this one after its restart, adopts it without waiting for a lease.
        try:
            handed = await self.store.hand_back()
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            handed = []
            log.warning("hand_back_failed", error=str(exc))
        log.info("runner_stopped", suspended=len(runs), handed_back=handed)


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a dropped task's outcome (its failure was expected: it is not ours now)."""
    if not task.cancelled():
        task.exception()
