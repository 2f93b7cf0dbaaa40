"""Prometheus metrics, all in one registry owned by the running app (no global state)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# No `*_created` timestamp series next to every counter: noise on a small bot's page.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 300, 600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _ProcessCollector(ProcessCollector):
    """prometheus-client's process_* metrics, also under systemd's `ProcSubset=pid`, which hides
    /proc/stat (where the boot time is read; without it the collector exports nothing)."""

    def _boot_time(self) -> float:
        try:
            btime: float | None = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            btime = None
        return btime or time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class ClusterGauges(Collector):
    """Gauges read from the database, the same whichever process is asked (queued jobs,
    deliveries waiting, live nodes): exported by the maintenance lease's holder only, so a
    sum over every process's series counts each once. `exported` is set at each scrape."""

    def __init__(self, gauges: Iterable[Gauge]) -> None:
        self.gauges = list(gauges)
        self.exported = True  # a process alone (SQLite) always holds the lease

    def describe(self) -> Iterable[Metric]:
        for gauge in self.gauges:
            yield from gauge.describe()

    def collect(self) -> Iterable[Metric]:
        if self.exported:
            for gauge in self.gauges:
                yield from gauge.collect()


class Metrics:
    """Every counter, gauge and histogram imagebot exports at /metrics."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        _ProcessCollector(registry=r)  # process_resident_memory_bytes (vs MemoryMax), CPU, fds
        PlatformCollector(registry=r)  # python_info
        self.updates_received = Counter(
            "imagebot_updates_received", "Telegram updates received, by type", ["type"], registry=r
        )
        self.updates_duplicate = Counter(
            "imagebot_updates_duplicate",
            "Updates dropped because their update_id was seen",
            registry=r,
        )
        self.jobs_created = Counter(
            "imagebot_jobs_created", "Jobs created, by kind", ["kind"], registry=r
        )
        self.jobs_finished = Counter(
            "imagebot_jobs_finished",
            "Jobs that reached a final status, by kind and status",
            ["kind", "status"],
            registry=r,
        )
        self.refusals = Counter(
            "imagebot_refusals",
            "Requests refused before a job was created, by reason",
            ["reason"],
            registry=r,
        )
        self.provider_calls = Counter(
            "imagebot_provider_calls",
            "Calls to a provider, by provider and call",
            ["provider", "call"],
            registry=r,
        )
        self.provider_retries = Counter(
            "imagebot_provider_retries",
            "Provider calls retried, by provider",
            ["provider"],
            registry=r,
        )
        self.provider_errors = Counter(
            "imagebot_provider_errors",
            "Provider errors, by provider and error class",
            ["provider", "error"],
            registry=r,
        )
        self.completion_hints = Counter(
            "imagebot_completion_hints",
            "Completion calls from providers, by verdict (accepted, forbidden)",
            ["verdict"],
            registry=r,
        )
        self.ack_latency = Histogram(
            "imagebot_ack_latency_seconds",
            "Update received to the 'Generating…' reply sent",
            ["kind"],
            buckets=_FAST,
            registry=r,
        )
        self.webhook_latency = Histogram(
            "imagebot_webhook_response_seconds",
            "Webhook request received to response (update saved)",
            buckets=_FAST,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imagebot_queue_wait_seconds",
            "Job created to started",
            ["kind"],
            buckets=_SLOW,
            registry=r,
        )
        self.provider_time = Histogram(
            "imagebot_provider_seconds",
            "Provider submit to result, by provider",
            ["provider"],
            buckets=_SLOW,
            registry=r,
        )
        self.end_to_end = Histogram(
            "imagebot_end_to_end_seconds",
            "Job created to result delivered",
            ["kind"],
            buckets=_SLOW,
            registry=r,
        )
        self.jobs_running = Gauge(
            "imagebot_jobs_running", "Jobs talking to a provider", registry=r
        )
        # cluster-wide (read from the database): registered below through ClusterGauges
        self.jobs_queued = Gauge(
            "imagebot_jobs_queued", "Jobs waiting for a slot (whole cluster)", registry=None
        )
        self.cost_usd = Counter(
            "imagebot_estimated_cost_usd",
            "Estimated spend of succeeded jobs, by provider",
            ["provider"],
            registry=r,
        )
        self.telegram_429 = Counter(
            "imagebot_telegram_flood_waits", "Telegram 429 (retry_after) answers seen", registry=r
        )
        self.delivery_errors = Counter(
            "imagebot_delivery_errors", "Telegram refused a result, by code", ["code"], registry=r
        )
        self.provider_circuit_open = Gauge(
            "imagebot_provider_circuit_open",
            "1 while a provider's circuit breaker is open (new requests refused), by provider",
            ["provider"],
            registry=r,
        )
        self.provider_circuit_refusals = Counter(
            "imagebot_provider_circuit_refusals",
            "Jobs refused without a vendor call because the provider's circuit was open",
            ["provider"],
            registry=r,
        )
        # Credits and Telegram Stars (issue 18)
        self.stars_received = Counter(
            "imagebot_stars_received", "Telegram Stars credited from payments", registry=r
        )
        self.stars_refunded = Counter(
            "imagebot_stars_refunded", "Telegram Stars given back (refunds)", registry=r
        )
        self.credits_spent = Counter(
            "imagebot_credits_spent",
            "Credits kept by finished jobs (after any give-back), by job kind",
            ["kind"],
            registry=r,
        )
        self.payments = Counter(
            "imagebot_payments",
            "Payment events, by outcome (precheckout_ok, precheckout_refused, credited, "
            "duplicate, unmatched, reconciled, refunded, refund_failed, refunded_elsewhere)",
            ["outcome"],
            registry=r,
        )
        self.updates_poisoned = Counter(
            "imagebot_updates_poisoned",
            "Saved updates closed without being handled (unparseable, handler_error, ...)",
            ["reason"],
            registry=r,
        )
        self.webhook_rejected = Counter(
            "imagebot_webhook_rejected",
            "Webhook bodies refused with a 4xx before saving, by reason",
            ["reason"],
            registry=r,
        )

        self.deliveries_waiting = Gauge(
            "imagebot_deliveries_waiting",
            "Made results waiting for Telegram to take them (an outage), holding no slot",
            registry=None,
        )
        self.notices_waiting = Gauge(
            "imagebot_notices_waiting",
            "Status-line removals and failure/cancel notices waiting for Telegram",
            registry=None,
        )
        self.database_writes_ok = Gauge(
            "imagebot_database_writes_ok",
            "1 when the last write reached the database, 0 while writes fail (disk full, I/O)",
            registry=r,
        )
        self.notify_listening = Gauge(
            "imagebot_notify_listening",
            "1 while other processes' wake-ups reach this one (LISTEN), 0 while it only polls",
            registry=r,
        )

        # Several processes on one database (issue 16). Per process: what it is and which
        # leases it holds (summed over processes: 1 per lease, 0 = nobody holds it).
        self.node_info = Gauge(
            "imagebot_node_info",
            "This process: its node id and roles",
            ["node", "roles"],
            registry=r,
        )
        self.leases_held = Gauge(
            "imagebot_leases_held",
            "1 while this process holds the lease (maintenance, poller)",
            ["lease"],
            registry=r,
        )
        # Once per cluster (the maintenance lease's holder): absent everywhere = no leader.
        self.cluster_nodes = Gauge(
            "imagebot_cluster_nodes", "Live processes on the database", registry=None
        )
        self.cluster_jobs_running = Gauge(
            "imagebot_cluster_jobs_running",
            "Running jobs of every process (the whole cluster, slot holders or not)",
            registry=None,
        )
        self.cluster_gauges = ClusterGauges(
            [
                self.jobs_queued,
                self.deliveries_waiting,
                self.notices_waiting,
                self.cluster_nodes,
                self.cluster_jobs_running,
            ]
        )
        r.register(self.cluster_gauges)

    def render(self) -> bytes:
        return generate_latest(self.registry)
