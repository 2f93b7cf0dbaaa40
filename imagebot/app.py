"""Composition root: build Services and the PTB Application, and own the process lifecycle.

Start: open + migrate the store → ops server → Application.initialize (getMe, retried while
Telegram is unreachable) → start → resume unfinished jobs → replay saved updates → intake.
Stop (SIGTERM/SIGINT): intake first (no new updates, webhooks answered 503), then the runner
(in-flight submits and sends finish, the rest stays resumable), then PTB, then the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telegram import Bot
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, ContextTypes

from imagebot import texts
from imagebot.bot import albums, edit
from imagebot.bot.context import SERVICES_KEY, BotContext
from imagebot.bot.handlers import register
from imagebot.bot.menus import build_menus, publish
from imagebot.botapi import AiohttpBotRequest
from imagebot.cluster import MAINTENANCE, Cluster
from imagebot.config import Settings
from imagebot.control import Control
from imagebot.credits import Credits
from imagebot.delivery import Delivery
from imagebot.errors import ConfigError, StartupError, StoreError
from imagebot.health import Heartbeat, sd_notify
from imagebot.hints import CompletionHints
from imagebot.intake import Intake, PerChatUpdateProcessor
from imagebot.logs import get_logger, unbind_all
from imagebot.media import (
    GuardedFetcher,
    download_telegram_file,
    inspect_image,
    prepare_edit_input,
)
from imagebot.metrics import Metrics
from imagebot.models import ImageFile, Job, JobKind
from imagebot.netguard import AddressGuard, Resolver, system_resolver
from imagebot.network import Network
from imagebot.notify import HINT, INBOX, JOBS, SLOT_FREED, Coalesced, notifier_for
from imagebot.ops_server import OpsServer, OpsState
from imagebot.pipeline import Pipeline
from imagebot.policy import Policy
from imagebot.progress import Progress
from imagebot.providers.base import ImageProvider
from imagebot.providers.fal import FalProvider
from imagebot.providers.local import LocalProvider
from imagebot.providers.replicate import ReplicateProvider
from imagebot.ratelimit import TelegramRateLimiter
from imagebot.results import ResultFiles, make_result_store
from imagebot.runtime import freeze_startup_objects, thaw_startup_objects
from imagebot.services import Services
from imagebot.sharedlimit import SharedRateLimiter
from imagebot.stars import Stars
from imagebot.store.access import AccessStore
from imagebot.store.albums import AlbumStore
from imagebot.store.conversations import ConversationStore
from imagebot.store.db import STORE_READ_ERRORS, Database, connect_store
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore
from imagebot.store.ledger import Ledger
from imagebot.store.migrate import migrate
from imagebot.store.prefs import PrefStore
from imagebot.store.sendslots import SendSlots
from imagebot.store.sqlite import StoreInUse
from imagebot.store.stats import Stats
from imagebot.store.usage import Usage
from imagebot.threaded_site import ListenError
from imagebot.worker import JobRunner

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 15.0  # imagebot.service gives TimeoutStopSec=45


@dataclass
class App:
    """Everything one running bot owns."""

    services: Services
    application: Application[Any, Any, Any, Any, Any, Any]
    ops: OpsServer
    state: OpsState
    providers: dict[JobKind, ImageProvider]
    fetcher: GuardedFetcher
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0

    def request_stop(self, reason: str = "signal", exit_code: int = 0) -> None:
        if not self.stop_event.is_set():
            log.info("stop_requested", reason=reason)
            self.exit_code = exit_code
            self.stop_event.set()


def _providers(
    settings: Settings, fetcher: GuardedFetcher, network: Network
) -> dict[JobKind, ImageProvider]:
    generate: ImageProvider
    if settings.generate.provider == "replicate":
        assert settings.replicate_api_token is not None
        generate = ReplicateProvider(
            settings.replicate,
            settings.replicate_api_token.get_secret_value(),
            fetcher.fetch_image,
            transport=network.httpx_transport(),
        )
    else:
        generate = LocalProvider()
    edit: ImageProvider
    if settings.edit.provider == "fal":
        assert settings.fal_key is not None
        edit = FalProvider(
            settings.fal,
            settings.fal_key.get_secret_value(),
            fetcher.fetch_image,
            transport=network.httpx_transport(),
        )
    else:
        edit = generate if isinstance(generate, LocalProvider) else LocalProvider()
    providers: dict[JobKind, ImageProvider] = {JobKind.GENERATE: generate, JobKind.EDIT: edit}
    if settings.upscale.enabled:
        providers[JobKind.UPSCALE] = _upscaler(settings, fetcher, generate)
    return providers


def _upscaler(
    settings: Settings, fetcher: GuardedFetcher, generate: ImageProvider
) -> ImageProvider:
    """[upscale]: its own model on Replicate (its own client), or the offline placeholder."""
    if settings.upscale.provider == "replicate":
        assert settings.replicate_api_token is not None
        return ReplicateProvider(
            settings.replicate.model_copy(update={"model": settings.upscale.model}),
            settings.replicate_api_token.get_secret_value(),
            fetcher.fetch_image,
        )
    return generate if isinstance(generate, LocalProvider) else LocalProvider()


def _rate_limiter(
    settings: Settings, db: Database, metrics: Metrics, cluster: Cluster
) -> TelegramRateLimiter:
    """Telegram's outgoing limits: in memory on SQLite (one process), in the database on
    PostgreSQL, where several processes share one bot token's limits."""

    def on_flood_wait(_: float) -> None:
        metrics.telegram_429.inc()

    async def live_processes() -> int:
        return len(await cluster.peers())

    if db.shared:
        return SharedRateLimiter(
            settings.telegram, SendSlots(db), on_flood_wait, peers=live_processes
        )
    return TelegramRateLimiter(settings.telegram, on_flood_wait=on_flood_wait)


