"""Crash safety with the real daemon as a subprocess: kill -9, restarts and SIGTERM lose no
request and pay for none twice (issue 5). The harness is in tests/crash_harness.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import updates
from tests.crash_harness import (
    FINAL_STATUSES,
    REPO,
    Daemon,
    count_by,
    exists,
    integrity,
    query,
)
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import is_pg

pytestmark = pytest.mark.slow

CHAT = updates.DEFAULT_CHAT_ID
MakeDaemon = Callable[..., Daemon]


@pytest.fixture
async def daemon(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    store_target: str,
) -> AsyncIterator[MakeDaemon]:
    """`daemon(mode=..., runner={...})` makes a Daemon on the test's store (SQLite, or
    PostgreSQL with --store postgresql); every one is killed at teardown."""
    made: list[Daemon] = []

    def make(**sections: Any) -> Daemon:
        made.append(Daemon(tmp_path, telegram, replicate, fal, database=store_target, **sections))
        return made[-1]

    yield make
    for one in made:
        await one.close()


async def test_kill_during_slow_prediction_polls_it_after_restart(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """kill -9 while a slow prediction runs: after the restart that prediction is polled, not
    created again, and the photo arrives once."""
    replicate.latency_s = 3.0
    bot = daemon()
    await bot.start()
    telegram.push_update(updates.command("/generate a slow painting"))
    await bot.wait_jobs(lambda rows: bool(rows) and rows[0]["provider_request_id"] is not None)
    await bot.kill()
    (row,) = bot.jobs()
    assert (row["status"], row["phase"]) == ("running", "submitted")
    polls_before = replicate.last_prediction.polls
    await bot.start()
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=15)
    await bot.wait_jobs(lambda rows: rows[0]["status"] == "succeeded")
    assert len(replicate.creates) == 1
    assert replicate.last_prediction.polls > polls_before
    (row,) = bot.jobs()
    assert row["provider_request_id"] == replicate.last_prediction.id
    assert len(telegram.photos(CHAT)) == 1
    code, _ = await bot.terminate(sig=signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM
    assert code == 0


# -- kill -9 at random moments during a stream of /generate and /edit -------------------------

SEED = int(os.environ.get("CRASH_SEED", "3"))
KILLS = int(os.environ.get("CRASH_KILLS", "20"))  # webhook mode; polling mode gets a third
STREAM_CHATS = (1001, 1002, 1003, 1004)
TRIGGERS = (
    "activity",
    "ack",
    "create",
    "submit",
    "status",
    "poll",
    "download",
    "photo",
    "startup",
)


@dataclass
class Sent:
    """One update the fake Telegram was given for the bot."""

    update_id: int
    kind: str
    prompt: str
    chat_id: int
    message_id: int


@dataclass
class Stream:
    """Feeds unique /generate and /edit requests and picks kill moments from what the fakes see."""

    daemon: Daemon
    rng: random.Random
    photo_file_id: str
    sent: dict[int, Sent] = field(default_factory=dict)
    delivering_at_kill: set[int] = field(default_factory=set)
    submitting_at_kill: set[int] = field(default_factory=set)
    triggers: list[str] = field(default_factory=list)

    def push(self, count: int) -> None:
        for _ in range(count):
            n = len(self.sent) + 1
            chat = self.rng.choice(STREAM_CHATS)
            if self.rng.random() < 0.35:
                prompt = f"edit number {n} make it teal"
                update = updates.photo_message(
                    self.photo_file_id, caption=f"/edit {prompt}", chat_id=chat, user_id=chat
                )
                kind = "edit"
            else:
                prompt = f"generate number {n} a lighthouse"
                update = updates.command(f"/generate {prompt}", chat_id=chat, user_id=chat)
                kind = "generate"
            message_id = update["message"]["message_id"]
            self.sent[update["update_id"]] = Sent(
                update["update_id"], kind, prompt, chat, message_id
            )
            self.daemon.telegram.push_update(update)

    def acknowledged(self) -> set[int]:
        """Updates Telegram was told the bot has: a 2xx webhook answer, or a later offset."""
        tg = self.daemon.telegram
        if self.daemon.mode == "webhook":
            return tg.webhook_acked_update_ids
        return tg.confirmed_update_ids

    def counter(self, trigger: str) -> Callable[[], int]:
        tg, rep, fal = self.daemon.telegram, self.daemon.replicate, self.daemon.fal
        return {
            "activity": lambda: len(tg.calls) + len(rep.calls) + len(fal.calls),
            "startup": lambda: len(tg.calls) + len(rep.calls) + len(fal.calls),
            "ack": lambda: len(self.acknowledged()),
            "create": lambda: len(rep.creates),
            "submit": lambda: len(fal.submits),
            "status": lambda: len(tg.calls_of("sendMessage")),
            "photo": lambda: len(tg.calls_of("sendPhoto")),
            "poll": lambda: len(rep.calls_of("get")) + len(fal.calls_of("status")),
            "download": lambda: len(rep.calls_of("file")) + len(fal.calls_of("file")),
        }[trigger]

    async def kill_at_random_moment(self) -> None:
        """Run the daemon until a randomly chosen event (or a random bound), then kill -9."""
        trigger = self.rng.choice(TRIGGERS)
        self.triggers.append(trigger)
        count = self.counter(trigger)
        steps = self.rng.randint(1, 40) if trigger == "activity" else self.rng.randint(1, 3)
        if trigger == "startup":
            steps = self.rng.randint(0, 4)
        within = self.rng.uniform(0.2, 1.5)
        base = count()
        await self.daemon.start(wait=trigger != "startup")
        if trigger != "startup":
            if self.rng.random() < 0.3:
                # A slow vendor widens the window between sending a create and saving its id.
                self.daemon.replicate.delay_next("create", 0.3)
                self.daemon.fal.delay_next("submit", 0.3)
            self.push(self.rng.randint(1, 4))
            base = count()
        # The kill moment: as soon as the chosen event happened, or after `within` seconds.
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: count() >= base + steps, within=within, interval=0.002)
        await self.daemon.kill()
        self.after_kill()

    def after_kill(self) -> None:
        db = self.daemon.db_path
        if not exists(db):
            return
        assert integrity(db) == "ok"
        for row in query(db, "SELECT id, phase FROM jobs WHERE status = 'running'"):
            if row["phase"] == "delivering":
                self.delivering_at_kill.add(row["id"])
            elif row["phase"] == "submitting":
                self.submitting_at_kill.add(row["id"])


def vendor_calls(replicate: FakeReplicate, fal: FakeFal) -> dict[str, int]:
    """Create/submit calls per prompt, as the vendors received them."""
    prompts = [str(c.params.get("input", {}).get("prompt")) for c in replicate.creates]
    prompts += [str(c.params.get("prompt")) for c in fal.submits]
    return count_by(prompts)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("mode", "kills"), [("webhook", KILLS), ("polling", max(1, KILLS // 3))])
async def test_kill_9_at_random_moments_loses_nothing_and_charges_nothing_twice(
    mode: str,
    kills: int,
    daemon: MakeDaemon,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
) -> None:
    """At least 20 kill -9s at random moments of a /generate + /edit stream (webhook mode):
    every acknowledged update has exactly one job, every job ends final, no job was created at
    a vendor twice, every succeeded job's photo is in the chat once (a repeat only for a job
    killed between its send and its record, counted apart) and every failed job was told."""
    print(f"\ncrash stream ({mode}): CRASH_SEED={SEED} CRASH_KILLS={KILLS}")  # noqa: T201
    started = time.monotonic()
    rng = random.Random(f"{SEED}-{mode}")
    replicate.latency_s = 0.3
    fal.latency_s = 0.3
    photo = make_image(48, 32, (200, 80, 20))
    bot = daemon(mode=mode, runner={"max_running": 4})
    stream = Stream(bot, rng, telegram.add_file(photo))
    for _ in range(kills):
        await stream.kill_at_random_moment()

    # Settle: one more start, then everything acknowledged, one job each, all final.
    await bot.start()
    wanted = set(stream.sent)
    await wait_until(lambda: wanted <= stream.acknowledged(), within=30)
    await bot.wait_jobs(
        lambda rows: (
            {r["update_id"] for r in rows} >= wanted
            and all(r["status"] in FINAL_STATUSES for r in rows)
        ),
        within=40,
    )
    code, stop_s = await bot.terminate()
    assert code == 0
    assert integrity(bot.db_path) == "ok"

    jobs = bot.jobs()
    by_update = count_by(str(r["update_id"]) for r in jobs)
    acknowledged = wanted & stream.acknowledged()
    lost = sorted(u for u in acknowledged if str(u) not in by_update)
    twice = sorted(u for u, n in by_update.items() if n > 1)
    creates = vendor_calls(replicate, fal)
    double_created = sorted(p for p, n in creates.items() if n > 1)
    photos: dict[int, int] = {}
    for chat in STREAM_CHATS:
        for message in telegram.photos(chat):
            key = message.reply_to_message_id or 0
            photos[key] = photos.get(key, 0) + 1
    commands = {r["command_message_id"] for r in jobs}
    stray = sorted(k for k in photos if k not in commands)
    missing, duplicated_in_window, duplicated_outside = [], [], []
    unanswered, failed_with_photo = [], []
    for row in jobs:
        sent = stream.sent[row["update_id"]]
        assert row["prompt"] == sent.prompt and row["kind"] == sent.kind
        n = photos.get(row["command_message_id"], 0)
        if row["status"] == "succeeded":
            if n == 0:
                missing.append(row["id"])
            elif n > 1:
                window = row["id"] in stream.delivering_at_kill
                (duplicated_in_window if window else duplicated_outside).append(row["id"])
            assert row["provider_request_id"]
        else:
            if n:
                failed_with_photo.append(row["id"])
            told = f"Sorry, job {row['id']} failed"
            if not any(t.startswith(told) for t in telegram.texts(row["chat_id"])):
                unanswered.append(row["id"])
    outcomes = count_by(
        r["status"] if r["status"] != "failed" else f"failed:{r['error_code']}" for r in jobs
    )
    # Status lines ("Generating… (job 7)") still showing after their job ended: the one the
    # row names (not removed when the process died after the final record) or an earlier one
    # whose id was never saved (the process died between sending it and saving its id).
    status_ids = {r["status_message_id"] for r in jobs}
    stale_status = [
        m.message_id in status_ids
        for chat in STREAM_CHATS
        for m in telegram.messages(chat)
        if m.kind == "text" and re.search(r"\(job \d+\)$", m.text or "")
    ]
    told_twice = [
        r["id"]
        for r in jobs
        if r["status"] == "failed"
        and sum(t.startswith(f"Sorry, job {r['id']} failed") for t in telegram.texts(r["chat_id"]))
        > 1
    ]
    kept = {name for r in jobs for name in json.loads(r["result_paths"])}
    orphan_files = sorted(p.name for p in bot.results_dir.glob("*") if p.name not in kept)
    # results kept as result_blobs rows (PostgreSQL's default) that no job names
    kept_keys = {name.split(".")[0] for name in kept}
    blob_rows = query(bot.db_path, "SELECT job_id, n FROM result_blobs")
    blob_keys = [f"{r['job_id']}-{r['n']}" for r in blob_rows]
    orphan_files += [key for key in blob_keys if key not in kept_keys]
    figures = {
        "mode": mode,
        "seed": SEED,
        "kills": bot.kills,
        "starts": bot.starts,
        "kill_triggers": count_by(stream.triggers),
        "updates": len(stream.sent),
        "acknowledged": len(acknowledged),
        "jobs": len(jobs),
        "outcomes": outcomes,
        "lost": len(lost),
        "jobs_per_update_over_1": len(twice),
        "duplicated_photos_send_record_window": len(duplicated_in_window),
        "duplicated_photos_outside_window": len(duplicated_outside),
        "delivering_at_a_kill": len(stream.delivering_at_kill),
        "submitting_at_a_kill": len(stream.submitting_at_kill),
        "double_created": len(double_created),
        "vendor_creates": sum(creates.values()),
        "missing_photos": len(missing),
        "stray_photos": len(stray),
        "failure_told_twice": len(told_twice),
        "stale_status_lines_recorded": sum(stale_status),
        "stale_status_lines_unrecorded": len(stale_status) - sum(stale_status),
        "orphan_result_files": len(orphan_files),
        # Where each run of a job started: `new` is a first run (or a resumed not-yet-submitted
        # job), the others are resumes after a kill.
        "job_runs_by_phase": count_by(e.get("phase", "?") for e in bot.log_events("job_started")),
        "delivery_repeated_logged": len(bot.log_events("delivery_repeated")),
        "sigterm_stop_s": round(stop_s, 2),
        "seconds": round(time.monotonic() - started, 1),
    }
    print("crash stream figures:", json.dumps(figures))  # noqa: T201
    assert bot.kills == kills
    assert len(acknowledged) == len(stream.sent), "an update was never acknowledged"
    assert lost == [], f"acknowledged updates without a job: {lost}"
    assert twice == [], f"updates with more than one job: {twice}"
    assert double_created == [], f"prompts created at a vendor twice: {double_created}"
    assert missing == [], f"succeeded jobs without their photo: {missing}"
    assert duplicated_outside == [], (
        f"photos sent twice outside the send window: {duplicated_outside}"
    )
    assert stray == [], f"photos that answer no job: {stray}"
    assert failed_with_photo == [], f"failed jobs that sent a photo: {failed_with_photo}"
    assert unanswered == [], f"failed jobs whose user was not told: {unanswered}"
    # A job may fail only because it was killed while its create/submit was in flight.
    for row in jobs:
        if row["status"] == "failed":
            assert row["error_code"] == "submit_unknown", dict(row)
            assert row["id"] in stream.submitting_at_kill


# -- graceful stop ----------------------------------------------------------------------------


async def test_sigterm_with_jobs_in_flight_exits_0_and_resumes(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """SIGTERM with one prediction waiting, one create in flight and two jobs queued behind
    runner.max_running: exit 0 well within TimeoutStopSec, the create in flight is saved (not
    left unknown), and after a restart every job completes with no second create."""
    replicate.latency_s = 5.0
    bot = daemon(runner={"max_running": 2})
    await bot.start()
    prompts = [f"stopped number {n}" for n in range(1, 5)]
    telegram.push_update(updates.command(f"/generate {prompts[0]}"))
    await bot.wait_jobs(lambda rows: len(rows) == 1 and rows[0]["phase"] == "submitted")
    replicate.delay_next("create", 3.0)  # the second create is in flight at SIGTERM
    for prompt in prompts[1:]:
        telegram.push_update(updates.command(f"/generate {prompt}"))
    await wait_until(lambda: len(replicate.creates) == 2)
    await bot.wait_jobs(lambda rows: [r["status"] for r in rows].count("queued") == 2)
    phases = [(r["status"], r["phase"]) for r in bot.jobs()]
    assert phases == [
        ("running", "submitted"),
        ("running", "submitting"),
        ("queued", "new"),
        ("queued", "new"),
    ]
    # imagebot.service's TimeoutStopSec=45: terminate() fails the test if the stop takes longer
    code, stop_s = await bot.terminate(within=45)
    print(f"\nSIGTERM stop took {stop_s:.2f} s")  # noqa: T201
    assert code == 0
    assert bot.log_events("stopped"), "the last log line of the run was written"
    rows = bot.jobs()
    assert [r["status"] for r in rows] == ["running", "running", "queued", "queued"]
    assert [r["phase"] for r in rows[:2]] == ["submitted", "submitted"]  # the create was saved
    assert all(r["provider_request_id"] for r in rows[:2])
    assert integrity(bot.db_path) == "ok"

    replicate.latency_s = 0.3  # the queued two, created after the restart
    await bot.start()
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 4, within=30)
    await bot.wait_jobs(lambda rows: all(r["status"] == "succeeded" for r in rows))
    code, _ = await bot.terminate()
    assert code == 0
    assert sorted(vendor_calls(replicate, FakeFal()).items()) == [(p, 1) for p in prompts]
    assert sorted(p.caption or "" for p in telegram.photos(CHAT)) == prompts


async def test_updates_sent_while_stopping_are_not_lost(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Updates Telegram delivers while the bot stops are either saved or refused (503 /
    connection refused) and resent: after the restart each has exactly one job and one photo."""
    replicate.latency_s = 1.0
    bot = daemon()
    await bot.start()
    telegram.push_update(updates.command("/generate before the stop"))
    await bot.wait_jobs(lambda rows: len(rows) == 1 and rows[0]["phase"] == "submitted")
    assert bot.proc is not None
    bot.proc.send_signal(signal.SIGTERM)
    for n in range(5):
        telegram.push_update(updates.command(f"/generate during the stop {n}"))
    assert await bot.proc.wait() == 0
    await bot.start()
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 6, within=30)
    await bot.wait_jobs(
        lambda rows: len(rows) == 6 and all(r["status"] == "succeeded" for r in rows)
    )
    assert telegram.pending_update_count == 0
    assert all(n == 1 for n in vendor_calls(replicate, FakeFal()).values())


