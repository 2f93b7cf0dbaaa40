"""The side HTTP server for operators: /healthz, /jobs, /jobs/{id}, /metrics. Read-only.

/jobs and /metrics need `Authorization: Bearer $IMAGEBOT_OPS_TOKEN` whenever a token is set
(start-up insists on one when ops.listen is not a loopback address); /healthz stays open.
"""

from __future__ import annotations

import contextlib
import hmac
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imagebot import __version__
from imagebot.clock import iso, parse_iso
from imagebot.cluster import MAINTENANCE
from imagebot.health import Heartbeat
from imagebot.logs import Redactor
from imagebot.metrics import CONTENT_TYPE
from imagebot.models import Job, JobKind, JobStatus
from imagebot.store.db import STORE_READ_ERRORS
from imagebot.store.jobs import JobFilter
from imagebot.threaded_site import ListenError, start_site

if TYPE_CHECKING:
    # Typing only: the ops server reads the app object but never imports the runner layers.
    from imagebot.services import Services

SERVICES: web.AppKey[Services] = web.AppKey("services")


@dataclass
class OpsState:
    """What /healthz reports besides the store: set by app.py as the process starts and stops."""

    heartbeat: Heartbeat
    ready: bool = False
    stopping: bool = False


STATE = web.AppKey("state", OpsState)
REDACTOR = web.AppKey("redactor", Redactor)


def job_json(job: Job, redactor: Redactor | None = None) -> dict[str, Any]:
    """A job as /jobs shows it. No column is meant to hold a secret; the redactor makes sure
    (a vendor's error text echoing a key, a pasted token) before anything leaves the process."""
    data = asdict(job)
    for key in ("kind", "status", "phase"):
        data[key] = str(data[key])
    if redactor is None:
        return data
    return {key: redactor.scrub(value) for key, value in data.items()}


def _authorized(request: web.Request) -> bool:
    token = request.app[SERVICES].settings.ops_token
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/healthz") or _authorized(request):
        response: web.StreamResponse = await handler(request)
        return response
    return web.json_response(
        {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
    )


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def healthz(request: web.Request) -> web.Response:
    """Ready: database reachable, intake running, event loop responsive. 503 otherwise."""
    services, state = request.app[SERVICES], request.app[STATE]
    database = await services.db.is_healthy()
    # The last write (a job's, an update's, or the periodic probe) reached the database:
    # a full disk or an I/O error makes the bot not ready until one succeeds again.
    writes = services.db.writes.ok
    intake = services.intake.running
    loop = state.heartbeat.is_responsive()
    ready = state.ready and not state.stopping and database and writes and intake and loop
    body: dict[str, Any] = {
        "status": "ok" if ready else ("stopping" if state.stopping else "unavailable"),
        "live": True,
        "ready": ready,
        "version": __version__,
        "mode": services.settings.telegram.mode,
        "checks": {
            "database": database,
            "database_writes": writes,
            "intake": intake,
            "event_loop": loop,
        },
        "loop_lag_ms": round(state.heartbeat.lag_s * 1000, 1),
    }
    # Each provider's circuit breaker (closed / open / half_open). An open circuit does not
    # make the bot unready: it answers users, and a restart would not fix the vendor.
    body["circuits"] = services.runner.pipeline.breakers.states()
    # An admin's /pause (new requests refused, running ones finish): ready all the same.
    control = services.control
    if control is not None:
        body["paused"] = control.paused
        if control.paused:
            body["pause_message"] = control.pause_state.message
    if not writes:
        body["database_write_error"] = services.db.writes.last_error
    if database:
        counts = await services.store.counts()
        body.update(queued=counts["queued"], running=counts["running"])
        waiting = await services.store.waiting_counts()
        # made results (and failure/cancel notices) waiting for Telegram to take them
        body.update(deliveries_waiting=waiting["deliveries"], notices_waiting=waiting["notices"])
    body["node"] = _node(services)
    if database:
        with contextlib.suppress(*STORE_READ_ERRORS):
            body["peers"], body["lease_holders"] = await _peers(services)
    return web.json_response(body, status=200 if ready else 503)


def _node(services: Services) -> dict[str, Any]:
    """This process among the others: its id, roles and the leases it holds now."""
    cluster = services.cluster
    return {
        "id": cluster.node_id,
        "roles": sorted(cluster.roles),
        "leases": [name for name in cluster.leases_wanted() if cluster.holds(name)],
        # False while its heartbeat is overdue: it starts no vendor call and no send
        "trusted": cluster.trusted,
    }


async def _peers(services: Services) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The live processes on the database (this one included) with their heartbeat's age by
    the database's clock, and which process holds each lease."""
    cluster = services.cluster
    peers = await cluster.peers()
    row = await services.db.fetchone(f"SELECT {services.db.clock_sql()} AS now")
    now = parse_iso(str(row["now"])) if row is not None else None
    listed = []
    for peer in peers:
        age = (now - parse_iso(peer.heartbeat_at)).total_seconds() if now is not None else None
        listed.append(
            {
                "id": peer.id,
                "host": peer.host,
                "pid": peer.pid,
                "roles": list(peer.roles),
                "ops_port": peer.ops_port,
                "started_at": peer.started_at,
                "heartbeat_age_s": round(max(age, 0.0), 1) if age is not None else None,
                "self": peer.id == cluster.node_id,
            }
        )
    return listed, await cluster.store.holders()


async def livez(request: web.Request) -> web.Response:
    """Live: the process answers (what a restart would fix is a 'no' here, not a busy bot)."""
    return web.json_response({"live": True, "version": __version__})


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "{name} must be an integer"}}', content_type="application/json"
        ) from None