def build(settings: Settings, *, resolver: Resolver = system_resolver) -> App:
    """Wire every collaborator (no I/O happens here)."""
    metrics = Metrics()
    db = connect_store(
        settings.storage.database,
        synchronous=settings.storage.synchronous,
        exclusive=True,
        # a session stalled inside a transaction loses it (and its locks) well within the
        # lease, so the others' takeover of this process's jobs never waits behind it
        stalled_after_s=max(1.0, settings.cluster.lease_s / 3),
    )
    cluster = Cluster(settings, db)
    inbox = Inbox(db, cluster.node_id)
    store = JobStore(db, cluster.node_id)
    ledger = Ledger(db)
    tg = settings.telegram
    timeout = tg.request_timeout_s
    # proxy + CA bundle for every outgoing client (ConfigError for a CA file gone bad since)
    network = Network.from_settings(settings)
    log.info(
        "network_configured",
        proxy=network.proxy.display if network.proxy else None,
        ca_file=str(settings.network.ca_file) if settings.network.ca_file else None,
        ssl_cert_file=os.environ.get("SSL_CERT_FILE") or None,
        media_via_proxy=settings.media.via_proxy and network.proxy is not None,
    )
    application = (
        Application.builder()
        .token(settings.bot_token)
        .base_url(tg.bot_url)
        .base_file_url(tg.file_url)
        .local_mode(tg.local_mode)
        .updater(None)
        .request(
            AiohttpBotRequest(
                connection_pool_size=128,
                read_timeout=timeout,
                pool_timeout=timeout,
                media_read_timeout=max(60.0, timeout),
                connector=network.aiohttp_connector,
            )
        )
        .get_updates_request(
            AiohttpBotRequest(connection_pool_size=2, connector=network.aiohttp_connector)
        )
        .rate_limiter(_rate_limiter(settings, db, metrics, cluster))
        .context_types(ContextTypes(context=BotContext))
        .concurrent_updates(
            PerChatUpdateProcessor(inbox, order_wait_s=settings.cluster.chat_order_wait_s)
        )
        .build()
    )
    guard = AddressGuard(
        settings.media.allowed_hosts, settings.media.allowed_private_networks, resolver
    )
    fetcher = GuardedFetcher(
        guard,
        max_bytes=settings.media.max_bytes,
        max_pixels=settings.media.max_pixels,
        timeout_s=settings.media.timeout_s,
        max_redirects=settings.media.max_redirects,
        transport=network.httpx_transport(proxied=settings.media.via_proxy),
    )
    providers = _providers(settings, fetcher, network)
    delivery = Delivery(application.bot)
    progress = Progress(delivery, store, settings.progress)
    results = make_result_store(
        settings.storage.results_in_database, db, settings.storage.results_dir
    )

    async def load_input(job: Job) -> ImageFile:
        assert job.input_file_id is not None
        data = await download_telegram_file(
            application.bot, job.input_file_id, file_base_url=tg.file_url, local_mode=tg.local_mode
        )
        image = await asyncio.to_thread(inspect_image, data, settings.media.max_pixels)
        return await asyncio.to_thread(prepare_edit_input, image, settings.edit.max_input_side_px)

    hints = CompletionHints(
        public_url=settings.webhook.url
        if tg.mode == "webhook" and settings.webhook.completion_hints
        else None,
        secret=settings.webhook_secret.get_secret_value() if settings.webhook_secret else "",
    )
    pipeline = Pipeline(
        settings=settings,
        store=store,
        providers=providers,
        delivery=delivery,
        progress=progress,
        metrics=metrics,
        results=results,
        load_input=load_input,
        hints=hints,
    )
    runner = JobRunner(pipeline=pipeline, store=store, metrics=metrics, cluster=cluster)
    assert application.job_queue is not None, "python-telegram-bot[job-queue] is required"
    runner.attach(application.job_queue)
    state = OpsState(heartbeat=Heartbeat())
    app_ref: list[App] = []
    intake = Intake(
        application,
        inbox,
        metrics,
        settings,
        hints=hints,
        on_fatal=lambda why: app_ref[0].request_stop(why, exit_code=2),
        cluster=cluster,
    )
    policy = Policy(settings)
    credits, stars = _credits(
        settings, application, ledger, store, policy, metrics, delivery, network
    )
    if credits is not None and stars is not None:
        pipeline.on_final = credits.settle
        intake.direct["pre_checkout_query"] = stars.answer_pre_checkout
    services = Services(
        settings=settings,
        db=db,
        inbox=inbox,
        store=store,
        usage=Usage(db),
        ledger=ledger,
        prefs=PrefStore(db),
        stats=Stats(db),
        albums=AlbumStore(db),
        conversations=ConversationStore(db),
        policy=policy,
        runner=runner,
        delivery=delivery,
        progress=progress,
        metrics=metrics,
        results=results,
        intake=intake,
        cluster=cluster,
        credits=credits,
        stars=stars,
        control=Control(AccessStore(db), policy),
        notifier=notifier_for(db),
    )
    _wire_wakeups(services)
    application.bot_data[SERVICES_KEY] = services
    register(application, services)
    app = App(services, application, OpsServer(services, state), state, providers, fetcher)
    app_ref.append(app)
    return app


