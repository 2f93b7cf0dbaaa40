"""Logs: one JSON object per line with stable events and fields; no secret on any log path."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from telegram.ext import Application, CallbackContext

from imagebot import logs
from imagebot.app import stop_application
from imagebot.logs import configure_logging, get_logger, install_excepthook
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CHAT = updates.DEFAULT_CHAT_ID
OPS_TOKEN = "ops-token-0123456789"
SECRETS = [BOT_TOKEN, REPLICATE_TOKEN, FAL_KEY, WEBHOOK_SECRET, OPS_TOKEN]
BOT_URL = f"https://api.telegram.org/bot{BOT_TOKEN}/getMe"
FILE_URL = f"https://api.telegram.org/file/bot{BOT_TOKEN}/photos/x.jpg"
# A token the redactor was never told about, in a file URL (e.g. from a second bot).
OTHER_TOKEN = "987654321:AAH-other_token_abcdefghijklmnopqrstu"
OTHER_FILE_URL = f"https://api.telegram.org/file/bot{OTHER_TOKEN}/documents/file_1.png"

Configure = Callable[..., io.StringIO]


def leaked(output: str) -> list[str]:
    """Every secret (or secret half of an `id:secret` pair) that appears in the output."""
    needles = [*SECRETS, OTHER_TOKEN]
    needles += [secret.split(":")[1] for secret in (BOT_TOKEN, FAL_KEY, OTHER_TOKEN)]
    return [needle for needle in needles if needle in output]


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def capture() -> Iterator[Configure]:
    """configure_logging() into a StringIO; the previous logging set-up is put back after."""
    root = logging.getLogger()
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "apscheduler")}
    saved = (
        list(root.handlers),
        root.level,
        structlog.get_config(),
        sys.excepthook,
        threading.excepthook,
        logs._redactor,
    )

    def configure(fmt: str = "json", level: str = "DEBUG") -> io.StringIO:
        stream = io.StringIO()
        configure_logging(fmt=fmt, level=level, secrets=SECRETS, stream=stream)
        return stream

    try:
        yield configure
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.configure(**saved[2])
        sys.excepthook, threading.excepthook, logs._redactor = saved[3:]
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def _connect() -> None:
    raise ConnectionError(f"cannot reach {BOT_URL}")


def _raise_with_token() -> None:
    """Raise an error whose message, and its cause's, hold the token, a file URL and a key."""
    try:
        _connect()
    except ConnectionError as inner:
        raise RuntimeError(f"getFile failed for {FILE_URL} with key {FAL_KEY}") from inner


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_structlog_text_fields_and_nesting_are_redacted(capture: Configure, fmt: str) -> None:
    """Secrets in the event text, in fields, nested in dicts/lists/tuples/bytes and as dict
    keys are masked in both output formats; the rest of the line survives."""
    stream = capture(fmt)
    log = get_logger("imagebot.test")
    log.info(
        f"calling {BOT_URL}",  # noqa: G004 - a secret in the event text is the case under test
        url=FILE_URL,
        headers={"Authorization": f"Bearer {REPLICATE_TOKEN}", "X-Key": f"Key {FAL_KEY}"},
        nested=[{"deeper": [WEBHOOK_SECRET, (OPS_TOKEN,)]}, {BOT_TOKEN: "as a key"}],
        raw=f"token={BOT_TOKEN}".encode(),
        other=OTHER_FILE_URL,
        encoded=f"https://api.telegram.org/bot{OTHER_TOKEN.replace(':', '%3A')}/getMe",
        job_id=7,
    )
    out = stream.getvalue()
    assert leaked(out) == []
    assert "calling https://api.telegram.org/bot" in out and "job_id" in out
    assert logs.MASK in out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exceptions_and_tracebacks_are_redacted(capture: Configure, fmt: str) -> None:
    """An exception whose message (and cause's message) holds the token, logged through
    structlog and through a stdlib logger, leaves a traceback without any secret."""
    stream = capture(fmt)
    try:
        _raise_with_token()
    except RuntimeError:
        get_logger("imagebot.test").exception("download_failed", url=FILE_URL)
        logging.getLogger("telegram.ext.Updater").exception("Error while getting Updates")
    out = stream.getvalue()
    assert "Traceback" in out and "RuntimeError" in out and "ConnectionError" in out
    assert leaked(out) == []


