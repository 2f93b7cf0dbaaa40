"""Start-up problems of the machine, not the file: a listen port already taken, a database or
results path that cannot be made. The real `imagebot` process ends with ONE line on stderr that
names the setting and the address or path, exit code 1, and no traceback.

Tests run as root in CI, and root ignores directory permissions, so the unwritable paths here
are under a regular FILE (`<file>/sub/bot.db`: not a directory) or in /proc.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash_harness import environment, only_line, run_imagebot
from tests.fakes.telegram_api import FakeTelegram

IN_USE = "the address is already in use (another program, or another imagebot)"


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of the test listens on for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def telegram_stand_in() -> Iterator[socket.socket]:
    """Where the bot would find Telegram: a loopback socket that proves nobody connected."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def regular_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


def test_ops_port_in_use(tmp_path: Path, held_port: int, telegram_stand_in: socket.socket) -> None:
    """ops.port taken by another program: one line naming ops.port and 127.0.0.1:<port>,
    exit 1, no traceback, and Telegram never contacted."""
    url = f"http://127.0.0.1:{telegram_stand_in.getsockname()[1]}"
    env = environment(tmp_path, url, IMAGEBOT_OPS__PORT=str(held_port))
    result = run_imagebot(tmp_path, env, "--polling")
    line = only_line(result.stderr)
    assert (
        line
        == f"imagebot: start-up error: ops.port: cannot listen on 127.0.0.1:{held_port}: {IN_USE}"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert nobody_connected(telegram_stand_in)


@pytest.mark.parametrize(
    ("where", "setting", "problem"),
    [
        ("database under a file", "storage.database", "Not a directory"),
        ("database in /proc", "storage.database", "cannot create its lock file"),
        ("database directory in /proc", "storage.database", "No such file or directory"),
        ("results under a file", "storage.results_dir", "Not a directory"),
    ],
)
def test_database_or_results_path_that_cannot_be_made(
    tmp_path: Path, telegram_stand_in: socket.socket, where: str, setting: str, problem: str
) -> None:
    """A storage path that cannot be created or written: one line naming the setting and the
    path, exit 1, no traceback, Telegram never contacted."""
    url = f"http://127.0.0.1:{telegram_stand_in.getsockname()[1]}"
    blocker = regular_file(tmp_path)
    path = {
        "database under a file": blocker / "sub" / "bot.db",
        "database in /proc": Path("/proc/imagebot-test.db"),
        "database directory in /proc": Path("/proc/imagebot-test/bot.db"),
        "results under a file": blocker / "results",
    }[where]
    key = "IMAGEBOT_STORAGE__" + setting.split(".")[1].upper()
    result = run_imagebot(tmp_path, environment(tmp_path, url, **{key: str(path)}), "--polling")
    line = only_line(result.stderr)
    assert line.startswith(f"imagebot: start-up error: {setting}: "), line
    assert str(path) in line and problem in line, line
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert nobody_connected(telegram_stand_in)
    assert blocker.read_text() == "not a directory\n"


async def test_webhook_port_in_use(tmp_path: Path, held_port: int, telegram: FakeTelegram) -> None:
    """webhook.port taken: after getMe the webhook listener cannot open, and start-up ends with
    one line naming webhook.port and the address, exit 1, no traceback, no webhook set."""
    env = environment(
        tmp_path,
        telegram.url,
        IMAGEBOT_WEBHOOK__LISTEN="127.0.0.1",
        IMAGEBOT_WEBHOOK__PORT=str(held_port),
        IMAGEBOT_WEBHOOK__URL=f"http://127.0.0.1:{held_port}/telegram/webhook",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot",
        "--webhook",
        "--log-format",
        "json",
        cwd=tmp_path,
        env=env,
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
    line = only_line(err.decode())
    assert line == (
        f"imagebot: start-up error: webhook.port: cannot listen on 127.0.0.1:{held_port}: {IN_USE}"
    )
    assert proc.returncode == 1
    assert "Traceback" not in (out + err).decode()
    assert telegram.calls_of("getMe")  # it got that far
    assert telegram.calls_of("setWebhook") == []
