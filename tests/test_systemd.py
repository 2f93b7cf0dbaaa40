"""imagebot.service: verified and scored by systemd-analyze, hardened as issue 6 asks, and the
sd_notify protocol (READY, WATCHDOG, STOPPING) spoken by the running bot."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebot.app import SHUTDOWN_GRACE_S
from tests.fakes.base import wait_until
from tests.fakes.telegram_api import FakeTelegram

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "imagebot.service"
TEMPLATE = ROOT / "imagebot@.service"  # several processes on one host (README "Scaling out")
README = ROOT / "README.md"
STOCK_UNITS = Path("/usr/lib/systemd/system")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


def directives(unit: Path = UNIT) -> dict[str, list[str]]:
    """The unit's `Key=value` lines (keys may repeat, as SystemCallFilter= does)."""
    found: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A throw-away root holding the unit, a stand-in for its ExecStart program and the
    host's stock units (for sysinit.target & co.), so `verify` checks this unit and nothing
    on the host."""
    if not STOCK_UNITS.is_dir():
        pytest.skip(f"{STOCK_UNITS} (systemd's own units) is missing")
    root = tmp_path / "root"
    shutil.copytree(STOCK_UNITS, root / STOCK_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/imagebot.service")
    shutil.copy(TEMPLATE, root / "etc/systemd/system/imagebot@.service")
    program = Path(directives()["ExecStart"][0].split()[0])
    stand_in = root / program.relative_to("/")
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(unit_root: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single warning (an unknown or
    misspelt directive only warns, so any output fails the test)."""
    result = analyze("verify", f"--root={unit_root}", "imagebot.service")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


@needs_systemd_analyze
def test_template_unit_verifies_clean(unit_root: Path) -> None:
    """`systemd-analyze verify` accepts an instance of the template unit (imagebot@1.service)
    without a warning."""
    result = analyze("verify", f"--root={unit_root}", "imagebot@1.service")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_template_is_hardened_like_the_single_unit() -> None:
    """imagebot@.service carries every directive of imagebot.service with the same value,
    except what makes instances differ: its name, its own ports file and state directory."""
    single, template = directives(UNIT), directives(TEMPLATE)
    differ = {"Description", "EnvironmentFile", "StateDirectory", "WorkingDirectory"}
    for key, values in single.items():
        if key not in differ:
            assert template.get(key) == values, key
    assert set(template) == set(single)
    assert template["EnvironmentFile"] == [
        "/etc/imagebot/imagebot.env",
        "/etc/imagebot/instance-%i.env",
    ]
    assert template["StateDirectory"] == ["imagebot/%i"]
    assert "%i" in template["Description"][0]


@needs_systemd_analyze
def test_exposure_score_is_low_and_stated_in_the_readme(unit_root: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or lower, and the README
    states the score it gets."""
    result = analyze("security", "--offline=true", f"--root={unit_root}", "imagebot.service")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for imagebot\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, result.stdout
    stated = re.search(r"exposure score\s+of\s+\*\*(\d+\.\d+)\*\*", README.read_text())
    assert stated, "README.md must state the exposure score"
    assert float(stated.group(1)) == score
    assert f"rates this unit {score}" in UNIT.read_text()


def test_unit_is_hardened_as_the_issue_asks() -> None:
    """The directives issue 6 names are there with safe values, the stop timeout outlasts the
    drain, and readiness/liveness use Type=notify with a watchdog."""
    unit = directives()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "DynamicUser": "yes",
        "StateDirectory": "imagebot",
        "ConfigurationDirectory": "imagebot",
        "EnvironmentFile": "/etc/imagebot/imagebot.env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["MemoryMax"] and unit["ExecStart"][0].endswith(
        "--config /etc/imagebot/config.toml"
    )
    assert seconds(unit["TimeoutStopSec"][0]) >= SHUTDOWN_GRACE_S + 20  # drain + PTB stop
    assert seconds(unit["WatchdogSec"][0]) >= 10  # the loop beats every second
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error is not retried
    assert "PrivateNetwork" not in unit  # the bot must reach Telegram, Replicate and fal


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An abstract AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    name = f"imagebot-test-notify-{os.getpid()}-{id(monkeypatch)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2: a ping every second
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield sock
    finally:
        sock.close()


async def test_the_bot_speaks_sd_notify(
    bot, telegram: FakeTelegram, notify_socket: socket.socket
) -> None:
    """Under Type=notify the bot sends READY=1 once it takes updates, WATCHDOG=1 from the
    event loop while it runs, and STOPPING=1 when it shuts down."""
    received: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append(notify_socket.recv(4096).decode())
            except BlockingIOError:
                return received

    async with bot() as app:
        assert app.state.ready
        await wait_until(lambda: "READY=1" in drain())
        await wait_until(lambda: "WATCHDOG=1" in drain(), within=5)
        assert "STOPPING=1" not in received
    drain()
    assert received.index("READY=1") < received.index("STOPPING=1")
    assert received.count("STOPPING=1") == 1