def test_library_loggers_go_through_the_same_pipeline(capture: Configure) -> None:
    """httpx, python-telegram-bot, aiohttp and apscheduler log lines become JSON lines with
    timestamp/level/event/logger, secrets masked (message, %-args and `extra` fields)."""
    stream = capture("json")
    logging.getLogger("httpx").warning("HTTP Request: POST %s %s", BOT_URL, '"HTTP/1.1 500"')
    logging.getLogger("telegram.ext.Application").error(
        "No error handlers are registered", extra={"url": FILE_URL}
    )
    logging.getLogger("telegram.Bot").warning("Entering: get_file %s", OTHER_FILE_URL)
    logging.getLogger("aiohttp.server").error("Error handling request from %s", OPS_TOKEN)
    logging.getLogger("apscheduler.scheduler").warning(f"Job missed {WEBHOOK_SECRET}")  # noqa: G004
    records = lines(stream)
    assert leaked(stream.getvalue()) == []
    assert [r["logger"] for r in records] == [
        "httpx",
        "telegram.ext.Application",
        "telegram.Bot",
        "aiohttp.server",
        "apscheduler.scheduler",
    ]
    for record in records:
        assert {"timestamp", "level", "event"} <= record.keys()
        assert record["timestamp"].endswith("Z")
    assert records[0]["level"] == "warning"
    assert records[0]["event"].startswith("HTTP Request: POST https://api.telegram.org/bot")
    assert records[1]["url"].startswith("https://api.telegram.org/file/bot")


def test_httpx_request_lines_are_quiet(capture: Configure) -> None:
    """httpx's per-request INFO line (URL with the token) is not logged at all."""
    stream = capture("json", level="DEBUG")
    logging.getLogger("httpx").info("HTTP Request: GET %s", BOT_URL)
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    assert stream.getvalue() == ""


def test_uncaught_exceptions_are_logged_redacted(capture: Configure) -> None:
    """An uncaught exception (main thread or another thread) becomes a JSON log line through
    the redactor instead of a plain traceback on stderr."""
    stream = capture("json")
    install_excepthook()
    try:
        _raise_with_token()
    except RuntimeError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    thread = threading.Thread(target=_raise_with_token, name="worker-thread")
    thread.start()
    thread.join(5)
    records = lines(stream)
    assert leaked(stream.getvalue()) == []
    uncaught = [r for r in records if r["event"] == "uncaught_exception"]
    assert len(uncaught) == 2
    assert all(r["level"] == "critical" and "RuntimeError" in r["exception"] for r in uncaught)
    assert uncaught[1]["thread"] == "worker-thread"


async def test_error_handler_path_is_redacted(
    capture: Configure, bot, telegram: FakeTelegram
) -> None:
    """An exception that reaches PTB's error handler (a handler crashed) is logged once with
    the update's ids and a redacted traceback; the chat gets an apology without details."""
    stream = capture("json")
    async with bot() as app:
        update = updates.to_update(updates.command("/usage"), app.application.bot)
        try:
            _raise_with_token()
        except RuntimeError as exc:
            await app.application.process_error(update, exc)
        await wait_until(lambda: len(telegram.texts(CHAT)) == 1)
    assert leaked(stream.getvalue()) == []
    (record,) = [r for r in lines(stream) if r["event"] == "handler_error"]
    assert record["level"] == "error"
    assert record["update_id"] == update.update_id
    assert record["chat_id"] == CHAT and record["user_id"] == updates.DEFAULT_USER_ID
    assert "RuntimeError" in record["exception"]
    (apology,) = telegram.texts(CHAT)
    assert BOT_TOKEN not in apology and "RuntimeError" not in apology