def _wire_wakeups(services: Services) -> None:
    """Cross-process wake-ups (issue 16): a job made claimable anywhere pumps every worker's
    runner; a completion hint reaches the process running its job. While the listener is
    away, jobs poll at the vendor's interval and the periodic tend pumps; when it is back,
    every waiting job polls once and the runner pumps (what was missed is looked at)."""
    notifier, runner, hints = services.notifier, services.runner, services.runner.pipeline.hints
    pump = Coalesced(runner.pump)
    runner.on_claimable = lambda freed: notifier.notify(
        JOBS, SLOT_FREED if freed else "", here=False
    )
    if runner.worker:

        def claimable(payload: str) -> None:
            if payload == SLOT_FREED:
                runner.room_may_have_freed()
            pump.trigger()

        notifier.subscribe(JOBS, claimable)
    hints.route_to(runner.runs, lambda job_id: notifier.notify(HINT, str(job_id)))

    def hinted(payload: str) -> None:
        if payload.isdigit():
            hints.passed_on(int(payload))

    notifier.subscribe(HINT, hinted)

    # Per-chat order across processes: an update waiting for an earlier one of its chat that
    # another process runs looks again as soon as that one is processed (else it polls).
    processor = services.intake.application.update_processor
    if isinstance(processor, PerChatUpdateProcessor):
        chats = processor
        chats.on_finished = lambda key: notifier.notify(INBOX, str(key), here=False)

        def chat_done(payload: str) -> None:
            with contextlib.suppress(ValueError):
                chats.wake(int(payload))

        notifier.subscribe(INBOX, chat_done)

    def listening(up: bool) -> None:
        if not up:
            hints.missed()  # jobs poll at the vendor's interval until hints come again
            return
        hints.wake_all()
        if isinstance(processor, PerChatUpdateProcessor):
            processor.wake()  # inbox notices may have been missed: every waiting chat looks
        if runner.worker:
            pump.trigger()

    notifier.on_listening(listening)
    services.metrics.notify_listening.set_function(lambda: int(notifier.listening))


