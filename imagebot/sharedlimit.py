"""Telegram's outgoing limits shared by every process on one PostgreSQL (issue 16).

Telegram counts a bot token's sends, not a process's: three processes that each pace
themselves at the limit send three times too much. So on PostgreSQL every limited request
reserves its slot in the send_slots table (imagebot.store.sendslots: GCRA on the database
clock) and sleeps until it, and a 429 pushes the shared `global` slot forward so that every
process pauses. The same requests are limited as by the in-process TelegramRateLimiter:
- a send to a chat (sendMessage, sendPhoto, …) takes the chat's slot (1/s) or the group's
  (20/min), then the global one; the chat's next slot counts from the moment it was really
  sent and again from Telegram's answer; one process sends to one chat one request at a
  time, in order;
- progress traffic (edits, chat actions, deletions) takes the `progress` slot (a share of
  the overall rate) before the global one, so results never wait behind it;
- everything else limited takes the global slot; getUpdates, getMe, getFile, webhook calls
  and answerCallbackQuery pass at once (pre-checkout answers have their own Bot, unlimited).

When the database cannot be reached, a process paces itself in memory at its share of the
overall rate (the overall rate divided by the live processes it last counted, every 30 s from
the nodes table), logs that once, tries the database again after `RETRY_SHARED_S`, and logs
once when it is back. The chat spacing stays per process then: two processes sending to one
chat in that time may draw a 429, which is waited out and the message sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from imagebot.config import TelegramSettings
from imagebot.logs import get_logger
from imagebot.ratelimit import (
    _LOW_PRIORITY_SHARE,
    LOW_PRIORITY_METHODS,
    SEND_METHODS,
    TelegramRateLimiter,
)
from imagebot.store.db import is_storage_fault
from imagebot.store.sendslots import SendSlots, Slot

log = get_logger(__name__)

RETRY_SHARED_S = 5.0  # after a failed reservation, pace in memory this long before retrying
PRUNE_EVERY_S = 600.0
PEERS_EVERY_S = 30.0  # how often the number of live processes is read again
LATE_S = 0.02  # a send woken this much after its slot moves its chat's next slot on
# A slot reserved ahead (reserve_ahead) is used once the work before the send is done (a job's
# creation: ~0.1 s, 0.3 s at p99 at 200 updates/s): its chat's next slot is kept this much
# further off, so the send, that much later than its slot, needs no second round trip to move
# it. (A send later still moves it first, as any late send.)
AHEAD_SLACK_S = 0.5
AHEAD_KEEP_S = 30.0  # a slot reserved ahead, unused this long, is dropped when many are kept
_MAX_AHEAD = 4096
_MAX_GATE_TRIES = 1000  # bounded: a chat kept busy by other processes this long goes anyway


class SharedRateLimiter(TelegramRateLimiter):
    """TelegramRateLimiter whose slots live in the database (several processes share them)."""

    def __init__(
        self,
        settings: TelegramSettings,
        slots: SendSlots,
        on_flood_wait: Callable[[float], None] | None = None,
        *,
        peers: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        super().__init__(settings, on_flood_wait)
        self._slots = slots
        self._rate = settings.rate_overall_per_s
        self._global_step = 1 / self._rate
        self._progress_step = 1 / max(1.0, self._rate * _LOW_PRIORITY_SHARE)
        self._progress_lock = asyncio.Lock()
        self._peers = peers  # how many processes are live now (they share the rate)
        self._known_peers = 1
        self._next_peers = 0.0
        self._peers_task: asyncio.Task[None] | None = None
        self._local_until = 0.0  # monotonic: pace in memory until then (database away)
        self._local = False
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        self._prune_task: asyncio.Task[None] | None = None
        # chat id -> its slot reserved ahead (reserve_ahead): the task asking, and since when
        self._ahead: dict[int | str, tuple[asyncio.Task[tuple[Slot, float]], float]] = {}
        #: seconds each reservation took (the database round trip), for the benchmark
        self.reservation_s: list[float] = []
        self.keep_timings = False

    async def shutdown(self) -> None:
        for ask, _ in self._ahead.values():
            ask.cancel()
        self._ahead.clear()
        tasks = (self._prune_task, self._peers_task)
        self._prune_task = self._peers_task = None
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def reserve_ahead(self, chat_id: int) -> None:
        """A send to `chat_id` follows shortly (a request's answer, while its job is being
        made): ask for its slot now, alongside, so that the send finds it answered rather
        than waiting for a round trip of its own (a writer's and two turns of the busy event
        loop: 100-150 ms p50 at 200 updates/s). The next send to the chat here takes it."""
        if time.monotonic() < self._local_until or chat_id in self._ahead:
            return
        if len(self._ahead) >= _MAX_AHEAD:  # bounded: drop what is too old to be used
            now = time.monotonic()
            for key, (_, since) in list(self._ahead.items()):
                if now - since > AHEAD_KEEP_S:
                    self._ahead.pop(key)[0].cancel()
            if len(self._ahead) >= _MAX_AHEAD:
                return
        gate = self._gate("sendMessage", chat_id)
        assert gate is not None
        ask = asyncio.get_running_loop().create_task(
            self._ask((gate[0], gate[1] + AHEAD_SLACK_S)), name="send-slot-ahead"
        )
        ask.add_done_callback(_retrieved)
        self._ahead[chat_id] = (ask, time.monotonic())

    async def _ask(self, gate: tuple[str, float]) -> tuple[Slot, float]:
        """A reservation behind `gate`, and time.monotonic() when its answer came."""
        slot = await self._slots.reserve(self._global_step, gate)
        return slot, time.monotonic()

    def _take_ahead(self, chat_id: int | str) -> asyncio.Task[tuple[Slot, float]] | None:
        """The chat's slot asked for ahead, if any (however old: a slot long past makes the
        send late, which moves the chat's next slot on before it goes)."""
        taken = self._ahead.pop(chat_id, None)
        return taken[0] if taken is not None else None

    def _gate(self, endpoint: str, chat_id: int | str | None) -> tuple[str, float] | None:
        if chat_id is not None and endpoint in SEND_METHODS:
            slot = self._slot(chat_id)  # the in-process lock and the spacing for this chat
            is_group = isinstance(chat_id, str) or chat_id < 0
            return (f"{'group' if is_group else 'chat'}:{chat_id}", slot.period)
        if endpoint in LOW_PRIORITY_METHODS:
            return ("progress", self._progress_step)
        return None

    async def _send(
        self,
        callback: Callable[..., Coroutine[Any, Any, Any]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        chat_id: int | str | None,
    ) -> Any:
        if time.monotonic() < self._local_until:
            return await super()._send(callback, args, kwargs, endpoint, chat_id)
        gate = self._gate(endpoint, chat_id)
        if gate is not None and gate[0] != "progress":
            assert chat_id is not None
            async with self._slot(chat_id).lock:  # this process: one send per chat at a time
                if await self._reserve(gate, self._take_ahead(chat_id)):
                    await self._open.wait()
                    try:
                        return await callback(*args, **kwargs)
                    finally:
                        await self._hold_after(gate)
        else:
            lock = self._progress_lock if gate is not None else contextlib.nullcontext()
            async with lock:  # this process: one progress request asks at a time
                reserved = await self._reserve(gate)
            if reserved:
                await self._open.wait()
                return await callback(*args, **kwargs)
        # the database is away: this process paces itself (outside the chat's lock, which
        # the in-memory path takes again)
        return await super()._send(callback, args, kwargs, endpoint, chat_id)

    async def _reserve(
        self,
        gate: tuple[str, float] | None,
        ahead: asyncio.Task[tuple[Slot, float]] | None = None,
    ) -> bool:
        """Reserve a slot and sleep until it; False when the database could not be asked.
        `ahead`: the chat's slot asked for already (reserve_ahead), used first."""
        try:
            for _ in range(_MAX_GATE_TRIES):
                started = time.perf_counter()
                if ahead is not None:
                    # answered a while ago, maybe: its wait counts from then, and the chat's
                    # next slot was kept AHEAD_SLACK_S further off for the send to be late
                    slot, answered = await ahead
                    slack, ahead = AHEAD_SLACK_S, None
                else:
                    slot = await self._slots.reserve(self._global_step, gate)
                    answered, slack = time.monotonic(), 0.0
                if self.keep_timings:
                    self.reservation_s.append(time.perf_counter() - started)
                self._shared_again()
                due = answered + slot.wait_s
                wait_s = due - time.monotonic()
                if wait_s <= 0 and slot.reserved and -wait_s <= slack + LATE_S:
                    # The slot is now: send without a sleep(0), whose turn of a busy event
                    # loop (100+ ms at 200 updates/s) made nearly every send "late" and cost
                    # it a second reservation round trip (the hold below) before it went.
                    self._background()
                    return True
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if slot.reserved:
                    late = time.monotonic() - due
                    if gate is not None and late > slack + LATE_S:
                        # this send goes later than its slot (a busy event loop): the chat's
                        # spacing counts from now, not from the slot
                        await self._slots.hold(gate[0], gate[1])
                    self._background()
                    return True
            # other processes kept this chat busy all along: go with the global slot alone
            slot = await self._slots.reserve(self._global_step)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            self._go_local(exc)
            return False
        await asyncio.sleep(slot.wait_s)
        return True

    async def _hold_after(self, gate: tuple[str, float]) -> None:
        """Telegram has answered: the chat's next send goes no sooner than a step from now.
        (Telegram times a request when it arrives, which may be later than when it left:
        an upload, a busy event loop on either side. Counting from the answer is safe.)"""
        try:
            await self._slots.hold(gate[0], gate[1])
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            self._go_local(exc)

    def _go_local(self, exc: BaseException) -> None:
        self._local_until = time.monotonic() + RETRY_SHARED_S
        if self._local:
            return
        self._local = True
        peers = self._known_peers
        rate = self._rate / peers
        self._set_overall_rate(rate)
        log.warning(
            "telegram_send_limit_local",
            error=f"{type(exc).__name__}: {exc}"[:200],
            rate_overall_per_s=round(rate, 2),
            processes=peers,
        )

    def _shared_again(self) -> None:
        if self._local:
            self._local = False
            log.info("telegram_send_limit_shared")

    async def _flood_pause(self, wait: float) -> None:
        """Push the shared global slot past the wait (every process pauses), and pause here."""
        try:
            await self._slots.pause(wait)
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            self._go_local(exc)
        await super()._flood_pause(wait)

    def _background(self) -> None:
        """While the database answers: now and then prune old rows and count the processes
        (the share to keep to should it stop answering)."""
        now = time.monotonic()
        if now >= self._next_prune and (self._prune_task is None or self._prune_task.done()):
            self._next_prune = now + PRUNE_EVERY_S
            self._prune_task = asyncio.create_task(self._prune(), name="send-slots-prune")
        if (
            self._peers is not None
            and now >= self._next_peers
            and (self._peers_task is None or self._peers_task.done())
        ):
            self._next_peers = now + PEERS_EVERY_S
            self._peers_task = asyncio.create_task(self._count_peers(), name="send-limit-peers")

    async def _count_peers(self) -> None:
        assert self._peers is not None
        try:
            self._known_peers = max(1, await self._peers())
        except Exception as exc:
            if not is_storage_fault(exc):
                raise

    async def _prune(self) -> None:
        try:
            removed = await self._slots.prune()
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            return
        if removed:
            log.info("send_slots_pruned", rows=removed)


def _retrieved(task: asyncio.Task[tuple[Slot, float]]) -> None:
    """A slot asked for ahead and never used (or failed): its outcome is not an error to
    report (a storage fault meets the send that would have used it, as its own ask would)."""
    if not task.cancelled():
        task.exception()
