"""Retention: the periodic prune drops processed inbox rows and finished jobs after their ages,
with their result files, and the database stays sound (issue 5)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from imagebot.app import _prune
from imagebot.clock import iso, utcnow
from imagebot.config import load_settings
from imagebot.errors import ConfigError
from tests import updates
from tests.conftest import BOT_TOKEN, REPLICATE_TOKEN
from tests.crash_harness import integrity as integrity_of
from tests.crash_harness import write
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import query

CHAT = updates.DEFAULT_CHAT_ID
DAY = 86400


def rows(app: Any, sql: str) -> list[Any]:
    return query(str(app.services.settings.storage.database), sql)


def is_processed(app: Any, update_id: int) -> bool:
    sql = "SELECT processed_at FROM inbox WHERE update_id = ?"
    found = query(str(app.services.settings.storage.database), sql, (update_id,))
    return bool(found) and found[0][0] is not None


def days_ago(days: float) -> str:
    return iso(utcnow() - timedelta(days=days))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def age_file(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))


async def three_finished_jobs(app: Any, telegram: FakeTelegram) -> list[dict[str, Any]]:
    sent = [updates.command(f"/generate keepsake {n}") for n in range(3)]
    for update in sent:
        telegram.push_update(update)
    await wait_until(lambda: len(telegram.photos(CHAT)) == 3)
    await wait_until(
        lambda: [r["phase"] for r in rows(app, "SELECT phase FROM jobs")] == ["done"] * 3
    )
    return sent


def backdate(app: Any, sent: list[dict[str, Any]]) -> None:
    """Job 1 finished 40 days ago, job 2 ten days ago, job 3 now; their updates likewise."""
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for job_id, age in ((1, 40), (2, 10)):
        statements.append(
            (
                "UPDATE jobs SET created_at = ?, finished_at = ? WHERE id = ?",
                (days_ago(age), days_ago(age), job_id),
            )
        )
        statements.append(
            (
                "UPDATE inbox SET received_at = ?, processed_at = ? WHERE update_id = ?",
                (days_ago(age), days_ago(age), sent[job_id - 1]["update_id"]),
            )
        )
    # Saved 10 days ago but never processed (its process, this one, still at it): kept until
    # it is.
    statements.append(
        (
            "INSERT INTO inbox (update_id, kind, received_at, payload, received_by)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                updates.next_update_id(),
                "message",
                days_ago(10),
                "{}",
                app.services.cluster.node_id,
            ),
        )
    )
    assert write(str(app.services.settings.storage.database), statements)[:4] == [1, 1, 1, 1]


async def test_periodic_prune_drops_old_rows_and_files(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With a short storage.prune_interval_s: a job finished 40 days ago goes with its files,
    one finished 10 days ago keeps its row but loses its files (7-day results retention),
    processed updates older than 8 days go while unprocessed and recent ones stay, a stray
    result file older than the retention goes, and PRAGMA integrity_check stays ok."""
    async with bot(storage={"prune_interval_s": 0.2, "results_store": "disk"}) as app:
        sent = await three_finished_jobs(app, telegram)
        results = Path(app.services.settings.storage.results_dir)
        files = {row["id"]: row["result_paths"] for row in rows(app, "SELECT * FROM jobs")}
        assert len(names(results)) == 3
        stray_old, stray_new = results / "99-0.png.tmp", results / "98-0.png"
        stray_old.write_bytes(b"half a write")
        stray_new.write_bytes(b"in flight")
        age_file(stray_old, 8)
        await asyncio.to_thread(backdate, app, sent)
        await wait_until(
            lambda: [r["id"] for r in rows(app, "SELECT id FROM jobs ORDER BY id")] == [2, 3]
        )
        await wait_until(lambda: not stray_old.exists())
        # A resend of a recent update still finds its inbox row: no second job (the /help
        # after it is answered only once the resend was handled: one chat runs in order).
        help_update = updates.command("/help")
        telegram.push_update(sent[2])
        telegram.push_update(help_update)
        await wait_until(lambda: any("/generate" in t for t in telegram.texts(CHAT)))
        await wait_until(lambda: is_processed(app, help_update["update_id"]))
        jobs = rows(app, "SELECT * FROM jobs ORDER BY id")
        inbox = rows(app, "SELECT * FROM inbox ORDER BY update_id")
        integrity = integrity_of(str(app.services.settings.storage.database))
    assert [(j["id"], j["result_paths"]) for j in jobs] == [(2, "[]"), (3, files[3])]
    assert names(results) == sorted(["98-0.png", *json.loads(files[3])])
    processed = [r["update_id"] for r in inbox if r["processed_at"]]
    assert sent[0]["update_id"] not in processed and sent[1]["update_id"] not in processed
    assert sent[2]["update_id"] in processed
    assert len([r for r in inbox if r["processed_at"] is None]) == 1
    assert integrity == "ok"
    assert len(replicate.creates) == 3
    assert len(telegram.photos(CHAT)) == 3


async def test_prune_once_with_nothing_old_changes_nothing(bot, telegram: FakeTelegram) -> None:
    """The prune on a database with only recent rows removes nothing (files included)."""
    async with bot(storage={"results_store": "disk"}) as app:
        await three_finished_jobs(app, telegram)
        before_jobs = rows(app, "SELECT * FROM jobs")
        before_inbox = rows(app, "SELECT * FROM inbox")
        results = Path(app.services.settings.storage.results_dir)
        before_files = names(results)
        await _prune(app.services)
        after_jobs = rows(app, "SELECT * FROM jobs")
        after_inbox = rows(app, "SELECT * FROM inbox")
    assert [dict(r) for r in after_jobs] == [dict(r) for r in before_jobs]
    assert [dict(r) for r in after_inbox] == [dict(r) for r in before_inbox]
    assert names(results) == before_files


def test_inbox_retention_below_7_days_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage.inbox_retention_days under 7 stops start-up: Telegram may resend an update for
    days, and a forgotten update_id would make a second job."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("FAL_KEY", "id:secret")
    config = tmp_path / "config.toml"
    config.write_text("[storage]\ninbox_retention_days = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.key == "storage.inbox_retention_days"
    config.write_text("[storage]\ninbox_retention_days = 7\n", encoding="utf-8")
    assert load_settings(config).storage.inbox_retention_days == 7