def _credits(
    settings: Settings,
    application: Application[Any, Any, Any, Any, Any, Any],
    ledger: Ledger,
    store: JobStore,
    policy: Policy,
    metrics: Metrics,
    delivery: Delivery,
    network: Network,
) -> tuple[Credits | None, Stars | None]:
    """Credits and Stars when `credits.enabled` (otherwise nothing changes)."""
    if not settings.credits.enabled:
        return None, None
    credits = Credits(settings, ledger, policy, metrics, store)
    tg = settings.telegram
    # The pre-checkout answer's own Bot: its own connections and no outgoing rate limiter, so
    # neither busy jobs nor a flood wait can hold it past Telegram's 10 s.
    answer_bot = Bot(
        settings.bot_token,
        base_url=tg.bot_url,
        base_file_url=tg.file_url,
        request=AiohttpBotRequest(
            connection_pool_size=8,
            read_timeout=8.0,
            pool_timeout=2.0,
            connect_timeout=5.0,
            connector=network.aiohttp_connector,
        ),
        get_updates_request=AiohttpBotRequest(
            connection_pool_size=1, connector=network.aiohttp_connector
        ),
    )
    stars = Stars(
        settings=settings,
        ledger=ledger,
        credits=credits,
        metrics=metrics,
        bot=application.bot,
        answer_bot=answer_bot,
        delivery=delivery,
    )
    return credits, stars


async def _start_credits(app: App) -> None:
    """Open the pre-checkout connections; reconcile with Telegram now and periodically."""
    services = app.services
    credits, stars = services.credits, services.stars
    if credits is None or stars is None:
        return
    await stars.start()
    job_queue = app.application.job_queue
    assert job_queue is not None

    async def reconcile(_: object) -> None:
        unbind_all()
        if not services.cluster.holds(MAINTENANCE):
            return  # the maintenance lease's holder reconciles for the cluster
        try:
            await credits.settle_leftovers()
            await stars.reconcile()
        except (TelegramError, StoreError) as exc:
            log.warning("stars_reconcile_failed", error=str(exc))

    interval = services.settings.credits.reconcile_interval_s
    # APScheduler cannot start a repeating job "now": the start-up pass is its own job.
    job_queue.run_once(reconcile, 0, name="stars-reconcile-startup")
    job_queue.run_repeating(reconcile, interval, name="stars-reconcile")

    async def became_leader(name: str, held: bool) -> None:
        # A process that takes the maintenance lease over (its holder died) reconciles at
        # once: what the dead one left is not kept waiting for the next interval.
        if name == MAINTENANCE and held and services.cluster.started:
            job_queue.run_once(reconcile, 0, name="stars-reconcile-leader")

    services.cluster.on_lease(became_leader)


async def _start_control(app: App) -> None:
    """Re-read the database allowlist and pause every few seconds (the shell may change them
    while the bot runs), and set the "/" command menus that changed since the last start."""
    services = app.services
    control = services.control
    assert control is not None
    bot = app.application.bot
    await control.remember_username(bot.username)
    job_queue = app.application.job_queue
    assert job_queue is not None

    async def refresh(_: object) -> None:
        unbind_all()
        try:
            await control.refresh()
        except STORE_READ_ERRORS as exc:
            log.warning("access_refresh_failed", error=str(exc))

    job_queue.run_repeating(
        refresh, services.settings.access.refresh_interval_s, name="access-refresh"
    )
    # Before updates are taken: no call at all when no list changed since the last start;
    # a Telegram failure is logged and the scope tried again at the next start.
    if not services.cluster.holds(MAINTENANCE):
        return  # the menus are the bot's, not the process's: its maintenance leader sets them
    try:
        # one menu per scope for every language, then one per scope and translated language
        languages = (None, *texts.menu_language_codes())
        await publish(bot, control.access, build_menus(services.settings, languages))
    except STORE_READ_ERRORS as exc:
        log.warning("command_menu_failed", error=str(exc))


