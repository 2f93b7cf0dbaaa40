"""Result images where every process reads them (issue 16): on PostgreSQL (results_store
"auto") and with results_store "database" on SQLite they are rows of result_blobs, so a
process with another results_dir delivers a job another fetched and answers 📎 Original;
retention removes them; migrate-store turns a SQLite bot's result files into rows."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from imagebot.app import _prune
from imagebot.cli import main
from imagebot.clock import iso, utcnow
from imagebot.config import load_settings
from imagebot.errors import ConfigError
from imagebot.models import JobKind, NewJob, Phase
from imagebot.policy import ALLOW
from imagebot.store.db import Database
from imagebot.store.jobs import JobStore
from imagebot.store.migrate import migrate
from tests import updates
from tests.conftest import BOT_TOKEN, REPLICATE_TOKEN
from tests.crash_harness import Daemon
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import execute, is_pg, query
from tests.support import answer, press

CHAT = updates.DEFAULT_CHAT_ID
GONE = "The original file isn't kept any more."
BLOB_ROW = b"\x89PNG\r\n\x1a\n a result kept as a row"


def shared_store(store_target: str) -> str:
    """The setting under test: PostgreSQL's default ("auto"), or "database" asked on SQLite."""
    return "auto" if is_pg(store_target) else "database"


def blobs(target: str) -> list[Any]:
    return query(
        target, "SELECT job_id, n, mime, size_bytes, created_at FROM result_blobs ORDER BY job_id"
    )


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def vendor_bytes(replicate: FakeReplicate) -> list[bytes]:
    """Every image the fake vendor made, oldest prediction first."""
    return [data for pid in replicate.predictions for data in replicate.output_bytes(pid)]


