"""One bot process per SQLite file (issue 16): a second `imagebot run` on the file a running
bot uses ends start-up with one line and exit 1 before it touches anything; kill -9 leaves no
stale lock; the shell commands still work beside the bot; migrate-store waits for it to stop.

The first bot is the real daemon (tests/crash_harness.py); every other command is a real
`python -m imagebot` process with the same config file and environment.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from tests import updates
from tests.crash_harness import Daemon, MakeDaemon, only_line
from tests.fakes.telegram_api import FakeTelegram

pytestmark = [
    pytest.mark.slow,
    pytest.mark.sqlite_only(
        reason="the lock file beside SQLite's database (issue 16); PostgreSQL's several-process"
        " rules are the next issue's"
    ),
]

CHAT = updates.DEFAULT_CHAT_ID
HINT = "SQLite serves one process; to run several, use PostgreSQL (see README)"


async def imagebot(bot: Daemon, *args: str) -> tuple[int, str, str]:
    """`python -m imagebot <args>` with the daemon's config and environment: (exit code,
    stdout, stderr). Async: the fakes it may talk to run in this event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot",
        *args,
        "--config",
        str(bot.config_path),
        "--log-format",
        "json",
        cwd=str(bot.dir),
        env=bot._env(),  # the daemon's own secrets, no inherited IMAGEBOT_* settings
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 45)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def generate_once(bot: Daemon, telegram: FakeTelegram, prompt: str) -> None:
    """A /generate through the running daemon ends with one more photo in the chat."""
    before = len(telegram.photos(CHAT))
    telegram.push_update(updates.command(f"/generate {prompt}"))
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == before + 1, within=20)


@pytest.mark.parametrize("mode", ["--webhook", "--polling"])
async def test_second_bot_on_the_same_file_is_refused(
    daemon: MakeDaemon, telegram: FakeTelegram, mode: str
) -> None:
    """A second `imagebot run` (webhook or polling) on the running bot's SQLite file: one
    stderr line naming storage.database, the path and the first bot's pid, exit 1, no
    traceback, Telegram never asked; the first bot still answers a /generate afterwards."""
    bot = daemon()
    await bot.start()
    assert bot.proc is not None
    get_me_before = len(telegram.calls_of("getMe"))

    code, out, err = await imagebot(bot, "run", mode)

    assert only_line(err) == (
        f"imagebot: start-up error: storage.database: {bot.db_path} is in use by another "
        f"imagebot process (pid {bot.proc.pid}): {HINT}"
    )
    assert code == 1
    assert "Traceback" not in out + err
    assert '"migrations_applied"' not in out  # it never opened the database
    assert len(telegram.calls_of("getMe")) == get_me_before
    assert bot.running
    await generate_once(bot, telegram, "a lighthouse")


async def test_kill_9_leaves_no_stale_lock(daemon: MakeDaemon, telegram: FakeTelegram) -> None:
    """After kill -9 the lock file stays behind but binds nobody: the next start is ready
    and serves a /generate, and a second bot beside it is refused again."""
    bot = daemon()
    await bot.start()
    await bot.kill()
    assert bot.db_path.with_name("imagebot.db.lock").exists()

    await bot.start()
    await generate_once(bot, telegram, "a phoenix")
    code, _, err = await imagebot(bot, "run")
    assert code == 1 and "is in use by another imagebot process" in err


async def test_shell_commands_work_beside_the_running_bot(daemon: MakeDaemon) -> None:
    """`imagebot users allow|list`, `invite` and `check-config` run while the bot does: they
    neither take nor wait for its lock, and the change lands in the shared database."""
    bot = daemon()
    await bot.start()

    code, _, err = await imagebot(bot, "users", "allow", "4242")
    assert code == 0, err
    code, out, err = await imagebot(bot, "users", "list")
    assert code == 0, err
    assert out.splitlines()[0] == "user_id\tallowed_by\tadded_at\trequests_today"
    assert any(line.startswith("4242\t") for line in out.splitlines())
    code, out, err = await imagebot(bot, "invite")
    assert code == 0, err
    assert out.strip()
    code, out, err = await imagebot(bot, "check-config")
    assert code == 0, err
    assert str(bot.db_path) in out
    assert bot.running and await bot.healthy()


async def test_migrate_store_waits_for_the_bot_to_stop(daemon: MakeDaemon, pg_url: str) -> None:
    """migrate-store from the running bot's SQLite file: one line saying a running imagebot
    uses it, exit 1, and the PostgreSQL target untouched; once the bot stopped it copies."""
    from imagebot.store.postgresql import connect

    def target_tables() -> list[Any]:
        with connect(pg_url) as conn:
            return list(
                conn.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            )

    bot = daemon()
    await bot.start()
    assert bot.proc is not None
    copy = ("migrate-store", "--from", str(bot.db_path), "--to", pg_url)

    code, out, err = await imagebot(bot, *copy)

    assert only_line(err) == (
        f"imagebot: migrate-store: --from {bot.db_path} is in use by another imagebot process "
        f"(pid {bot.proc.pid}): stop the bot first, then copy"
    )
    assert code == 1
    assert "Traceback" not in out + err
    assert await asyncio.to_thread(target_tables) == []

    stopped, _ = await bot.terminate()
    assert stopped == 0
    code, out, err = await imagebot(bot, *copy)
    assert code == 0, err
    assert await asyncio.to_thread(target_tables)
