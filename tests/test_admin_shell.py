"""`imagebot users allow|deny|list` and `imagebot invite` from the shell, on the database of a
bot that is running: the change reaches the bot within a few seconds, no restart."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import pytest

from imagebot.cli import main
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows

STRANGER = 4242
FRIEND = 5151
CONFIG_USER = 6006


def config_file(tmp_path: Path, database: str, users: list[int] | None = None) -> Path:
    """The same database (and access lists) as the running bot; no token in it."""
    path = tmp_path / "shell.toml"
    path.write_text(
        f'[storage]\ndatabase = "{database}"\n\n[access]\nusers = {users or []}\n',
        encoding="utf-8",
    )
    return path


async def shell(*args: str) -> tuple[int, str, str]:
    """Run `imagebot <args>` as its own process (the bot keeps running in this one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    env.pop("TELEGRAM_BOT_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shell_allow_while_the_bot_runs(bot, telegram: FakeTelegram, tmp_path: Path) -> None:
    """With no admin configured, a stranger is told the operator's way in (with only their
    own id); `imagebot users allow <id>` on the running bot's database lets them in, and
    their next request is served without a restart."""
    async with bot(access={"open": False}) as app:
        telegram.push_update(
            updates.command("/generate a fox", user_id=STRANGER, chat_id=STRANGER)
        )
        await wait_until(lambda: len(telegram.texts(STRANGER)) == 1)
        refusal = telegram.texts(STRANGER)[0]
        assert refusal.startswith("Sorry, this bot is private")
        assert f"imagebot users allow {STRANGER}" in refusal
        config = config_file(tmp_path, db_path(app))
        code, _, err = await shell("users", "allow", str(STRANGER), "--config", str(config))
        assert code == 0, err
        assert f"{STRANGER} may use the bot now" in err
        allowed_at = time.monotonic()
        await wait_until(lambda: app.services.policy.may_use(STRANGER, STRANGER), within=10)
        picked_up_s = time.monotonic() - allowed_at
        telegram.push_update(
            updates.command("/generate a fox", user_id=STRANGER, chat_id=STRANGER)
        )
        await wait_until(lambda: len(telegram.photos(STRANGER)) == 1)
    print(f"shell allow picked up by the running bot in {picked_up_s:.2f} s")  # noqa: T201
    (row,) = rows(db_path(app), "SELECT * FROM allowed_users")
    assert (row["user_id"], row["source"], row["added_by"]) == (STRANGER, "shell", None)


async def test_shell_invite_list_and_deny(bot, telegram: FakeTelegram, tmp_path: Path) -> None:
    """`imagebot invite` prints a t.me link (the bot's username remembered from its start)
    that admits its opener; `users list` shows config and database users; `users deny`
    takes one off (the running bot refuses them again), and refuses a config user (exit 1)."""
    async with bot(access={"open": False, "users": [CONFIG_USER]}) as app:
        config = config_file(tmp_path, db_path(app), users=[CONFIG_USER])
        code, out, err = await shell(
            "invite", "--uses", "2", "--hours", "1", "--config", str(config)
        )
        assert code == 0, err
        match = re.fullmatch(r"https://t\.me/imagebot_test_bot\?start=([A-Za-z0-9_-]{22})\n", out)
        assert match, out
        assert "invite #1: 2 use(s)" in err
        telegram.push_update(
            updates.command(f"/start {match.group(1)}", user_id=FRIEND, chat_id=FRIEND)
        )
        await wait_until(lambda: len(telegram.texts(FRIEND)) == 1)
        assert telegram.texts(FRIEND)[0].startswith("Welcome, Alice! The invite worked")

        code, out, err = await shell("users", "list", "--config", str(config))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "user_id\tallowed_by\tadded_at\trequests_today"
        assert f"{CONFIG_USER}\tconfig\t-\t0" in lines
        assert any(line.startswith(f"{FRIEND}\tinvite\t") for line in lines)

        code, _, err = await shell("users", "deny", str(CONFIG_USER), "--config", str(config))
        assert code == 1 and "listed in config.toml (access.users)" in err
        code, _, err = await shell("users", "deny", str(FRIEND), "--config", str(config))
        assert code == 0 and f"{FRIEND} may no longer use the bot" in err
        await wait_until(lambda: not app.services.policy.may_use(FRIEND, FRIEND), within=10)
    assert rows(db_path(app), "SELECT * FROM allowed_users") == []


def test_shell_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    """A malformed shell command is a usage error (exit 2) that says what is expected."""
    for argv in (
        ["users"],
        ["users", "allow"],
        ["users", "allow", "bob"],
        ["users", "kick", "5"],
        ["invite", "--uses", "0"],
        ["users", "list", "--uses", "3"],
    ):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--config", str(tmp_path / "none.toml")])
        assert exited.value.code == 2, argv
    assert "usage: imagebot users allow <user id>" in capsys.readouterr().err


def test_shell_creates_the_database_on_a_first_run(tmp_path: Path, capsys) -> None:
    """Before the bot ever ran (no database yet, no token in the shell), `users allow`
    creates the database and the entry the bot will read at its start."""
    database = tmp_path / "state" / "imagebot.db"
    config = config_file(tmp_path, str(database))
    assert main(["users", "allow", "777", "--config", str(config)]) == 0
    assert main(["users", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "777\tshell\t" in out
    assert [r["user_id"] for r in rows(str(database), "SELECT * FROM allowed_users")] == [777]