async def test_original_from_another_process(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, store_target: str, tmp_path: Path
) -> None:
    """A result fetched by one bot process is sent by 📎 Original from another process that
    has its own (empty) results directory: the chat gets the vendor's exact bytes as a
    document, no new provider call, and nothing was written to either disk."""
    first_dir, second_dir = tmp_path / "host-a", tmp_path / "host-b"
    store = shared_store(store_target)
    async with bot(storage={"results_dir": str(first_dir), "results_store": store}):
        telegram.push_update(updates.command("/generate a lighthouse"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    result = telegram.photos(CHAT)[0]
    made = vendor_bytes(replicate)
    async with bot(storage={"results_dir": str(second_dir), "results_store": store}):
        query_id = press(telegram, result, "o:1:0")
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1)
    document = telegram.documents(CHAT)[0]
    assert document.file_bytes == made[0]
    assert document.reply_to_message_id == result.message_id
    assert answer(telegram, query_id) is not None
    assert len(replicate.creates) == 1
    assert files_in(first_dir) == files_in(second_dir) == []
    (row,) = blobs(store_target)
    assert (row["job_id"], row["n"], row["mime"], row["size_bytes"]) == (
        1,
        0,
        "image/png",
        len(made[0]),
    )


async def test_auto_keeps_files_on_sqlite_and_rows_on_postgresql(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, store_target: str, tmp_path: Path
) -> None:
    """With the default results_store ("auto") the result is a file in results_dir on SQLite
    and a result_blobs row (no file) on PostgreSQL; 📎 Original sends it either way."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a harbour"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        press(telegram, telegram.photos(CHAT)[0], "o:1:0")
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1)
        results_dir = app.services.settings.storage.results_dir
    assert telegram.documents(CHAT)[0].file_bytes == vendor_bytes(replicate)[0]
    if is_pg(store_target):
        assert files_in(results_dir) == []
        assert [r["job_id"] for r in blobs(store_target)] == [1]
    else:
        assert files_in(results_dir) == ["1-0.png"]
        assert blobs(store_target) == []


async def test_retention_removes_blobs(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, store_target: str
) -> None:
    """The prune deletes the rows of results kept longer than results_retention_days (📎 then
    says the original is gone), those of jobs pruned by jobs_retention_days, and rows no job
    names; a recent result stays and 📎 still sends it."""
    async with bot(storage={"results_store": shared_store(store_target)}) as app:
        for n in range(3):
            telegram.push_update(updates.command(f"/generate keepsake {n}"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 3)
        await wait_until(
            lambda: (
                [r["phase"] for r in query(store_target, "SELECT phase FROM jobs")] == ["done"] * 3
            )
        )
        ago = {age: iso(utcnow() - timedelta(days=age)) for age in (10, 40)}
        for job_id, age in ((1, 40), (2, 10)):
            execute(
                store_target,
                "UPDATE jobs SET created_at = ?, finished_at = ? WHERE id = ?",
                (ago[age], ago[age], job_id),
            )
            execute(
                store_target,
                "UPDATE result_blobs SET created_at = ? WHERE job_id = ?",
                (ago[age], job_id),
            )
        # a job that failed after its results were kept, long ago: no row names them
        execute(
            store_target,
            "INSERT INTO result_blobs (job_id, n, mime, size_bytes, data, created_at)"
            " VALUES (99, 0, 'image/png', 4, ?, ?)",
            (b"\x89PNG", ago[10]),
        )
        await _prune(app.services)
        by_job = telegram.photos(CHAT)  # jobs 1, 2, 3 in order (one chat runs in order)
        gone = press(telegram, by_job[1], "o:2:0")
        kept = press(telegram, by_job[2], "o:3:0")
        await wait_until(lambda: answer(telegram, gone) is not None)
        await wait_until(lambda: len(telegram.documents(CHAT)) == 1)
    assert [r["job_id"] for r in blobs(store_target)] == [3]
    jobs = query(store_target, "SELECT id, result_paths FROM jobs ORDER BY id")
    assert [(j["id"], json.loads(j["result_paths"])) for j in jobs] == [(2, []), (3, ["3-0.png"])]
    assert answer(telegram, gone)["text"] == GONE
    assert answer(telegram, kept) is not None
    assert telegram.documents(CHAT)[0].file_bytes == vendor_bytes(replicate)[2]


async def test_resumed_after_kill_delivers_from_the_store(
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    store_target: str,
    tmp_path: Path,
) -> None:
    """A process killed with SIGKILL after it kept a result but before Telegram took it: the
    next process (on PostgreSQL another installation with its own directory, on SQLite the
    restarted one) delivers that very image without asking the vendor again."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    # a short lease: the second process may wait for the first's to lapse before taking over
    lease = {"heartbeat_s": 0.5, "lease_s": 2.0}
    first = Daemon(tmp_path / "a", telegram, replicate, fal, database=store_target, cluster=lease)
    second = (
        Daemon(tmp_path / "b", telegram, replicate, fal, database=store_target, cluster=lease)
        if is_pg(store_target)
        else first
    )
    target = str(first.db_path)  # the SQLite file in a/, or the PostgreSQL database
    try:
        await first.start()
        telegram.outage(502, frozenset({"sendPhoto"}))  # the result cannot be sent yet
        telegram.push_update(updates.command("/generate a kept result"))

        def kept_waiting() -> bool:
            found = query(target, "SELECT * FROM jobs")
            return bool(found) and found[0]["delivery_attempts"] >= 1

        await wait_until(kept_waiting, within=30)
        (row,) = query(target, "SELECT * FROM jobs")
        assert row["phase"] in (Phase.FETCHED.value, Phase.DELIVERING.value)
        await first.kill()
        telegram.end_outage()
        await second.start()
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=30)
        await second.wait_jobs(lambda jobs: jobs and jobs[0]["status"] == "succeeded")
    finally:
        for daemon in {first, second}:
            await daemon.close()
    assert telegram.photos(CHAT)[0].file_bytes == vendor_bytes(replicate)[0]
    assert len(replicate.creates) == 1
    if is_pg(store_target):
        assert files_in(first.results_dir) == files_in(second.results_dir) == []
        assert [r["job_id"] for r in blobs(target)] == [1]
    else:
        assert files_in(first.results_dir) == ["1-0.png"]