async def _initialize(app: App) -> None:
    """getMe, retried with backoff while Telegram is unreachable; a rejected token is fatal."""
    delay = 1.0
    while True:
        try:
            await app.application.initialize()
        except InvalidToken as exc:
            raise ConfigError(
                "TELEGRAM_BOT_TOKEN", "was rejected by Telegram: check the token from @BotFather"
            ) from exc
        except NetworkError as exc:
            log.warning("telegram_unreachable", error=str(exc), retry_in_s=delay)
        else:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app.stop_event.wait(), delay)
        if app.stop_event.is_set():
            raise asyncio.CancelledError
        delay = min(delay * 2, 30.0)


def _schedule_maintenance(app: App) -> None:
    services = app.services
    settings = services.settings
    cluster = services.cluster
    job_queue = app.application.job_queue
    assert job_queue is not None

    # APScheduler runs jobs in a copy of the context that last woke it (often a handler's), so
    # each maintenance job drops inherited log fields (update_id, job_id, ...) first. Chores
    # of the whole cluster run on the maintenance lease's holder only (one process of many).
    async def sweep(_: object) -> None:
        unbind_all()
        if cluster.holds(MAINTENANCE):
            await services.runner.sweep()

    async def refresh_queue(_: object) -> None:
        unbind_all()
        if cluster.holds(MAINTENANCE):
            await services.progress.refresh_queue()

    async def prune(_: object) -> None:
        unbind_all()
        if cluster.holds(MAINTENANCE):
            await _prune(services)
        else:  # this host's own result files (a disk store, or kept before the database one)
            days = settings.storage.results_retention_days
            await ResultFiles(settings.storage.results_dir).remove_older_than(days)

    job_queue.run_repeating(sweep, settings.runner.sweep_interval_s, name="sweep")

    async def tend(_: object) -> None:
        unbind_all()
        await services.runner.tend()

    # Deliveries and notices waiting out a Telegram outage; jobs a storage fault stopped.
    job_queue.run_repeating(tend, settings.delivery.check_interval_s, name="tend")
    job_queue.run_repeating(refresh_queue, settings.progress.queue_refresh_s, name="queue-refresh")
    # The first prune a minute after start-up (or sooner when the interval is shorter).
    interval = settings.storage.prune_interval_s
    job_queue.run_repeating(prune, interval, first=min(60.0, interval), name="prune")
    # Albums captioned /edit, including those a restart interrupted (issue 17).
    albums.schedule(app.application)
    # /edit conversations that timed out while no timer was left to say so (issue 16).
    edit.schedule(app.application)
    cluster.on_tick(lambda: _cluster_chores(services))


async def _cluster_chores(services: Services) -> None:
    """After each heartbeat: the vendors' request caps are shared out again among the live
    workers; the maintenance leader hands on dead processes' jobs; an intake process takes
    over the updates a dead one saved but never handled, and replays them."""
    cluster = services.cluster
    unbind_all()
    if cluster.has_role("worker") and services.store.db.shared:
        workers = sum(1 for peer in await cluster.peers() if "worker" in peer.roles)
        for provider in set(services.runner.pipeline.providers.values()):
            provider.share_rate(workers)
    if cluster.holds(MAINTENANCE):
        reaped = await cluster.reap()
        if reaped.jobs_freed or reaped.holds_released:
            services.notifier.notify(JOBS, SLOT_FREED, here=False)  # every worker may adopt them
            services.runner.room_may_have_freed()
            await services.runner.pump()
    if cluster.has_role("intake") and cluster.trusted:
        adopted = await cluster.adopt_updates()
        if adopted:
            await services.intake.replay(adopted)


