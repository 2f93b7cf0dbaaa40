"""PostgreSQL as the store: configuration, start-up errors, `imagebot migrate-store`."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from pathlib import Path

import pytest

from imagebot.cli import main
from imagebot.models import Job, JobKind, NewJob
from imagebot.policy import ALLOW
from imagebot.store.db import Database
from imagebot.store.inbox import Inbox
from imagebot.store.jobs import JobStore
from imagebot.store.ledger import Ledger
from imagebot.store.migrate import migrate
from imagebot.store.prefs import Prefs, PrefStore
from imagebot.store.usage import Usage
from tests.crash_harness import environment, only_line, run_imagebot
from tests.storeview import query


def test_password_in_the_config_file_url_stops_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A postgresql:// URL with a password in config.toml exits 2 naming storage.database and
    where the password belongs instead."""
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndatabase = "postgresql://bot:s3cret@127.0.0.1:5432/imagebot"\n')
    assert main(["check-config", "--config", str(config)]) == 2
    err = only_line(capsys.readouterr().err)
    assert "storage.database" in err and "PGPASSWORD" in err
    assert "s3cret" not in err


def test_url_with_password_from_the_environment_is_accepted_and_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole URL in IMAGEBOT_STORAGE__DATABASE is fine; check-config never prints it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    monkeypatch.setenv(
        "IMAGEBOT_STORAGE__DATABASE", "postgresql://bot:s3cret@127.0.0.1:5432/imagebot"
    )
    assert main(["check-config"]) == 0
    printed = capsys.readouterr().out
    assert "s3cret" not in printed
    shown = json.loads(printed)["storage"]
    assert shown["database"] == "postgresql://bot:**********@127.0.0.1:5432/imagebot"
    assert not shown["results_dir"].startswith("postgresql")


def test_a_malformed_url_names_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A postgresql:// URL libpq cannot parse exits 2 naming storage.database."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndatabase = "postgresql://h/db?bogus=1"\n')
    assert main(["check-config", "--config", str(config)]) == 2
    assert "storage.database" in only_line(capsys.readouterr().err)


def test_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """No server at the URL's address: one line naming host and port, exit 1 (systemd
    retries), no traceback."""
    with socket.socket() as held:  # bound, never listening: a connect is refused, and no
        held.bind(("127.0.0.1", 0))  # other process can take the port while the bot runs
        port = held.getsockname()[1]
        env = environment(
            tmp_path,
            "http://127.0.0.1:9",
            IMAGEBOT_STORAGE__DATABASE=f"postgresql://postgres@127.0.0.1:{port}/imagebot",
        )
        done = run_imagebot(tmp_path, env, "--polling")
    assert done.returncode == 1
    line = only_line(done.stderr)
    assert f"127.0.0.1:{port}" in line and "storage.database" in line
    assert "Traceback" not in done.stderr + done.stdout