def test_results_store_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """storage.results_store other than auto, disk or database stops start-up naming the key."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("FAL_KEY", "id:secret")
    config = tmp_path / "config.toml"
    config.write_text('[storage]\nresults_store = "s3"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.key == "storage.results_store"


async def _sqlite_jobs_naming_results(source: Path) -> None:
    """A SQLite store with three finished jobs whose rows name results 1-0.png … 3-0.png, and
    job 3's image kept as a result_blobs row (results_store "database" on SQLite)."""
    db = Database(source)
    await db.open()
    try:
        await migrate(db)
        store = JobStore(db)
        for n in range(3):
            new = NewJob(JobKind.GENERATE, 100 + n, CHAT, CHAT, "private", f"p{n}", "local", {}, 0)
            _, job = await store.create(new, lambda conn: ALLOW)
            assert job is not None
            await store.update(job.id, result_paths=[f"{job.id}-0.png"], phase=Phase.DONE)
        await db.execute_write(
            "INSERT INTO result_blobs (job_id, n, mime, size_bytes, data, created_at)"
            " VALUES (3, 0, 'image/png', ?, ?, ?)",
            (len(BLOB_ROW), BLOB_ROW, iso()),
        )
    finally:
        await db.close()


def _sqlite_bot_with_results(source: Path, results: Path, images: dict[str, bytes]) -> None:
    """That store, and the result files it kept (written two days ago)."""
    asyncio.run(_sqlite_jobs_naming_results(source))
    results.mkdir()
    old = (utcnow() - timedelta(days=2)).timestamp()
    for name, data in images.items():
        (results / name).write_bytes(data)
        os.utime(results / name, (old, old))


def test_migrate_store_copies_result_files_into_rows(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate-store copies the result files a SQLite bot kept (results/ beside the database)
    into result_blobs with their bytes and file times, and SQLite's own result_blobs rows as
    they are; it says how many files and how many were already gone, and its row-count check
    still holds."""
    data = _tiny_png()
    source = tmp_path / "imagebot.db"
    _sqlite_bot_with_results(source, tmp_path / "results", {"1-0.png": data})
    assert main(["migrate-store", "--from", str(source), "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "row counts verified" in out
    assert f"copied 1 result files from {tmp_path / 'results'} into result_blobs" in out
    assert "(1 named by jobs were already gone)" in out  # job 2's file
    found = query(pg_url, "SELECT * FROM result_blobs ORDER BY job_id")
    assert [(r["job_id"], r["n"], r["mime"], r["size_bytes"]) for r in found] == [
        (1, 0, "image/png", len(data)),
        (3, 0, "image/png", len(BLOB_ROW)),
    ]
    assert [bytes(r["data"]) for r in found] == [data, BLOB_ROW]
    assert found[0]["created_at"] < iso(utcnow() - timedelta(days=1))


def test_migrate_store_refuses_a_missing_results_dir(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit --results-dir that does not exist is one line, exit 1, and copies nothing."""
    source = tmp_path / "imagebot.db"
    _sqlite_bot_with_results(source, tmp_path / "results", {})
    missing = tmp_path / "elsewhere"
    code = main(
        ["migrate-store", "--from", str(source), "--to", pg_url, "--results-dir", str(missing)]
    )
    assert code == 1
    assert f"--results-dir {missing}: no such directory" in capsys.readouterr().err
    assert (
        query(pg_url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")[0]["n"]
        == 0
    )


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


async def test_a_process_without_the_maintenance_lease_prunes_its_own_files(
    bot, tmp_path: Path
) -> None:
    """A process that is not the maintenance leader (here: no maintenance role) still removes
    result files on its own disk older than results_retention_days, and keeps recent ones."""
    results = tmp_path / "results"
    results.mkdir()
    old, recent = results / "7-0.png", results / "8-0.png"
    old.write_bytes(_tiny_png())
    recent.write_bytes(_tiny_png())
    stamp = (utcnow() - timedelta(days=8)).timestamp()
    os.utime(old, (stamp, stamp))
    async with bot(
        cluster={"roles": ["intake", "worker"]},
        storage={"prune_interval_s": 0.2, "results_dir": str(results)},
    ):
        await wait_until(lambda: not old.exists())
    assert files_in(results) == ["8-0.png"]
