"""What the user sees while a job waits and works: the status message and the chat action.

Progress is best effort and must never crowd out results: edits are throttled per chat (slower
in groups), drawn from a small global budget that is skipped rather than waited for, and any
Telegram error here is logged and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiolimiter import AsyncLimiter

from imagebot import texts
from imagebot.config import ProgressSettings
from imagebot.delivery import Delivery, cancel_keyboard
from imagebot.errors import DeliveryError
from imagebot.logs import get_logger
from imagebot.models import Job
from imagebot.store.db import INTERACTIVE, is_storage_fault
from imagebot.store.jobs import JobStore

log = get_logger(__name__)

_PROGRESS_EDITS_PER_S = 8  # leaves most of Telegram's ~30/s for results


class Progress:
    """Status message and chat action of running and queued jobs."""

    def __init__(self, delivery: Delivery, store: JobStore, settings: ProgressSettings) -> None:
        self.delivery = delivery
        self.store = store
        self.settings = settings
        self._budget = AsyncLimiter(_PROGRESS_EDITS_PER_S, 1)
        self._last_edit: dict[int, float] = {}
        self._last_action: dict[int, float] = {}
        self._shown_position: dict[int, int] = {}
        self._tickers: dict[int, asyncio.Task[None]] = {}
        # Whether this process may send for its jobs now (Cluster.trusted; set by the app).
        self.trusted: Callable[[], bool] = lambda: True

    def _interval(self, job: Job) -> float:
        if job.chat_type == "private":
            return self.settings.edit_interval_s
        return self.settings.group_edit_interval_s

    def _may_edit(self, job: Job, *, force: bool = False) -> bool:
        now = time.monotonic()
        last = self._last_edit.get(job.chat_id)
        if not force and last is not None and now - last < self._interval(job):
            return False
        if not self._budget.has_capacity():
            return False
        self._last_edit[job.chat_id] = now
        return True

    async def _edit(self, job: Job, text: str, *, with_cancel: bool = True) -> bool:
        if job.status_message_id is None:
            return False
        with texts.speaking(job.language):
            markup = cancel_keyboard(job.id) if with_cancel else None
        await self._budget.acquire()
        try:
            ok = await self.delivery.edit_text(job.chat_id, job.status_message_id, text, markup)
        except DeliveryError as exc:
            log.info("progress_edit_failed", job_id=job.id, error_code=exc.code)
            return False
        return ok

    async def ensure_status(
        self, job: Job, *, queued_at: int | None = None, release: bool = False
    ) -> Job:
        """Send the status message, unless it was sent already (the handler sends it; the
        runner again if the handler could not, e.g. after a crash). `queued_at`: the job
        waits for a slot at this place in line. `release`: the write that saves the message
        id also lifts the job's hold (see JobStore.create `hold_s`): one write, not two."""
        if job.status_message_id is not None:
            return job
        with texts.speaking(job.language):
            if queued_at is None:
                text = texts.status_started(job.kind, job.id)
            else:
                text = texts.status_queued(job.id, queued_at)
            markup = cancel_keyboard(job.id)
        if queued_at is not None:
            self._shown_position[job.id] = queued_at
        try:
            message = await self.delivery.send_text(
                job.chat_id,
                text,
                reply_to=job.command_message_id,
                markup=markup,
            )
        except DeliveryError as exc:
            log.warning("status_message_failed", job_id=job.id, error_code=exc.code)
            return job
        job.status_message_id = message.message_id
        # the first answer to a waiting user: ahead of queued job writes (store.db INTERACTIVE)
        values: dict[str, Any] = {"status_message_id": message.message_id}
        if release:
            values["held_until"] = None
        await self.store.update(job.id, priority=INTERACTIVE, **values)
        return job

    async def show_queued(self, job: Job, position: int, *, force: bool = False) -> None:
        if self._shown_position.get(job.id) == position or not self._may_edit(job, force=force):
            return
        with texts.speaking(job.language):  # called for every waiting job, by a periodic task
            text = texts.status_queued(job.id, position)
        if await self._edit(job, text):
            self._shown_position[job.id] = position

    async def refresh_queue(self) -> None:
        """Tell waiting users their place in line when it changed (throttled per chat)."""
        positions = await self.store.queue_positions()
        if not positions:
            self._shown_position.clear()
            return
        for job in await self.store.by_ids(list(positions)):
            await self.show_queued(job, positions[job.id])

    def working(self, job: Job) -> None:
        """Start the ticker: elapsed time and 'sending photo' while the provider works."""
        self._shown_position.pop(job.id, None)
        self.stop(job.id)
        self._tickers[job.id] = asyncio.get_running_loop().create_task(
            self._tick(job), name=f"progress-{job.id}"
        )

    def stop(self, job_id: int) -> None:
        task = self._tickers.pop(job_id, None)
        if task is not None:
            task.cancel()

    async def _tick(self, job: Job) -> None:
        started = time.monotonic()
        last_shown = -1
        while True:
            if not self.trusted():
                return  # this process may have been declared dead: its jobs may be another's
            now = time.monotonic()
            due = (
                now - self._last_action.get(job.chat_id, 0) >= self.settings.chat_action_interval_s
            )
            # Best effort: when the budget is spent (a busy bot), this round's action is skipped.
            if due and self._budget.has_capacity():
                await self._budget.acquire()
                self._last_action[job.chat_id] = now
                try:
                    await self.delivery.chat_action(job.chat_id)
                except DeliveryError as exc:
                    log.info("chat_action_failed", job_id=job.id, error_code=exc.code)
            elapsed = int(now - started)
            if elapsed >= 2 and elapsed != last_shown and self._may_edit(job):
                last_shown = elapsed
                if job.owner is not None and not await self._still_ours(job):
                    # Canceled, swept or taken over by another process: its status line is
                    # theirs now (a "canceled" there must not turn back into "working").
                    return
                with texts.speaking(job.language):
                    text = texts.status_working(job.kind, job.id, elapsed)
                await self._edit(job, text)
            await asyncio.sleep(1.0)

    async def _still_ours(self, job: Job) -> bool:
        try:
            return await self.store.owns(job)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            return False  # nothing can be checked: skip this edit

    async def done(self, job: Job) -> bool:
        """The result arrived: remove the status message. False when Telegram could not take
        the request now (worth another try later); True when done or never possible."""
        self.stop(job.id)
        self._shown_position.pop(job.id, None)
        if job.status_message_id is None:
            return True
        try:
            await self.delivery.delete(job.chat_id, job.status_message_id)
        except DeliveryError as exc:
            log.info("status_delete_failed", job_id=job.id, error_code=exc.code)
            return not exc.is_retryable
        return True

    async def ended(self, job: Job, text: str) -> bool:
        """The job failed or was canceled: turn the status message into `text` (or send it).
        False when Telegram could not take it now (worth another try later)."""
        self.stop(job.id)
        self._shown_position.pop(job.id, None)
        try:
            if job.status_message_id is not None and await self.delivery.edit_text(
                job.chat_id, job.status_message_id, text
            ):
                return True
            await self.delivery.send_text(job.chat_id, text, reply_to=job.command_message_id)
        except DeliveryError as exc:
            log.warning(
                "final_message_failed",
                job_id=job.id,
                error_code=exc.code,
                will_retry=exc.is_retryable,
            )
            return not exc.is_retryable
        return True

    async def aclose(self) -> None:
        for job_id in list(self._tickers):
            self.stop(job_id)
