"""Credit rules: what an operation costs, when a job pays, reserving and settling its credits.

The daily caps stay the free allowance. With credits enabled, a request past a free cap (or
with the cap at 0) is allowed if the user can pay: the job's credits are reserved in the
transaction that creates it (the same one that reads the caps), and settled when it ends:
a failed or canceled job gives all of them back, a job that delivered fewer images than it
reserved for gives back the rest. Admins never pay. The SQL is in store/ledger.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from imagebot.config import Settings
from imagebot.logs import get_logger
from imagebot.metrics import Metrics
from imagebot.models import Job, JobKind, JobStatus
from imagebot.policy import Decision, Policy, Reason
from imagebot.store.db import Conn
from imagebot.store.jobs import JobStore
from imagebot.store.ledger import Ledger, grant_welcome_in, reserve_in
from imagebot.store.usage import Counters

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Paid:
    """Allowed past the free allowance: the job reserves `credits` when it is created."""

    credits: int
    free_refusal: Decision  # the cap refusal the credits stand in for
    allowed: bool = True


JobDecision = Decision | Paid


class Credits:
    """The operator's prices applied to jobs (one instance per app)."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        policy: Policy,
        metrics: Metrics,
        store: JobStore,
    ) -> None:
        self.settings = settings
        self.config = settings.credits
        self.ledger = ledger
        self.policy = policy
        self.metrics = metrics
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def cost_per_image(self, kind: JobKind | str) -> int:
        name = kind.value if isinstance(kind, JobKind) else kind
        return int(getattr(self.config, f"{name}_cost", 0))

    def images_per_job(self, kind: JobKind) -> int:
        return max(1, self.settings.operation(kind).outputs_per_job)

    def job_cost(self, kind: JobKind, images: int | None = None) -> int:
        """Credits a paid job reserves: the per-image price times the images it asks for
        (`images`, default the operation's usual count)."""
        count = self.images_per_job(kind) if images is None else max(1, images)
        return self.cost_per_image(kind) * count

    # -- creating a job (these run on the writer thread, inside its transaction) -----------

    def decide(
        self,
        user_id: int,
        kind: JobKind,
        counters: Counters,
        now: datetime,
        images: int | None = None,
    ) -> JobDecision:
        """The policy's decision, except that a cap refusal becomes `Paid` when credits are
        on and the operation has a price (whether the balance covers it is checked next,
        in `after_insert`, in the same transaction). `images`: what the job asks for."""
        decision = self.policy.decide(user_id, kind, counters, now, images)
        if decision.allowed or decision.reason is not Reason.CAP or not self.enabled:
            return decision
        cost = self.job_cost(kind, images)
        if cost <= 0:
            return decision
        count = self.images_per_job(kind) if images is None else max(1, images)
        spend = self.policy.spend_decision(kind, count, counters, now)
        if not spend.allowed:
            return spend
        return Paid(cost, decision)

    def after_insert(self, conn: Conn, job_id: int, user_id: int, decision: JobDecision) -> None:
        """In the job's transaction: the welcome grant, then the reservation of a paid job
        (NotEnoughCredits rolls the whole transaction back: no job, nothing reserved)."""
        if not self.enabled:
            return
        if grant_welcome_in(conn, user_id, self.config.welcome_credits):
            log.info("credits_welcome", user_id=user_id, credits=self.config.welcome_credits)
        if isinstance(decision, Paid):
            reserve_in(conn, user_id, job_id, decision.credits)

    # -- ending a job ----------------------------------------------------------------------

    def due(self, job: Job, reserved: int) -> tuple[int, str]:
        """Credits a finished job keeps, and why: nothing unless it succeeded, and then only
        for the images the user got (withheld or missing ones are given back)."""
        if job.status is not JobStatus.SUCCEEDED:
            return 0, f"job {job.id} {job.status.value}: credits returned"
        per_image = self.cost_per_image(job.kind)
        wanted = job.images_asked or self.images_per_job(job.kind)
        if job.images_delivered is not None:  # withheld images are not paid for
            delivered = job.images_delivered
        else:
            delivered = len(job.result_file_ids) if job.result_file_ids else wanted
        kept = min(reserved, per_image * min(delivered, wanted))
        if kept < reserved:
            return kept, f"job {job.id} delivered {delivered} of {wanted} images"
        return kept, f"job {job.id} delivered"

    async def settle(self, job: Job) -> None:
        """A job reached a final status: settle its reservation (once; a no-op otherwise)."""
        if not job.status.is_final:
            return
        reserved = await self._reserved(job.id)
        if reserved is None:
            return
        due, note = self.due(job, reserved)
        settled = await self.ledger.settle_job(job.id, due, note)
        if settled is None:
            return
        _, returned = settled
        kept = reserved - returned
        if kept:
            self.metrics.credits_spent.labels(job.kind.value).inc(kept)
        log.info(
            "job_credits_settled",
            job_id=job.id,
            user_id=job.user_id,
            reserved=reserved,
            returned=returned,
            status=job.status.value,
        )

    async def _reserved(self, job_id: int) -> int | None:
        row = await self.ledger.db.fetchone(
            "SELECT credits FROM credit_ledger WHERE kind = 'spend' AND job_id = ?", (job_id,)
        )
        return -int(row[0]) if row else None

    async def settle_leftovers(self) -> int:
        """Settle final jobs a crash left unsettled (run at start-up and periodically)."""
        settled = 0
        for job_id in await self.ledger.unsettled_final_jobs():
            job = await self.store.get(job_id)
            if job is not None:
                await self.settle(job)
                settled += 1
        return settled
