"""The database refuses writes (disk full, I/O error) under a real daemon: /healthz says not
ready, jobs pause instead of failing, updates are resent by Telegram and served (issue 13).

The fault is real: the daemon runs as a subprocess and the test shrinks its file-size limit
from outside (`prlimit RLIMIT_FSIZE`). CPython ignores SIGXFSZ, so every write SQLite makes
past the limit fails with EFBIG ("disk I/O error" / "database or disk is full"), as on a full
disk; raising the limit again ends the fault. The daemon's log goes through a pipe, which
the limit does not touch.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import updates
from tests.crash_harness import Daemon, integrity
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CHAT = updates.DEFAULT_CHAT_ID
log = logging.getLogger(__name__)
FAST = {
    "runner": {"sweep_interval_s": 0.2, "stale_slack_s": 0},
    "generate": {"timeout_s": 2, "daily_cap": 100},
    "delivery": {
        "retry_base_s": 0.2,
        "retry_max_s": 0.5,
        "check_interval_s": 0.2,
        "write_probe_interval_s": 1,
    },
}


@pytest.fixture
async def daemon(
    tmp_path: Path, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> AsyncIterator[Daemon]:
    """A webhook-mode daemon whose log is piped (so a file-size limit spares it)."""
    one = Daemon(tmp_path, telegram, replicate, fal, **FAST)
    one.pipe_logs = True
    yield one
    await one.close()


def set_file_limit(bot: Daemon, soft: int) -> None:
    """Set the daemon's RLIMIT_FSIZE soft limit (bytes), keeping its hard limit."""
    assert bot.proc is not None
    _, hard = resource.prlimit(bot.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(bot.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.sqlite_only(
    reason="RLIMIT_FSIZE fills SQLite's own file; PostgreSQL's refusals are test_pg_restart's"
)
async def test_disk_full_pauses_jobs_and_the_bot_catches_up_afterwards(
    daemon: Daemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """While the database refuses writes: /healthz answers 503 naming database_writes, a job
    whose images are made is neither failed nor timed out by the sweep (its deadline passes),
    and a webhook update is answered 500; once writes work again /healthz is 200, the job is
    delivered once, the resent update makes its job and that is delivered too."""
    await daemon.start()
    # Made result waiting (Telegram refuses photos), so the fault meets a job past FETCHED.
    telegram.outage(502, frozenset({"sendPhoto"}))
    telegram.push_update(updates.command("/generate before the fault"))
    await daemon.wait_jobs(lambda rows: bool(rows) and rows[0]["deliver_after"] is not None)
    sizes = {p.name: p.stat().st_size for p in daemon.dir.glob("imagebot.db*")}
    assert min(sizes.values()) > 1, sizes  # so a 1-byte limit bites every file
    set_file_limit(daemon, 1)
    fault_started = time.monotonic()
    await wait_until(lambda: bool(daemon.log_events("store_writes_failing")), within=15)
    status, health = await daemon.ops_get("/healthz")
    assert status == 503 and health["checks"]["database_writes"] is False
    assert health["ready"] is False and health["database_write_error"]
    # An update arrives during the fault: not saved, so not acknowledged.
    during = updates.command("/generate during the fault")
    telegram.push_update(during)
    await wait_until(
        lambda: any(
            u == during["update_id"] and s == 500 for u, s, _ in telegram.webhook_deliveries
        ),
        within=15,
    )
    telegram.end_outage()  # Telegram takes photos again, but nothing can be recorded
    # Past the job's deadline (2 s, slack 0) with the sweep running every 0.2 s.
    await wait_until(lambda: time.monotonic() - fault_started > 4, within=10)
    (row,) = daemon.jobs()
    assert (row["status"], row["phase"]) == ("running", "delivering")
    assert telegram.photos(CHAT) == []
    assert during["update_id"] not in telegram.webhook_acked_update_ids
    set_file_limit(daemon, resource.RLIM_INFINITY)
    fault_s = time.monotonic() - fault_started
    lifted = time.monotonic()
    await wait_until(lambda: len(telegram.photos(CHAT)) == 2, within=20)
    caught_up_s = time.monotonic() - lifted
    await daemon.wait_jobs(lambda rows: [r["status"] for r in rows] == ["succeeded"] * 2)
    status, health = await daemon.ops_get("/healthz")
    rows = daemon.jobs()
    await daemon.terminate()
    assert status == 200 and health["checks"]["database_writes"] is True
    assert [r["error_code"] for r in rows] == [None, None]
    assert rows[1]["update_id"] == during["update_id"]
    assert during["update_id"] in telegram.webhook_acked_update_ids
    captions = sorted(p.caption or "" for p in telegram.photos(CHAT))
    assert "before the fault" in captions[0] and "during the fault" in captions[1]
    assert len(replicate.creates) == 2
    # (the job waited as "running, delivering" above: suspended at its refused write, paused
    # when the heartbeat could not be written either, or parked, as timing has it)
    assert daemon.log_events("store_writes_failing")
    assert daemon.log_events("store_writes_recovered")
    assert integrity(daemon.db_path) == "ok"
    refused = [s for u, s, _ in telegram.webhook_deliveries if u == during["update_id"]]
    log.info(
        "fault %.1f s, caught up %.2f s after, webhook answers meanwhile: %s",
        fault_s,
        caught_up_s,
        refused,
    )