async def list_jobs(request: web.Request) -> web.Response:
    """Newest first. Filters: status, kind, user_id, chat_id, since; pages with `before`."""
    services = request.app[SERVICES]
    query = request.query
    page_max = services.settings.ops.jobs_page_max
    try:
        status = JobStatus(query["status"]) if query.get("status") else None
        kind = JobKind(query["kind"]) if query.get("kind") else None
    except ValueError:
        return _bad(
            "status must be one of queued, running, succeeded, failed, canceled; "
            "kind one of generate, edit"
        )
    since = query.get("since")
    if since:
        try:
            moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            return _bad("since must be an ISO-8601 time, e.g. 2026-11-21T00:00:00Z")
        # Without an offset it is UTC, like every time imagebot stores.
        since = iso(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    limit = _int(query.get("limit"), "limit")
    if limit is None:
        limit = 50
    if limit < 1:
        return _bad("limit must be at least 1")
    limit = min(limit, page_max)
    flt = JobFilter(
        status=status,
        kind=kind,
        user_id=_int(query.get("user_id"), "user_id"),
        chat_id=_int(query.get("chat_id"), "chat_id"),
        since=since,
        before_id=_int(query.get("before"), "before"),
        limit=limit + 1,  # one more than shown: tells whether another page exists
    )
    jobs = await services.store.find(flt)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    redactor = request.app[REDACTOR]
    costs = await services.ledger.job_costs([j.id for j in jobs])
    return web.json_response(
        {
            "jobs": [job_json(j, redactor) | {"credits_cost": costs.get(j.id, 0)} for j in jobs],
            "count": len(jobs),
            "next_before": jobs[-1].id if more else None,
        }
    )


async def get_job(request: web.Request) -> web.Response:
    job_id = _int(request.match_info["job_id"], "job id")
    services = request.app[SERVICES]
    job = await services.store.get(job_id or 0)
    if job is None:
        return web.json_response({"error": "no such job"}, status=404)
    costs = await services.ledger.job_costs([job.id])
    return web.json_response(
        job_json(job, request.app[REDACTOR]) | {"credits_cost": costs.get(job.id, 0)}
    )


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    cluster, gauges = services.cluster, services.metrics
    gauges.node_info.labels(cluster.node_id, ",".join(sorted(cluster.roles))).set(1)
    for lease in cluster.leases_wanted():
        gauges.leases_held.labels(lease).set(1 if cluster.holds(lease) else 0)
    # Cluster-wide gauges (the database's numbers) come from the maintenance lease's holder
    # only: a sum over processes counts them once. Read at scrape time: one query per scrape.
    leader = cluster.holds(MAINTENANCE)
    gauges.cluster_gauges.exported = leader
    if leader:
        with contextlib.suppress(*STORE_READ_ERRORS):
            counts = await services.store.counts()
            gauges.jobs_queued.set(counts["queued"])
            gauges.cluster_jobs_running.set(counts["running"])
        with contextlib.suppress(*STORE_READ_ERRORS):
            waiting = await services.store.waiting_counts()
            gauges.deliveries_waiting.set(waiting["deliveries"])
            gauges.notices_waiting.set(waiting["notices"])
        with contextlib.suppress(*STORE_READ_ERRORS):
            gauges.cluster_nodes.set(len(await cluster.peers()))
    services.metrics.database_writes_ok.set(1 if services.db.writes.ok else 0)
    body = services.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(services: Services, state: OpsState) -> web.Application:
    app = web.Application(middlewares=[_auth])
    app[SERVICES] = services
    app[STATE] = state
    app[REDACTOR] = Redactor(services.settings.secret_values())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/healthz/ready", healthz)
    app.router.add_get("/healthz/live", livez)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get(r"/jobs/{job_id}", get_job)
    app.router.add_get("/metrics", metrics)
    return app


class OpsServer:
    """Runs the ops app on ops.listen:ops.port inside the bot's event loop."""

    def __init__(self, services: Services, state: OpsState) -> None:
        self._app = build_app(services, state)
        self._runner: web.AppRunner | None = None
        self.settings = services.settings.ops
        self.port: int | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen, self.settings.port)
        try:
            self.port = await start_site(site, self.settings.listen, self.settings.port)
        except ListenError as exc:
            raise exc.for_section("ops") from exc

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