async def test_pg_variables_of_libpq_are_used(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL without host and port connects where PGHOST and PGPORT say (libpq's rules)."""
    host_port, dbname = pg_url.split("@", 1)[1].split("/", 1)
    host, port = host_port.split(":")
    monkeypatch.setenv("PGHOST", host)
    monkeypatch.setenv("PGPORT", port)
    monkeypatch.setenv("PGUSER", "postgres")
    db = Database(f"postgresql:///{dbname}")
    await db.open()
    try:
        assert await migrate(db)
        assert await db.is_healthy()
    finally:
        await db.close()


async def _sqlite_store_with_data(path: Path) -> None:
    db = Database(path)
    await db.open()
    await migrate(db)
    inbox, store, ledger = Inbox(db), JobStore(db), Ledger(db)
    await inbox.save([{"update_id": n, "message": {"text": "é"}} for n in range(1, 6)])
    for n in range(1, 5):
        new = NewJob(JobKind.GENERATE, n, 10, 10, "private", f"p{n}", "local", {"k": n}, 0.01)
        await store.create(new, lambda c: ALLOW)
    await store.update(2, output_urls=["http://x/2.png"], provider_request_id="pred-2")
    await db.execute_write("DELETE FROM jobs WHERE id = 4")  # the highest id SQLite gave: 4
    await ledger.grant(10, 7, "a grant")
    await ledger.set_sync_offset(3)
    await Usage(db).claim_notice(10, "not_allowed", 60)
    await db.close()


def test_migrate_store_copies_everything_and_refuses_a_second_time(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate-store copies every table with its rows, says what it did, keeps ids and their
    sequence (a new job gets a never-used id), and refuses a target that is not empty."""
    source = tmp_path / "imagebot.db"
    asyncio.run(_sqlite_store_with_data(source))
    assert main(["migrate-store", "--from", str(source), "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "row counts verified" in out
    sqlite_conn = sqlite3.connect(source)
    tables = [
        r[0]
        for r in sqlite_conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations'"
        )
    ]
    for table in tables:
        expected = sqlite_conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
        assert query(pg_url, f"SELECT count(*) AS n FROM {table}")[0]["n"] == expected, table  # noqa: S608
        assert f"  {table}" in out
    sqlite_conn.close()
    (job,) = query(pg_url, "SELECT * FROM jobs WHERE id = 2")
    assert job["provider_request_id"] == "pred-2"
    assert json.loads(job["output_urls"]) == ["http://x/2.png"]
    assert json.loads(job["params"]) == {"k": 2}
    assert job["created_at"].endswith("Z")
    assert query(pg_url, "SELECT next_offset FROM star_sync")[0]["next_offset"] == 3

    async def use_it() -> tuple[list[str], Job | None, int]:
        db = Database(pg_url)
        await db.open()
        try:
            applied = await migrate(db)
            new = NewJob(JobKind.GENERATE, 99, 10, 10, "private", "after", "local", {}, 0.01)
            _, made = await JobStore(db).create(new, lambda c: ALLOW)
            return applied, made, await Ledger(db).balance(10)
        finally:
            await db.close()

    applied, made, balance = asyncio.run(use_it())
    assert applied == [] and balance == 7
    assert made is not None and made.id == 5

    assert main(["migrate-store", "--from", str(source), "--to", pg_url]) == 1
    err = only_line(capsys.readouterr().err)
    assert "not empty" in err


def test_migrate_store_without_a_source_file_changes_nothing(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --from path that does not exist is one line, exit 1, and creates no file."""
    missing = tmp_path / "nope.db"
    assert main(["migrate-store", "--from", str(missing), "--to", pg_url]) == 1
    assert "no such SQLite database" in only_line(capsys.readouterr().err)
    assert not missing.exists()
    assert (
        query(pg_url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'")[0]["n"]
        == 0
    )


def test_timestamps_and_json_are_native_types_in_postgresql(pg_url: str) -> None:
    """psql sees timestamptz and jsonb columns, not text (the tables read like SQLite's)."""

    async def setup() -> None:
        db = Database(pg_url)
        await db.open()
        await migrate(db)
        await db.close()

    asyncio.run(setup())
    types = {
        (r["table_name"], r["column_name"]): r["data_type"]
        for r in query(
            pg_url,
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public'",
        )
    }
    assert types[("jobs", "created_at")] == "timestamp with time zone"
    assert types[("inbox", "payload")] == "jsonb"
    assert types[("jobs", "output_urls")] == "jsonb"
    assert types[("jobs", "chat_id")] == "bigint"
    text_times = [
        k for k, v in types.items() if k[1].endswith("_at") and v != "timestamp with time zone"
    ]
    assert text_times == []


def _message(update_id: int, chat_id: int) -> dict[str, object]:
    return {
        "update_id": update_id,
        "message": {"message_id": update_id, "date": 0, "chat": {"id": chat_id}, "text": "hi"},
    }


async def test_the_save_says_whether_an_earlier_update_of_the_chat_is_open(pg_url: str) -> None:
    """Several processes: an update saved while none of its chat's earlier ones is open needs
    no look before its handler runs; one saved behind an open one does (per-chat order)."""
    db = Database(pg_url)
    await db.open()
    try:
        await migrate(db)
        inbox = Inbox(db)
        # 1 and 2 of chat 7 in one batch (a poll): neither sees the other, this process
        # runs them in order; 3 of chat 7 comes while 1 and 2 are open; 4 is another chat's
        assert await inbox.save([_message(1, 7), _message(2, 7)]) == [True, True]
        assert await inbox.save([_message(3, 7)]) == [True]
        assert await inbox.save([_message(4, 8)]) == [True]
        assert inbox.first_open_at_save(1) and inbox.first_open_at_save(2)
        assert not inbox.first_open_at_save(3)
        assert inbox.first_open_at_save(4)
        assert not inbox.first_open_at_save(4)  # told once: a second turn looks again
        # a resent update is no new one and says nothing
        assert await inbox.save([_message(3, 7)]) == [False]
        assert not inbox.first_open_at_save(3)
        for update_id in (1, 2, 3):
            await inbox.mark_processed(update_id)
        assert await inbox.save([_message(5, 7)]) == [True]
        assert inbox.first_open_at_save(5)
        assert await inbox.earlier_pending(7, 6) == 5  # what the look would have found
    finally:
        await db.close()


def _from(update_id: int, chat_id: int, user_id: int) -> dict[str, object]:
    sender = {"id": user_id, "is_bot": False, "first_name": "A"}
    message = {"message_id": update_id, "date": 0, "chat": {"id": chat_id}, "text": "hi"}
    return {"update_id": update_id, "message": {**message, "from": sender}}


async def test_the_save_reads_the_users_choices_only_where_nothing_can_change_them_first(
    pg_url: str,
) -> None:
    """The save of an update that no earlier one of its chat precedes reads its user's
    language and choices with it (the handler needs no read of its own); one behind an open
    update of its chat, or behind one in the same batch (a /language before a /generate),
    gets none: its handler reads them once the earlier one has run."""
    db = Database(pg_url)
    await db.open()
    try:
        await migrate(db)
        prefs, inbox = PrefStore(db), Inbox(db)
        await prefs.choose_language(70, "ru")
        await prefs.set_style(70, "anime")
        await prefs.set_count(70, 2)
        assert await inbox.save([_from(1, 70, 70), _from(2, 70, 70)]) == [True, True]
        assert await inbox.save([_from(3, 70, 70), _from(4, 80, 80)]) == [True, True]
        assert await inbox.save([{"update_id": 5, "poll": {"id": "1"}}, _from(6, 90, 90)]) == [
            True,
            True,
        ]
        assert inbox.prefs_at_save(1, 70) == ("ru", Prefs("anime", None, 2))
        assert inbox.prefs_at_save(1, 70) is None  # once: a retried update reads again
        assert inbox.prefs_at_save(2, 70) is None  # 1 may change them first
        assert inbox.prefs_at_save(3, 70) is None  # 1 and 2 were open
        assert inbox.prefs_at_save(4, 80) == (None, Prefs())  # 80 chose nothing
        assert inbox.prefs_at_save(5, 70) is None  # no chat, no sender
        assert inbox.prefs_at_save(6, 91) is None  # not the update's user: no guess
    finally:
        await db.close()
