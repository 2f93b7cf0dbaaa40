"""Durable intake: every update is committed to the inbox before Telegram is told it arrived.

PTB's Updater confirms polled updates and answers webhooks before handlers run, so the
Application is built with `updater(None)` and this module feeds it:
- webhook: an aiohttp route checks the secret header (constant time), commits the raw update,
  answers an empty 200, and queues the update;
- polling: a getUpdates loop commits each batch before asking with the next offset (which is
  what confirms the batch to Telegram), backing off on errors instead of spinning.
Saved-but-unprocessed updates are replayed at start-up; a repeat of a known update_id is
dropped before it reaches any handler.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from aiohttp import web
from telegram import Update
from telegram.error import Conflict, InvalidToken, NetworkError, TelegramError, TimedOut
from telegram.ext import Application, BaseUpdateProcessor

from imagebot.config import Settings
from imagebot.hints import ROUTE_SUFFIX, CompletionHints
from imagebot.logs import get_logger
from imagebot.metrics import Metrics
from imagebot.store.inbox import Inbox, update_kind
from imagebot.threaded_site import ThreadedSite

log = get_logger(__name__)

ALLOWED_UPDATES = ["message", "callback_query", "pre_checkout_query"]
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
_MAX_BACKOFF_S = 30.0
_MAX_TRACKED = 10_000


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
    if isinstance(update, Update) and update.effective_chat is not None:
        return update.effective_chat.id
    return None


class PerChatUpdateProcessor(BaseUpdateProcessor):
    """Updates of different chats run concurrently; one chat's updates run in order (so a
    conversation sees its photo before its instruction). Each update is marked processed in
    the inbox once its handlers ran."""

    def __init__(self, inbox: Inbox, max_concurrent_updates: int = 256) -> None:
        super().__init__(max_concurrent_updates)
        self.inbox = inbox
        self._locks: dict[int | None, tuple[asyncio.Lock, int]] = {}

    async def do_process_update(self, update: object, coroutine: Any) -> None:
        key = _chat_key(update)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                with structlog.contextvars.bound_contextvars(**_log_fields(update)):
                    try:
                        await coroutine
                    finally:
                        if isinstance(update, Update):
                            await self.inbox.mark_processed(update.update_id)
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

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
    ) -> None:
        self.application = application
        self.inbox = inbox
        self.metrics = metrics
        self.settings = settings
        self.on_fatal = on_fatal
        self.hints = hints
        self.running = False
        self.webhook_port: int | None = None
        self._received: dict[int, float] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._web: ThreadedSite | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Update kinds answered at once, beside the Application and its per-chat processor
        # (a pre_checkout_query must be answered within 10 s whatever else is going on).
        self.direct: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}
        self._direct_tasks: set[asyncio.Task[None]] = set()
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

    def _hand_over(self, payload: dict[str, Any], arrived: float) -> None:
        """On the main loop: remember when it arrived and queue it for the handlers."""
        if len(self._received) > _MAX_TRACKED:
            self._received.clear()
        self._received[int(payload["update_id"])] = arrived
        if self._take_direct(payload):
            return
        self.application.update_queue.put_nowait(Update.de_json(payload, self.application.bot))

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

    async def replay(self) -> int:
        """Queue updates that were saved but not processed when the last run stopped."""
        saved = await self.inbox.unprocessed()
        for item in saved:
            if self._take_direct(item.payload):
                continue
            await self.application.update_queue.put(
                Update.de_json(item.payload, self.application.bot)
            )
        if saved:
            log.info("updates_replayed", count=len(saved))
        return len(saved)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.hints.bind(self._loop)
        self.running = True
        if self.mode == "webhook":
            await self._start_webhook()
        else:
            await self.application.bot.delete_webhook(drop_pending_updates=False)
            self._poll_task = asyncio.get_running_loop().create_task(
                self._poll_loop(), name="telegram-polling"
            )
        log.info("intake_started", mode=self.mode)

    async def stop(self) -> None:
        """Stop taking updates: cancel the long poll, close the webhook listener."""
        self.running = False
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
        if self._web is not None:
            await asyncio.to_thread(self._web.stop)
            self._web = None
        log.info("intake_stopped", mode=self.mode)

    # -- webhook ---------------------------------------------------------------------------

    async def _start_webhook(self) -> None:
        hook = self.settings.webhook
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_post(hook.path, self._webhook)
        if self.hints.enabled:
            app.router.add_post(hook.path.rstrip("/") + ROUTE_SUFFIX, self._completion_hint)
        self._web = ThreadedSite(app, hook.listen, hook.port, name="webhook-intake")
        await asyncio.to_thread(self._web.start)
        self.webhook_port = self._web.port
        await self.application.bot.set_webhook(
            url=hook.url,
            secret_token=self._secret.decode(),
            allowed_updates=ALLOWED_UPDATES,
            max_connections=hook.max_connections,
            drop_pending_updates=False,
        )
        log.info("webhook_set", listen=hook.listen, port=self.webhook_port, path=hook.path)

    async def _webhook(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        if not self.running:
            return web.Response(status=503)  # stopping: Telegram will resend later
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._secret):
            log.warning("webhook_forbidden", remote=request.remote, has_header=bool(given))
            return web.Response(status=403)
        try:
            payload = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return web.Response(status=400, text="body is not JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("update_id"), int):
            return web.Response(status=400, text="not a Telegram update")
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
        self.hints.notify(int(raw_id))
        return web.Response(status=204)

    # -- polling ---------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        bot = self.application.bot
        timeout = self.settings.telegram.poll_timeout_s
        offset: int | None = None
        backoff = 1.0
        while self.running:
            try:
                updates = await bot.get_updates(
                    offset=offset,
                    timeout=timedelta(seconds=timeout),
                    allowed_updates=ALLOWED_UPDATES,
                    read_timeout=timeout + 10,
                )
                payloads = [json.loads(u.to_json()) for u in updates]
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
                return
            except (Conflict, NetworkError, TelegramError) as exc:
                log.warning("polling_error", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:
                log.exception("polling_save_failed", retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