# -- the database after kill -9 ---------------------------------------------------------------


async def test_database_left_by_kill_9_opens_migrates_and_checks_ok(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A database killed during its first migration and again mid-stream passes PRAGMA
    integrity_check (read with the sqlite3 module), opens and migrates at the next start, and
    the jobs of the killed run complete."""
    replicate.latency_s = 1.0
    bot = daemon()
    await bot.start(wait=False)
    await wait_until(lambda: exists(bot.db_path), within=15, interval=0.001)
    await bot.kill()  # as early as the file exists: the migration may be half way
    assert integrity(bot.db_path) == "ok"
    await bot.start()
    assert integrity(bot.db_path) == "ok"
    names = [r["name"] for r in query(bot.db_path, "SELECT name FROM schema_migrations")]
    dialect = "postgresql" if is_pg(bot.db_path) else "sqlite"
    assert names == sorted(p.stem for p in (REPO / "migrations" / dialect).glob("[0-9]*.sql"))
    assert names
    for n in range(8):
        telegram.push_update(updates.command(f"/generate integrity {n}"))
    # Every create answered (so none is left of unknown outcome), then die mid-delivery.
    await bot.wait_jobs(
        lambda rows: len(rows) == 8 and all(r["provider_request_id"] for r in rows)
    )
    await wait_until(lambda: len(telegram.photos(CHAT)) >= 3, interval=0.002)
    await bot.kill()
    assert integrity(bot.db_path) == "ok"
    if not is_pg(bot.db_path):
        assert query(bot.db_path, "PRAGMA journal_mode")[0][0] == "wal"
    await bot.start()
    await bot.wait_jobs(
        lambda rows: len(rows) == 8 and all(r["status"] == "succeeded" for r in rows)
    )
    code, _ = await bot.terminate()
    assert code == 0
    assert integrity(bot.db_path) == "ok"


# -- vendor results that expired while the bot was down ----------------------------------------


@pytest.mark.parametrize("kind", ["generate", "edit"])
async def test_results_expired_while_down_fail_cleanly(
    kind: str,
    daemon: MakeDaemon,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
) -> None:
    """A job whose vendor outputs expired while the bot was down fails with results_expired,
    the user is told, nothing is created again, and the unit goes back (/usage shows 0 used)."""
    replicate.latency_s = fal.latency_s = 2.0
    bot = daemon()
    await bot.start()
    if kind == "generate":
        telegram.push_update(updates.command("/generate gone by morning"))
    else:
        file_id = telegram.add_file(make_image(40, 30))
        telegram.push_update(updates.photo_message(file_id, caption="/edit gone by morning"))
    await bot.wait_jobs(lambda rows: bool(rows) and rows[0]["phase"] == "submitted")
    await bot.kill()
    vendor = replicate if kind == "generate" else fal
    request = replicate.last_prediction if kind == "generate" else fal.last_request
    await wait_until(lambda: request.status in ("succeeded", "COMPLETED"), within=5)
    vendor.expire_outputs()
    await bot.start()
    await bot.wait_jobs(lambda rows: rows[0]["status"] == "failed")
    (row,) = bot.jobs()
    assert row["error_code"] == "results_expired"
    await telegram.wait_for(
        lambda: any(
            t.startswith("Sorry, job 1 failed: the result expired") for t in telegram.texts(CHAT)
        )
    )
    assert telegram.photos(CHAT) == []
    assert len(replicate.creates) + len(fal.submits) == 1
    telegram.push_update(updates.command("/usage"))
    await telegram.wait_for(
        lambda: any(t.startswith("Today (UTC):") for t in telegram.texts(CHAT))
    )
    usage = next(t for t in telegram.texts(CHAT) if t.startswith("Today (UTC):"))
    assert "0 of 10000 used" in usage.splitlines()[1 if kind == "generate" else 2]


async def test_failure_told_after_kill_between_record_and_message(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job whose failure was recorded but whose failure message had not reached the chat when
    the process died is told after the restart, once."""
    replicate.outcome = "failed"
    bot = daemon()
    await bot.start()
    # Telegram answers the failure edit with 429 for a while: the message waits in the bot.
    telegram.fail_method(
        "editMessageText", 429, "Too Many Requests: retry after 30", retry_after=30
    )
    telegram.push_update(updates.command("/generate refused at first"))
    await bot.wait_jobs(lambda rows: bool(rows) and rows[0]["status"] == "failed")
    await wait_until(lambda: bool(telegram.calls_of("editMessageText")))
    await bot.kill()
    assert not any(t.startswith("Sorry, job 1 failed") for t in telegram.texts(CHAT))
    await bot.start()
    # (on PostgreSQL the leftover is the maintenance leader's, which the new process becomes
    # once the killed one's lease runs out, and Telegram's 30 s flood wait is kept across the
    # restart in send_slots: every process of the bot honours it)
    await telegram.wait_for(
        lambda: any(t.startswith("Sorry, job 1 failed") for t in telegram.texts(CHAT)),
        within=45,
    )
    code, _ = await bot.terminate()
    assert code == 0
    told = [t for t in telegram.texts(CHAT) if t.startswith("Sorry, job 1 failed")]
    assert len(told) == 1
    assert len(replicate.creates) == 1


async def test_kill_during_submit_is_never_resubmitted(
    daemon: MakeDaemon, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """kill -9 while a create is in flight (the vendor took it, its id was never saved): after
    the restart the job is not created again but fails with submit_unknown, the user is told,
    the unit goes back, and the operator finds it in /jobs?status=failed."""
    bot = daemon()
    await bot.start()
    replicate.delay_next("create", 1.0)
    telegram.push_update(updates.command("/generate lost in the post"))
    await wait_until(lambda: len(replicate.creates) == 1)
    await bot.wait_jobs(lambda rows: bool(rows) and rows[0]["phase"] == "submitting")
    await bot.kill()
    await wait_until(lambda: len(replicate.predictions) == 1)  # the vendor did take it
    await bot.start()
    await bot.wait_jobs(lambda rows: rows[0]["status"] == "failed")
    await telegram.wait_for(
        lambda: any(
            t.startswith("Sorry, job 1 failed: I lost track") for t in telegram.texts(CHAT)
        )
    )
    status, listing = await bot.ops_get("/jobs?status=failed")
    code, _ = await bot.terminate()
    assert code == 0
    assert status == 200
    (job,) = listing["jobs"]
    assert (job["id"], job["error_code"], job["attempts"]) == (1, "submit_unknown", 1)
    assert len(replicate.creates) == 1
    assert telegram.photos(CHAT) == []