async def test_job_life_is_logged_with_stable_events_and_fields(
    capture: Configure, bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A retried-then-delivered job and a failed job log job_created, job_started,
    provider_retry, job_delivered and job_failed with job_id, update_id, user_id, chat_id,
    provider, attempt, duration_ms, outcome and error_code; every line is JSON, no secret."""
    stream = capture("json", level="INFO")
    replicate.fail_next("create", 429, {"detail": "slow down"}, headers={"Retry-After": "0"})
    async with bot() as app:
        good = updates.command("/generate a red fox")
        telegram.push_update(good)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        replicate.outcome = "failed"
        bad = updates.command("/generate something spicy")
        telegram.push_update(bad)
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        await wait_until(lambda: app.services.runner.running_count == 0)
    records = lines(stream)  # raises if any line is not JSON
    assert leaked(stream.getvalue()) == []
    for record in records:
        assert {"timestamp", "level", "event", "logger"} <= record.keys()
        if record["logger"].startswith("imagebot"):  # our events are stable snake_case names
            assert re.fullmatch(r"[a-z][a-z0-9_]*", record["event"]), record["event"]

    def one(event: str, job_id: int) -> dict[str, Any]:
        (found,) = [r for r in records if r["event"] == event and r.get("job_id") == job_id]
        return found

    ids = {"user_id": updates.DEFAULT_USER_ID, "chat_id": CHAT}
    created = one("job_created", 1)
    assert created | {"update_id": good["update_id"], **ids} == created
    assert created["provider"] == "replicate"
    started = one("job_started", 1)
    assert started | {"provider": "replicate", "attempt": 0, **ids} == started
    retry = one("provider_retry", 1)
    assert retry["attempt"] == 1 and retry["error_code"] == "rate_limited"
    assert retry["provider"] == "replicate" and retry["update_id"] == good["update_id"]
    delivered = one("job_delivered", 1)
    assert delivered["outcome"] == "succeeded" and delivered["duration_ms"] >= 0
    assert delivered | ids == delivered
    failed = one("job_failed", 2)
    assert failed["outcome"] == "failed" and failed["error_code"] == "safety"
    assert failed["level"] == "warning" and failed["duration_ms"] >= 0
    assert failed["update_id"] == bad["update_id"] and failed["provider"] == "replicate"


def test_console_format_is_readable(capture: Configure) -> None:
    """--log-format console gives one readable line (event first, key=value), not JSON."""
    stream = capture("console")
    get_logger("imagebot.test").info("job_created", job_id=3, provider="local")
    line = stream.getvalue().strip()
    assert "job_created" in line and "job_id=3" in line and "provider=local" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


async def test_a_tick_due_while_stopping_is_not_cut_short(
    telegram: FakeTelegram, log_output: io.StringIO
) -> None:
    """A periodic task that falls due while the stop waits for a slow one is not started and
    then cancelled: the stop logs no job error (APScheduler logs a cancellation with a
    traceback), and the task that was running ends by itself."""
    application = (
        Application.builder()
        .token(telegram.token)
        .base_url(f"{telegram.url}/bot")
        .base_file_url(f"{telegram.url}/file/bot")
        .updater(None)
        .build()
    )
    assert application.job_queue is not None
    started: list[str] = []
    ended: list[str] = []

    async def slow(context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.job is not None
        started.append(context.job.name or "")
        await asyncio.sleep(0.6)
        ended.append(context.job.name or "")

    await application.initialize()
    await application.start()
    application.job_queue.run_once(slow, 0, name="slow")
    # Falls due 0.3 s after the stop began, while the stop waits for "slow".
    application.job_queue.run_repeating(slow, 0.5, name="tick")
    await wait_until(lambda: started == ["slow"])
    await asyncio.sleep(0.2)
    await stop_application(application)
    await application.shutdown()
    assert started == ended == ["slow"]
    out = log_output.getvalue()
    assert "raised an exception" not in out and "Traceback" not in out, out
