"""The command line: --version, check-config, and configuration errors as one line + exit 2."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from imagebot import __version__, logs
from imagebot.cli import main
from imagebot.runtime import tune_interpreter
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, WEBHOOK_SECRET

OPS_TOKEN = "ops-token-0123456789"
SECRETS = (BOT_TOKEN, REPLICATE_TOKEN, FAL_KEY, WEBHOOK_SECRET, OPS_TOKEN)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that stands in for Telegram: a test proves nobody connected to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def loopback_only(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every vendor URL points at the loopback listener, so even a run that got past the
    configuration could not reach the internet."""
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for variable in ("TELEGRAM__API_BASE_URL", "REPLICATE__BASE_URL", "FAL__BASE_URL"):
        monkeypatch.setenv(f"IMAGEBOT_{variable}", url)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so the repository's config.toml is not picked up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("IMAGEBOT_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("IMAGEBOT_OPS_TOKEN", OPS_TOKEN)


def nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`main()` configures logging for the process; put the test run's set-up back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    hooks = (sys.excepthook, threading.excepthook, logs._redactor)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
        sys.excepthook, threading.excepthook, logs._redactor = hooks


@pytest.fixture
def restore_interpreter() -> Iterator[None]:
    saved = (sys.getswitchinterval(), gc.get_threshold())
    try:
        yield
    finally:
        sys.setswitchinterval(saved[0])
        gc.set_threshold(*saved[1])


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    """`imagebot --version` prints the version and exits 0, with no configuration at all."""
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"imagebot {__version__}\n" and err == ""


def test_version_from_a_real_process(workdir: Path) -> None:
    """`python -m imagebot --version` works as a process (the console script's entry)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TELEGRAM_BOT_TOKEN",)}
    result = subprocess.run(
        [sys.executable, "-m", "imagebot", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=workdir,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imagebot {__version__}"
    assert __version__ != "0.0.0+unknown"  # the installed package's metadata is read


@pytest.mark.parametrize("argv", [["check-config"], ["--check-config"]])
def test_check_config_prints_effective_settings_with_secrets_masked(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    secrets: None,
) -> None:
    """check-config (either spelling) exits 0 and prints every effective setting as JSON,
    file and environment merged, with each set secret shown only as '**********'."""
    (workdir / "imagebot.toml").write_text("[runner]\nmax_running = 3\n[access]\nusers = [42]\n")
    monkeypatch.setenv("IMAGEBOT_LIMITS__RATE_PER_MINUTE", "9")
    monkeypatch.setenv("IMAGEBOT_ACCESS__ADMINS", "[7, 8]")
    assert main([*argv, "--config", "imagebot.toml"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)
    assert data["runner"]["max_running"] == 3
    assert data["limits"]["rate_per_minute"] == 9
    assert data["access"] == data["access"] | {"users": [42], "admins": [7, 8]}
    assert data["ops"]["listen"] == "127.0.0.1"
    for key in ("telegram_bot_token", "replicate_api_token", "fal_key", "webhook_secret"):
        assert data[key] == "**********", key
    assert data["ops_token"] == "**********"
    for secret in SECRETS:
        assert secret not in out
        assert secret.split(":")[-1] not in out


def test_check_config_shows_unset_secrets_as_null(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, workdir: Path
) -> None:
    """With the local providers only the bot token is needed; unset secrets print as null."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    assert main(["check-config"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["replicate_api_token"] is None and data["fal_key"] is None
    assert data["generate"]["provider"] == "local"


