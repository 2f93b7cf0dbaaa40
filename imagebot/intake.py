"""Durable intake: every update is committed to the inbox before Telegram is told it arrived.

PTB's Updater confirms polled updates and answers webhooks before handlers run, so the
Application is built with `updater(None)` and this module feeds it:
- webhook: an aiohttp route checks the secret header (constant time), commits the raw update,
  answers an empty 200, and queues the update;
- polling: a getUpdates loop commits each batch before asking with the next offset (which is
  what confirms the batch to Telegram), backing off on errors instead of spinning.
Saved-but-unprocessed updates are replayed at start-up; a repeat of a known update_id is
dropped before it reaches any handler.

Poison never stops anything: the webhook answers 4xx to bodies Telegram would never send; a
saved update PTB cannot parse, or whose handler raises, is closed in the inbox with the reason
(`failure` column, `imagebot_updates_poisoned_total{reason}`), live and at replay alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from aiohttp import web
from telegram import Update
from telegram.error import Conflict, InvalidToken, NetworkError, TelegramError, TimedOut
from telegram.ext import Application, BaseUpdateProcessor, CallbackContext

from imagebot.cluster import MAINTENANCE, POLLER, Cluster
from imagebot.config import Settings
from imagebot.hints import ROUTE_SUFFIX, CompletionHints
from imagebot.logs import get_logger
from imagebot.metrics import Metrics
from imagebot.store.db import is_storage_fault
from imagebot.store.inbox import Inbox, failure_text, update_kind
from imagebot.threaded_site import ThreadedSite

log = get_logger(__name__)

ALLOWED_UPDATES = ["message", "callback_query", "pre_checkout_query"]
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
_MAX_BACKOFF_S = 30.0
_MAX_TRACKED = 10_000
# PTB's own bound on concurrent updates, out of reach on purpose (PerChatUpdateProcessor).
_PTB_UNBOUNDED = 2**31 - 1
MAX_BODY_BYTES = 2 * 1024 * 1024
# A chat's update waiting for the chat's earlier one on another process: poll delays.
_ORDER_POLL_FIRST_S, _ORDER_POLL_MAX_S = 0.05, 1.0
# Telegram's updates nest a dozen levels at most (a reply inside a callback's message, ...).
MAX_JSON_DEPTH = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _odd_value(payload: dict[str, Any]) -> str | None:
    """Why a decoded body is not something Telegram sends: too deep, text with lone
    surrogates (SQLite cannot store it), integers past 64 bits; None when it is fine.

    Walks with its own stack: every node once, so bounded by the size of the body.
    """
    stack: list[tuple[object, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_JSON_DEPTH:
                return "too_deep"
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return "bad_text"
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                return "too_deep"
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                return "bad_text"
        elif isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            return "int_out_of_range"
    return None


def parse_webhook_body(raw: bytes) -> dict[str, Any] | str:
    """The update in a webhook body, or the reason (a short word) it is not one Telegram
    would send: not UTF-8, not JSON, not an object, no integer update_id in the signed 64-bit
    range (true/false are not integers here), nested absurdly deep, lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    try:
        payload = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        return "too_deep"
    except ValueError:
        return "not_json"
    if not isinstance(payload, dict):
        return "not_object"
    update_id = payload.get("update_id")
    if type(update_id) is not int or not _INT64_MIN <= update_id <= _INT64_MAX:
        return "bad_update_id"
    return _odd_value(payload) or payload


def _log_fields(update: object) -> dict[str, int]:
    """update_id, chat_id, user_id for every log line of this update's handlers."""
    if not isinstance(update, Update):
        return {}
    fields = {"update_id": update.update_id}
    if update.effective_chat is not None:
        fields["chat_id"] = update.effective_chat.id
    if update.effective_user is not None:
        fields["user_id"] = update.effective_user.id
    return fields


def _chat_key(update: object) -> int | None:
    """The chat whose order this update keeps; None for updates without one (and for a chat
    id that is not an integer, which only a malformed body has: no order rather than a crash)."""
    if isinstance(update, Update) and update.effective_chat is not None:
        chat_id = update.effective_chat.id
        return chat_id if type(chat_id) is int else None
    return None