async def _prune(services: Services) -> None:
    """Retention: processed inbox rows, old finished jobs and their files, old result files."""
    storage = services.settings.storage
    inbox_rows = await services.inbox.prune(storage.inbox_retention_days)
    removed_jobs = await services.store.prune(storage.jobs_retention_days)
    files = 0
    for job in removed_jobs:
        files += await services.results.remove(job.result_paths)
    for job in await services.store.with_results_older_than(storage.results_retention_days):
        files += await services.results.remove(job.result_paths)
        await services.store.update(job.id, result_paths=[])
    # also results no row names (a job failed after its results were kept) and, on disk,
    # `.tmp` files of a write a crash cut short
    files += await services.results.remove_older_than(storage.results_retention_days)
    if inbox_rows or removed_jobs or files:
        log.info("pruned", inbox_rows=inbox_rows, jobs=len(removed_jobs), files=files)


async def _make_results_dir(path: Path) -> None:
    """The directory for 📎 Original files, made now: a bad path stops start-up, not each job."""
    try:
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            "storage.results_dir", f"cannot create {path}: {exc.strerror or exc}"
        ) from exc


async def stop_application(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Stop PTB's Application without cutting a scheduled task short.

    Application.stop() waits for the JobQueue tasks running when it starts waiting, then
    shuts APScheduler down, which cancels whatever it submitted in the meantime (a periodic
    tick that fell due during the wait) and logs that cancellation as a job error with a
    traceback. Pausing the scheduler first means nothing new starts, so every task that did
    start runs to its end and the stop logs no error.
    """
    if not application.running:
        return
    job_queue = application.job_queue
    if job_queue is not None and job_queue.scheduler.running:
        job_queue.scheduler.pause()
    await application.stop()


async def run(app: App) -> int:
    """Run until `app.stop_event` is set; return the process exit code."""
    services = app.services
    settings = services.settings
    try:
        await services.db.open()
    except StoreInUse as exc:  # a second bot on one SQLite file: refused before touching it
        raise StartupError(
            "storage.database",
            f"{exc}: SQLite serves one process; to run several, use PostgreSQL (see README)",
        ) from exc
    except StoreError as exc:  # the directory or file cannot be created, opened or written
        raise StartupError("storage.database", str(exc)) from exc
    try:
        if not settings.storage.results_in_database:
            await _make_results_dir(settings.storage.results_dir)
        applied = await migrate(services.db)
        assert services.control is not None
        await services.control.load()  # allowlist and pause before any update is handled
        app.state.heartbeat.start()
        await services.notifier.start()
        await app.ops.start()
        await services.cluster.start(app.ops.port)
        log.info(
            "starting",
            mode=settings.telegram.mode,
            ops=f"{settings.ops.listen}:{app.ops.port}",
            node=services.cluster.node_id,
            roles=sorted(services.cluster.roles),
            migrations_applied=applied,
            results_store=services.results.kind,
            generate_provider=settings.generate.provider,
            edit_provider=settings.edit.provider,
        )
        await _initialize(app)
        try:
            await app.application.start()
            _schedule_maintenance(app)
            await _start_credits(app)
            await _start_control(app)
            # What processes that died left (on SQLite: the last run of this one).
            await services.cluster.reap()
            await services.runner.recover()
            if services.cluster.has_role("intake"):  # handlers run on intake processes only
                await services.intake.replay(await services.cluster.adopt_updates())
            freeze_startup_objects()
            try:
                await services.intake.start()
            except ListenError as exc:
                raise exc.for_section("webhook") from exc
            app.state.ready = True
            sd_notify("READY=1")
            log.info("bot_ready", username=app.application.bot.username)
            await app.stop_event.wait()
        finally:
            app.state.stopping = True
            thaw_startup_objects()
            sd_notify("STOPPING=1")
            log.info("stopping")
            await services.intake.stop()
            await services.runner.shutdown(SHUTDOWN_GRACE_S)
            await services.cluster.stop()
            services.notifier.notify(JOBS, SLOT_FREED, here=False)  # handed back: peers adopt them
            await stop_application(app.application)
            await app.application.shutdown()
            if services.stars is not None:
                await services.stars.stop()
    except asyncio.CancelledError:
        log.info("start_aborted")
    finally:
        await app.ops.stop()
        for provider in {id(p): p for p in app.providers.values()}.values():
            await provider.aclose()
        await app.fetcher.aclose()
        await app.state.heartbeat.stop()
        await services.cluster.stop()  # (done already unless start-up was cut short)
        await services.notifier.stop()
        await services.db.close()
        log.info("stopped", exit_code=app.exit_code)
    return app.exit_code
