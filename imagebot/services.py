"""The one app object: every long-lived collaborator, built once in app.py and passed around."""

from __future__ import annotations

from dataclasses import dataclass

from imagebot.cluster import Cluster
from imagebot.config import Settings
from imagebot.control import Control
from imagebot.credits import Credits
from imagebot.delivery import Delivery
from imagebot.intake import Intake
from imagebot.metrics import Metrics
from imagebot.policy import Policy
from imagebot.progress import Progress
from imagebot.results import ResultFiles
from imagebot.stars import Stars
from imagebot.store.albums import AlbumStore
from imagebot.store.db import Database
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore
from imagebot.store.ledger import Ledger
from imagebot.store.prefs import PrefStore
from imagebot.store.stats import Stats
from imagebot.store.usage import Usage
from imagebot.worker import JobRunner


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    db: Database
    inbox: Inbox
    store: JobStore
    usage: Usage  # /usage counts, notice throttling
    ledger: Ledger  # credit entries (read by /jobs even with credits off)
    prefs: PrefStore  # /style and /settings choices, remix prompts
    stats: Stats  # the admins' /stats
    albums: AlbumStore  # parts of albums captioned /edit, until they go quiet
    policy: Policy
    runner: JobRunner
    delivery: Delivery
    progress: Progress
    metrics: Metrics
    results: ResultFiles
    intake: Intake
    cluster: Cluster  # this process among the others on the database (issue 16)
    credits: Credits | None = None  # credits.enabled: prices, reservations (issue 18)
    stars: Stars | None = None  # credits.enabled: invoices, payments, refunds
    control: Control | None = None  # allowlist in the database, invites, pause (issue 19)