async def close_poisoned(
    inbox: Inbox,
    metrics: Metrics | None,
    update_id: int,
    reason: str,
    error: BaseException | None = None,
) -> None:
    """Close a saved update that could not be handled, with the reason, counted and logged once
    (its id and why, never its body), so no replay runs into it again."""
    if metrics is not None:
        metrics.updates_poisoned.labels(reason).inc()
    log.warning(
        "update_poisoned",
        update_id=update_id,
        reason=reason,
        error_type=type(error).__name__ if error is not None else None,
    )
    await inbox.mark_processed(update_id, failure_text(reason, error))


class PerChatUpdateProcessor(BaseUpdateProcessor):
    """Updates of different chats run concurrently; one chat's updates run in order (so a
    conversation sees its photo before its instruction). Each update is marked processed in
    the inbox once its handlers ran; one that raised is closed with the reason.

    PTB takes its own semaphore *before* `do_process_update`, so a chat's backlog waiting there
    for its turn would hold every slot and stall the other chats. PTB's bound is therefore set
    out of reach, and the real one (`max_concurrent_updates`) is taken only once an update's
    turn in its chat has come: a chat holds at most one slot whatever its backlog. Updates
    without a chat (inline and pre-checkout queries, ...) need no order and only take a slot.

    On a database several processes share (PostgreSQL), a chat's updates may reach different
    processes (a load balancer): before its turn, an update also waits, holding no slot, until
    no earlier update of its chat is unprocessed in the inbox (`_wait_for_earlier`).
    """

    def __init__(
        self, inbox: Inbox, max_concurrent_updates: int = 256, *, order_wait_s: float = 60.0
    ) -> None:
        super().__init__(_PTB_UNBOUNDED)
        self.inbox = inbox
        # A database several processes share (PostgreSQL): a chat's updates may reach
        # different processes, so each first waits for the chat's earlier unprocessed ones
        # (at most `order_wait_s`). SQLite serves one process: no query, as before.
        self.shared = inbox.db.dialect != "sqlite"
        self.order_wait_s = order_wait_s
        # chat key -> set when an update of that chat finished here (or on `wake`)
        self._finished: dict[int, asyncio.Event] = {}
        # told each chat key whose update finished here (app.py: a NOTIFY on imagebot_inbox,
        # so another process's update waiting for it looks again at once)
        self.on_finished: Callable[[int], None] = lambda key: None
        self.metrics: Metrics | None = None  # set by Intake
        # set by Intake: handles an update whose handler met a storage fault (the database
        # away or its disk full): it stays open in the inbox and is run again later
        self.retry_later: Callable[[Update], None] | None = None
        self.max_running = max_concurrent_updates
        self._slots = asyncio.Semaphore(max_concurrent_updates)
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}
        # chat key -> update ids queued here for the chat's lock (see do_process_update)
        self._queued: dict[int, set[int]] = {}
        # update_id -> the first error a handler raised on it (None: none so far)
        self._in_flight: dict[int, tuple[str, BaseException] | None] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        key = _chat_key(update)
        if key is None:
            async with self._slots:
                await self._run(update, coroutine)
            return
        try:
            lock, users = self._locks.get(key, (asyncio.Lock(), 0))
            self._locks[key] = (lock, users + 1)
            try:
                ran = False
                while not ran:
                    update_id = update.update_id if isinstance(update, Update) else None
                    queued = self._queued.setdefault(key, set())
                    if update_id is not None:
                        queued.add(update_id)
                        self.wake(key)  # a head waiting for this very update looks again
                    try:
                        async with lock:
                            queued.discard(update_id)
                            # Only the chat's head here asks the database (holding no slot): a
                            # backlog queued behind it in this process waits on the lock
                            # without a query. The head steps aside when the update it waits
                            # for is queued here behind it (a replay, an adoption: a chat's
                            # updates may reach a process out of order), and queues again.
                            if (
                                self.shared
                                and update_id is not None
                                and not self.inbox.first_open_at_save(update_id)
                                and not await self._wait_for_earlier(key, update_id)
                            ):
                                continue
                            async with self._slots:
                                await self._run(update, coroutine)
                            ran = True
                    finally:
                        queued.discard(update_id)
                        if not queued:
                            self._queued.pop(key, None)
            finally:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)
        finally:
            finished = self._finished.pop(key, None)
            if finished is not None:
                finished.set()
            if self.shared:
                self.on_finished(key)

    async def _wait_for_earlier(self, key: int, update_id: int) -> bool:
        """Wait (holding no slot) until no earlier update of this chat is unprocessed in the
        inbox: another process still runs it, or a dead one left it (the leader replays it
        after the node lease). Polls 50 ms doubling to 1 s, woken early when an update of the
        chat finishes or arrives here, or on `wake`; gives up after `order_wait_s` and runs
        anyway. True: run now; False: the earlier update is queued in this process behind
        this one (it must go first: the caller lets it)."""
        started = time.monotonic()
        delay = _ORDER_POLL_FIRST_S
        waited_for: int | None = None
        while True:
            # taken before the query: a finish between the query and the wait is not missed
            finished = self._finished.setdefault(key, asyncio.Event())
            try:
                earlier = await self.inbox.earlier_pending(key, update_id)
            except Exception as exc:  # the handlers will meet the fault themselves
                log.warning("chat_order_check_failed", update_id=update_id, error=str(exc))
                return True
            waited_s = time.monotonic() - started
            if earlier is None:
                if waited_for is not None:
                    log.info(
                        "chat_order_waited",
                        update_id=update_id,
                        waited_for=waited_for,
                        waited_s=round(waited_s, 3),
                    )
                return True
            if earlier in self._queued.get(key, ()):
                log.info("chat_order_stepped_aside", update_id=update_id, waiting_for=earlier)
                return False
            if waited_for is None:
                log.info("chat_order_waiting", update_id=update_id, waiting_for=earlier)
            waited_for = earlier
            if waited_s >= self.order_wait_s:
                log.warning(
                    "chat_order_wait_gave_up",
                    update_id=update_id,
                    waited_for=earlier,
                    chat_id=key,
                    waited_s=round(waited_s, 3),
                )
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), min(delay, self.order_wait_s - waited_s))
            delay = min(delay * 2, _ORDER_POLL_MAX_S)

    def wake(self, chat_key: int | None = None) -> None:
        """An update was processed somewhere (e.g. a NOTIFY on `imagebot_inbox` from another
        process): updates waiting for that chat (None: for any chat) look again now. Call it
        on the event loop's thread."""
        if chat_key is None:
            waiting, self._finished = self._finished, {}
            for event in waiting.values():
                event.set()
            return
        finished = self._finished.pop(chat_key, None)
        if finished is not None:
            finished.set()

    async def _run(self, update: object, coroutine: Awaitable[Any]) -> None:
        update_id = update.update_id if isinstance(update, Update) else None
        if update_id is not None:
            self._in_flight[update_id] = None
        failure: tuple[str, BaseException] | None = None
        try:
            with structlog.contextvars.bound_contextvars(**_log_fields(update)):
                await coroutine
        except Exception as exc:  # PTB catches handler errors; this is what it did not
            failure = ("processing_error", exc)
        finally:
            noted = self._in_flight.pop(update_id, None) if update_id is not None else None
        if update_id is None:
            return
        failure = failure or noted
        if (
            failure is not None
            and is_storage_fault(failure[1])
            and isinstance(update, Update)
            and self.retry_later is not None
        ):
            # Not the update's fault: it was acknowledged, so it must still make its job.
            log.warning("update_deferred_store_fault", update_id=update_id, error=str(failure[1]))
            self.retry_later(update)
            return
        if failure is None:
            await self.inbox.mark_processed(update_id)
        else:
            await close_poisoned(self.inbox, self.metrics, update_id, *failure)

    def note_failure(self, update: object, error: BaseException | None) -> None:
        """A handler raised on this update (PTB's error handlers are told, not us)."""
        if not isinstance(update, Update) or error is None:
            return
        if update.update_id in self._in_flight and self._in_flight[update.update_id] is None:
            self._in_flight[update.update_id] = ("handler_error", error)

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""