@pytest.mark.parametrize("argv", [["check-config"], [], ["--polling"], ["run", "--webhook"]])
def test_missing_token_names_the_variable(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    listener: socket.socket,
) -> None:
    """Without TELEGRAM_BOT_TOKEN every command stops with one stderr line naming it, exit 2,
    and nothing is contacted."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line.startswith("imagebot: configuration error: TELEGRAM_BOT_TOKEN")
    assert "export TELEGRAM_BOT_TOKEN=" in line
    assert out == ""
    assert nobody_connected(listener)


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("IMAGEBOT_RUNNER__MAX_RUNNING", "0", "runner.max_running"),
        ("IMAGEBOT_LIMITS__MAX_RUNNING", "0", "limits.max_running"),  # its old name
        ("IMAGEBOT_TELEGRAM__MODE", "carrier-pigeon", "telegram.mode"),
        ("IMAGEBOT_ACCESS__USERS", '[1, "x"]', "access.users"),
        ("IMAGEBOT_ACCESS__USERS", "1,2", "access.users"),  # not JSON
        ("IMAGEBOT_GENERATE__PARAMS", "{num_outputs: 2}", "generate.params"),  # not JSON
        ("IMAGEBOT_MEDIA__ALLOWED_PRIVATE_NETWORKS", '["not-a-net"]', "media"),
    ],
)
def test_invalid_environment_value_names_the_dotted_key(
    variable: str,
    value: str,
    key: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    secrets: None,
) -> None:
    """An invalid IMAGEBOT_<SECTION>__<KEY> value (also a list that is not JSON) stops
    check-config and start-up with one line that names the dotted setting, exit 2."""
    monkeypatch.setenv(variable, value)
    for argv in (["check-config"], []):
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"imagebot: configuration error: {key}"), line


def test_invalid_file_value_and_unknown_key_name_the_dotted_key(
    capsys: pytest.CaptureFixture[str], workdir: Path, secrets: None
) -> None:
    """A bad value or an unknown key in config.toml is named by its dotted key."""
    (workdir / "config.toml").write_text('[webhook]\nport = "eighty"\n')
    assert main(["check-config"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        "imagebot: configuration error: webhook.port"
    )
    (workdir / "config.toml").write_text("[limits]\nmax_runing = 3\n")
    assert main(["check-config"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "imagebot: configuration error: limits.max_runing: is not a known setting"


def test_bad_toml_file_says_so(
    capsys: pytest.CaptureFixture[str], workdir: Path, secrets: None
) -> None:
    """A config file that is not TOML, or is missing, is one line naming the file, exit 2."""
    (workdir / "broken.toml").write_text('[telegram\nmode = "polling"\n')
    assert main(["--config", "broken.toml"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(
        "imagebot: configuration error: --config: broken.toml is not valid TOML"
    )
    assert main(["check-config", "--config", "missing.toml"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "imagebot: configuration error: --config: file not found: missing.toml"


def test_public_ops_listener_without_token_refuses_to_start(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    listener: socket.socket,
) -> None:
    """ops.listen on a non-loopback address without IMAGEBOT_OPS_TOKEN: exit 2, one line
    naming the variable, no listener opened and nothing contacted; with a token it is fine."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_OPS__LISTEN", "0.0.0.0")  # noqa: S104 - the case under test
    assert main(["--polling"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("imagebot: configuration error: IMAGEBOT_OPS_TOKEN")
    assert "'0.0.0.0' is not a loopback address" in line
    assert nobody_connected(listener)
    monkeypatch.setenv("IMAGEBOT_OPS_TOKEN", OPS_TOKEN)
    assert main(["check-config"]) == 0


def test_a_database_from_a_newer_imagebot_is_refused(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    listener: socket.socket,
    restore_logging: None,
    restore_interpreter: None,
) -> None:
    """Start-up on a database migrated by a newer version stops with one line saying so
    (exit 1) before Telegram is contacted; the database is left as it was. The interpreter
    tuning was applied on the way (the CLI's own start-up path)."""
    database = workdir / "imagebot.db"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    conn.execute("INSERT INTO schema_migrations VALUES ('9999_from_the_future', 'x')")
    conn.commit()
    conn.close()
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_STORAGE__DATABASE", str(database))
    monkeypatch.setenv("IMAGEBOT_OPS__PORT", "0")
    monkeypatch.delenv("IMAGEBOT_GC_THRESHOLDS", raising=False)
    gc.set_threshold(700, 10, 10)
    assert main(["--polling", "--log-format", "json"]) == 1
    assert gc.get_threshold() == (700, 10, 100)
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line.startswith("imagebot: database error: database")
    assert "9999_from_the_future" in line and "newer imagebot" in line
    assert nobody_connected(listener)
    for record in out.splitlines():
        json.loads(record)  # the logs before the refusal are JSON lines
    conn = sqlite3.connect(database)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"schema_migrations"}


def test_check_config_says_which_old_keys_were_used(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    secrets: None,
) -> None:
    """A runner key set under its old [limits] name (file or environment) still takes effect,
    and check-config says on stderr which old key is now which new one."""
    (workdir / "config.toml").write_text("[limits]\nmax_running = 3\nrate_per_minute = 4\n")
    monkeypatch.setenv("IMAGEBOT_LIMITS__SWEEP_INTERVAL_S", "12")
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["runner"]["max_running"] == 3 and data["runner"]["sweep_interval_s"] == 12
    assert data["limits"] == data["limits"] | {"rate_per_minute": 4}
    assert "max_running" not in data["limits"]
    assert sorted(err.splitlines()) == [
        "imagebot: deprecated setting: limits.max_running is now runner.max_running",
        "imagebot: deprecated setting: limits.sweep_interval_s is now runner.sweep_interval_s",
    ]


def test_start_up_logs_each_old_key_with_its_new_name(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    listener: socket.socket,
    restore_logging: None,
    restore_interpreter: None,
) -> None:
    """Starting with IMAGEBOT_LIMITS__MAX_RUNNING logs one `config_key_renamed` warning
    naming the old and the new key (here before a refused database ends the start)."""
    database = workdir / "imagebot.db"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    conn.execute("INSERT INTO schema_migrations VALUES ('9999_from_the_future', 'x')")
    conn.commit()
    conn.close()
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_STORAGE__DATABASE", str(database))
    monkeypatch.setenv("IMAGEBOT_OPS__PORT", "0")
    monkeypatch.setenv("IMAGEBOT_LIMITS__MAX_RUNNING", "4")
    assert main(["--polling", "--log-format", "json"]) == 1
    out, _ = capsys.readouterr()
    renamed = [e for e in map(json.loads, out.splitlines()) if e["event"] == "config_key_renamed"]
    assert [(e["level"], e["old_key"], e["new_key"]) for e in renamed] == [
        ("warning", "limits.max_running", "runner.max_running")
    ]
    assert nobody_connected(listener)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMAGEBOT_GC_THRESHOLDS", "700,10"),
        ("IMAGEBOT_GC_THRESHOLDS", "700,ten,100"),
        ("IMAGEBOT_GIL_SWITCH_S", "0"),
        ("IMAGEBOT_GIL_SWITCH_S", "fast"),
    ],
)
def test_bad_interpreter_tuning_override_names_the_variable(
    variable: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    listener: socket.socket,
    restore_logging: None,
    restore_interpreter: None,
) -> None:
    """A bad GC/GIL override stops start-up with one line naming it (exit 2), before the
    interpreter is touched or anything is contacted."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    monkeypatch.setenv(variable, value)
    before = (sys.getswitchinterval(), gc.get_threshold())
    assert main(["--polling"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"imagebot: configuration error: {variable}: ")
    assert repr(value) in line
    assert (sys.getswitchinterval(), gc.get_threshold()) == before
    assert nobody_connected(listener)


def test_interpreter_tuning_defaults_and_overrides(
    monkeypatch: pytest.MonkeyPatch, restore_interpreter: None
) -> None:
    """Full collections come after 100 middle-generation ones (CPython: 10), the GIL changes
    hands every 0.5 ms (CPython: 5 ms); both can be overridden for measuring."""
    monkeypatch.delenv("IMAGEBOT_GC_THRESHOLDS", raising=False)
    monkeypatch.delenv("IMAGEBOT_GIL_SWITCH_S", raising=False)
    tune_interpreter()
    assert gc.get_threshold() == (700, 10, 100)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    monkeypatch.setenv("IMAGEBOT_GC_THRESHOLDS", "700,10,10")
    monkeypatch.setenv("IMAGEBOT_GIL_SWITCH_S", "0.005")
    tune_interpreter()
    assert gc.get_threshold() == (700, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.005)