class Intake:
    """Receives updates (webhook or polling), saves them, and hands them to the Application."""

    def __init__(
        self,
        application: Application[Any, Any, Any, Any, Any, Any],
        inbox: Inbox,
        metrics: Metrics,
        settings: Settings,
        hints: CompletionHints,
        on_fatal: Callable[[str], None] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.application = application
        # this process among others on the database: its roles and leases decide whether it
        # listens (intake), polls (the poller lease) and sets the webhook (maintenance lease);
        # None: a process alone, doing all of it
        self.cluster = cluster
        self.inbox = inbox
        self.metrics = metrics
        self.settings = settings
        self.on_fatal = on_fatal
        self.hints = hints
        self.running = False
        self.webhook_port: int | None = None
        self._received: dict[int, float] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._fetch: asyncio.Task[list[dict[str, Any]]] | None = None  # a getUpdates in flight
        self._lease_changed = asyncio.Event()
        self._webhook_set = False  # setWebhook done while this process holds maintenance
        self._webhook_lock = asyncio.Lock()
        self._webhook_task: asyncio.Task[None] | None = None
        self._web: ThreadedSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Update kinds answered at once, beside the Application and its per-chat processor
        # (a pre_checkout_query must be answered within 10 s whatever else is going on).
        self.direct: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}
        self._direct_tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        processor = application.update_processor
        if isinstance(processor, PerChatUpdateProcessor):
            processor.metrics = metrics
            processor.retry_later = self._retry_later
        # PTB hands handler exceptions to error handlers only; this one tells the processor,
        # which then closes the update with the reason.
        application.add_error_handler(self._note_handler_error)
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        self._secret = secret.encode()

    @property
    def mode(self) -> str:
        return self.settings.telegram.mode

    def received_at(self, update_id: int) -> float | None:
        """time.monotonic() when the update arrived (for the ack latency metric)."""
        return self._received.pop(update_id, None)

    async def accept(self, payloads: Sequence[dict[str, Any]]) -> list[bool]:
        """Commit raw updates, then queue the new ones for the Application.

        Runs on the main loop (polling) or on the webhook thread's loop; the hand-over to the
        Application always happens on the main loop.
        """
        arrived = time.monotonic()
        fresh = await self.inbox.save(payloads)
        on_main = asyncio.get_running_loop() is self._loop
        for payload, is_new in zip(payloads, fresh, strict=True):
            self.metrics.updates_received.labels(update_kind(payload)).inc()
            if not is_new:
                self.metrics.updates_duplicate.inc()
                log.info("update_duplicate", update_id=payload["update_id"])
            elif on_main or self._loop is None:
                self._hand_over(payload, arrived)
            else:
                self._loop.call_soon_threadsafe(self._hand_over, payload, arrived)
        return fresh

    def _parse(self, payload: dict[str, Any]) -> Update | BaseException:
        """PTB's Update for a saved body, or what PTB raised on it (wrong types inside, ...)."""
        try:
            update = Update.de_json(payload, self.application.bot)
        except Exception as exc:
            return exc
        if not isinstance(update, Update):
            return TypeError("not an update")
        return update

    def _hand_over(self, payload: dict[str, Any], arrived: float) -> None:
        """On the main loop: remember when it arrived and queue it for the handlers; a body
        PTB cannot parse is closed with the reason instead (it must not stop anything)."""
        update_id = int(payload["update_id"])
        update = self._parse(payload)
        if isinstance(update, BaseException):
            task = asyncio.get_running_loop().create_task(
                close_poisoned(self.inbox, self.metrics, update_id, "unparseable", update)
            )
            self._closing.add(task)
            task.add_done_callback(self._closed)
            return
        if len(self._received) > _MAX_TRACKED:
            self._received.clear()
        self._received[update_id] = arrived
        if self._take_direct(payload):
            return
        app = self.application
        if not app.running:
            app.update_queue.put_nowait(update)  # PTB's fetcher takes it once started
            return
        # What PTB's fetcher does with a queued update (a task of its own: the update
        # processor runs updates concurrently), without the queue: through it the handlers
        # started a turn of the busy loop later. PTB's stop() awaits these tasks too.
        app.create_task(
            app.update_processor.process_update(update, app.process_update(update)),
            update=update,
            name="imagebot:process_update",
        )

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("update_close_failed", error=str(task.exception()))

    async def _note_handler_error(
        self, update: object, context: CallbackContext[Any, Any, Any, Any]
    ) -> None:
        processor = self.application.update_processor
        if isinstance(processor, PerChatUpdateProcessor):
            processor.note_failure(update, context.error)

    def _take_direct(self, payload: dict[str, Any]) -> bool:
        """Run a `direct` handler for this update as its own task; False if none applies."""
        handler = self.direct.get(update_kind(payload))
        if handler is None:
            return False
        task = asyncio.get_running_loop().create_task(self._run_direct(handler, payload))
        self._direct_tasks.add(task)
        task.add_done_callback(self._direct_tasks.discard)
        return True

    async def _run_direct(
        self, handler: Callable[[dict[str, Any]], Awaitable[None]], payload: dict[str, Any]
    ) -> None:
        update_id = int(payload["update_id"])
        try:
            with structlog.contextvars.bound_contextvars(update_id=update_id):
                await handler(payload)
        except Exception:
            log.exception("direct_update_failed", update_id=update_id)
        finally:
            await self.inbox.mark_processed(update_id)

    def _retry_later(self, update: Update) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_when_writable(update))
        self._direct_tasks.add(task)
        task.add_done_callback(self._direct_tasks.discard)

    async def _retry_when_writable(self, update: Update) -> None:
        """Queue the update again once the database takes writes (backoff 0.1 s doubling to
        2 s). Left open if the bot stops first: the next start replays it."""
        delay = 0.1
        for _ in range(3600):  # bounded: about two hours of 2 s waits
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            if not self.running:
                return
            if await self.inbox.db.probe_write():
                await self.application.update_queue.put(update)
                return
        log.error("update_left_for_next_start", update_id=update.update_id)

    async def replay(self, update_ids: Sequence[int] | None = None) -> int:
        """Queue updates that were saved but not processed by a process that stopped (all of
        them, or `update_ids` only: those this process adopted); one that cannot be parsed is
        closed with the reason, and the others are replayed regardless."""
        saved = await self.inbox.unprocessed(update_ids)
        queued = 0
        for item in saved:
            if item.payload is not None and self._take_direct(item.payload):
                queued += 1
                continue
            parsed: Update | BaseException = (
                ValueError("stored body is not a JSON object")
                if item.payload is None
                else self._parse(item.payload)
            )
            if isinstance(parsed, BaseException):
                await close_poisoned(
                    self.inbox, self.metrics, item.update_id, "unparseable", parsed
                )
                continue
            await self.application.update_queue.put(parsed)
            queued += 1
        if saved:
            log.info("updates_replayed", count=queued, closed=len(saved) - queued)
        return queued

    @property
    def takes_updates(self) -> bool:
        """This process has the intake role: it listens for webhooks and hints, or may poll."""
        return self.cluster is None or self.cluster.has_role("intake")

    def _holds(self, lease: str) -> bool:
        return self.cluster is None or self.cluster.holds(lease)

    async def start(self) -> None:
        """Listen (intake role), set the webhook (the maintenance lease's holder: once per
        cluster), or poll whenever this process holds the poller lease."""
        self._loop = asyncio.get_running_loop()
        self.hints.bind(self._loop)
        self.running = True
        if self.mode == "webhook":
            if self.takes_updates:
                await self._start_webhook()
            # At start a failed setWebhook stops start-up, as for a single process.
            await self._publish_webhook()
        elif self.takes_updates:
            self._poll_task = asyncio.get_running_loop().create_task(
                self._poll_loop(), name="telegram-polling"
            )
        if self.cluster is not None:
            self.cluster.on_lease(self._on_lease)
            self.cluster.on_tick(self._on_tick)
        log.info(
            "intake_started",
            mode=self.mode,
            node=self.cluster.node_id if self.cluster is not None else None,
            takes_updates=self.takes_updates,
            webhook_port=self.webhook_port,
            # polling: only while it holds the poller lease; webhook: only its leader sets it
            sets_webhook=self.mode == "webhook" and self._holds(MAINTENANCE),
            polls=self.mode == "polling" and self.takes_updates,
        )

    async def _on_lease(self, name: str, held: bool) -> None:
        """Called by the heartbeat when this process gains or loses a lease."""
        if name == MAINTENANCE and not held:
            self._webhook_set = False  # whoever holds it next sets the webhook again
        if name == POLLER:
            self._lease_changed.set()
            if not held and self._fetch is not None:
                self._fetch.cancel()  # lost: no batch from this process is taken any more

    async def _on_tick(self) -> None:
        """After each heartbeat: a new maintenance leader sets the webhook (in the background:
        a slow Telegram must not hold up the heartbeat)."""
        if (
            self.mode == "webhook"
            and self.running
            and not self._webhook_set
            and self._holds(MAINTENANCE)
            and (self._webhook_task is None or self._webhook_task.done())
        ):
            self._webhook_task = asyncio.get_running_loop().create_task(
                self._publish_webhook_logged(), name="set-webhook"
            )

    async def _publish_webhook_logged(self) -> None:
        try:
            await self._publish_webhook()
        except TelegramError as exc:
            log.warning("webhook_set_failed", error=str(exc), retry="next heartbeat")

    async def _publish_webhook(self) -> None:
        """setWebhook, by the maintenance lease's holder only, once while it holds the lease
        (every intake process listens; Telegram needs to be told the public URL once)."""
        async with self._webhook_lock:
            if self._webhook_set or not self._holds(MAINTENANCE):
                return
            hook = self.settings.webhook
            await self.application.bot.set_webhook(
                url=hook.url,
                secret_token=self._secret.decode(),
                allowed_updates=ALLOWED_UPDATES,
                max_connections=hook.max_connections,
                drop_pending_updates=False,
            )
            self._webhook_set = True
            log.info("webhook_set", listen=hook.listen, port=self.webhook_port, path=hook.path)

    async def stop(self) -> None:
        """Stop taking updates: cancel the long poll, close the webhook listener."""
        self.running = False
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            await asyncio.gather(self._webhook_task, return_exceptions=True)
            self._webhook_task = None
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
        if self._web is not None:
            await asyncio.to_thread(self._web.stop)
            self._web = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        log.info("intake_stopped", mode=self.mode)

    # -- webhook ---------------------------------------------------------------------------

    async def _start_webhook(self) -> None:
        hook = self.settings.webhook
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(hook.path, self._webhook)
        if self.hints.enabled:
            app.router.add_post(hook.path.rstrip("/") + ROUTE_SUFFIX, self._completion_hint)
        self._web = ThreadedSite(app, hook.listen, hook.port, name="webhook-intake")
        await asyncio.to_thread(self._web.start)
        self.webhook_port = self._web.port
        # the bound port (webhook.port may be 0: the OS picks), before Telegram is told the URL
        log.info("webhook_listening", listen=hook.listen, port=self.webhook_port, path=hook.path)

    async def _webhook(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        if not self.running:
            return web.Response(status=503)  # stopping: Telegram will resend later
        header = request.headers.get(SECRET_HEADER, "")
        try:
            given = header.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
            given = b""
        if not given or not hmac.compare_digest(given, self._secret):
            log.warning("webhook_forbidden", remote=request.remote, has_header=bool(header))
            return web.Response(status=403)
        # A body over MAX_BODY_BYTES makes read() answer 413 itself.
        payload = parse_webhook_body(await request.read())
        if isinstance(payload, str):
            self.metrics.webhook_rejected.labels(payload).inc()
            log.warning("webhook_rejected", reason=payload, remote=request.remote)
            return web.Response(status=400, text=f"not a Telegram update ({payload})")
        try:
            await self.accept([payload])
        except Exception:
            log.exception("webhook_save_failed", update_id=payload["update_id"])
            return web.Response(status=500)  # not saved: let Telegram resend it
        self.metrics.webhook_latency.observe(time.monotonic() - started)
        return web.Response(status=200)

    async def _completion_hint(self, request: web.Request) -> web.Response:
        """A vendor says a job's request finished: wake the job (its body is not read)."""
        raw_id, token = request.match_info["job_id"], request.match_info["token"]
        if not raw_id.isdigit() or not self.hints.verify(int(raw_id), token):
            self.metrics.completion_hints.labels("forbidden").inc()
            log.warning("completion_hint_forbidden", remote=request.remote)
            return web.Response(status=403)
        self.metrics.completion_hints.labels("accepted").inc()
        self.hints.received(int(raw_id))  # here, or passed on to the process running it
        return web.Response(status=204)

    # -- polling ---------------------------------------------------------------------------

    async def _raw_updates(self, offset: int | None) -> list[dict[str, Any]]:
        """The pending batch as Telegram sent it (a short poll), without PTB's parsing; items
        without an integer update_id cannot be saved or confirmed by offset and are left out."""
        bot = self.application.bot
        query = f"?offset={offset}" if offset is not None else ""
        result = await bot.request.post(f"{bot.base_url}/getUpdates{query}", read_timeout=10)
        items = result if isinstance(result, list) else []
        return [
            item for item in items if isinstance(item, dict) and type(item.get("update_id")) is int
        ]

    async def _poll_loop(self) -> None:
        """Poll while this process holds the poller lease (one process of the cluster at a
        time: Telegram has one getUpdates consumer per bot), and wait for it otherwise."""
        while self.running:
            if not self._holds(POLLER):
                await self._wait_for_lease()
                continue
            node = self.cluster.node_id if self.cluster is not None else None
            log.info("polling_started", node=node)
            if not await self._poll():
                return  # fatal (the token was rejected): the bot is stopping
            if self.running:
                log.info("polling_stopped", node=node, reason="poller_lease_lost")

    async def _wait_for_lease(self) -> None:
        """Until the lease may have changed hands (a heartbeat's news, or a bounded wait)."""
        self._lease_changed.clear()
        wait = self.cluster.config.heartbeat_s if self.cluster is not None else 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lease_changed.wait(), wait)

    async def _fetch_batch(self, offset: int | None) -> list[dict[str, Any]]:
        """One getUpdates: the pending batch as raw dicts."""
        bot = self.application.bot
        timeout = self.settings.telegram.poll_timeout_s
        try:
            updates = await bot.get_updates(
                offset=offset,
                timeout=timedelta(seconds=timeout),
                allowed_updates=ALLOWED_UPDATES,
                read_timeout=timeout + 10,
            )
        except (TelegramError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # PTB parses the whole batch and one body it rejects fails it all: take the
            # batch raw, so that update is saved and closed instead of asked for forever.
            log.warning("polling_batch_unparseable", error_type=type(exc).__name__)
            return await self._raw_updates(offset)
        return [json.loads(u.to_json()) for u in updates]

    async def _poll(self) -> bool:
        """getUpdates until the poller lease is lost (checked before every call; losing it
        also cuts the call in flight) or the bot stops. The first offset follows the newest
        update the inbox holds: what an earlier poller (this process or a dead one) saved is
        confirmed, what it fetched but never saved is asked for again."""
        offset: int | None = None
        backoff = 1.0
        webhook_deleted = resumed = False
        while self.running and self._holds(POLLER):
            try:
                if not webhook_deleted:
                    await self.application.bot.delete_webhook(drop_pending_updates=False)
                    webhook_deleted = True
                if not resumed:
                    newest = await self.inbox.newest_update_id()
                    offset = newest + 1 if newest is not None else None
                    resumed = True
                fetch = asyncio.get_running_loop().create_task(self._fetch_batch(offset))
                self._fetch = fetch
                try:
                    await asyncio.wait({fetch})
                finally:
                    self._fetch = None
                    if not fetch.done():
                        fetch.cancel()
                if fetch.cancelled():
                    return True  # the lease was lost mid-call: that batch is the next poller's
                payloads = fetch.result()
                if payloads:
                    # Committed before the next getUpdates, whose offset confirms them.
                    await self.accept(payloads)
                    offset = max(p["update_id"] for p in payloads) + 1
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except TimedOut:
                continue
            except InvalidToken:
                log.error("telegram_token_rejected", setting="TELEGRAM_BOT_TOKEN")  # noqa: TRY400 - no trace
                if self.on_fatal:
                    self.on_fatal("Telegram rejected TELEGRAM_BOT_TOKEN")
                return False
            except (Conflict, NetworkError, TelegramError) as exc:
                log.warning("polling_error", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:
                log.exception("polling_save_failed", retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        return True
