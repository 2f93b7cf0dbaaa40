"""Fixtures: vendor fakes on 127.0.0.1, a settings factory, and the real bot running in-process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from imagebot.app import App, build, run
from imagebot.config import Settings
from imagebot.netguard import Resolver, system_resolver
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

BOT_TOKEN = "123456:TEST-token_abc"
REPLICATE_TOKEN = "r8_test_token"
FAL_KEY = "fal_key_id:fal_key_secret"
WEBHOOK_SECRET = "s3cret-webhook_token"

_SECRET_VARS = (
    "TELEGRAM_BOT_TOKEN",
    "REPLICATE_API_TOKEN",
    "FAL_KEY",
    "IMAGEBOT_WEBHOOK_SECRET",
    "IMAGEBOT_OPS_TOKEN",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "STATE_DIRECTORY",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMAGEBOT_* or vendor variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("IMAGEBOT_") or key in _SECRET_VARS:
            monkeypatch.delenv(key, raising=False)
    # As the CLI does: PTB's RetryAfter otherwise warns about its int/timedelta change.
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(token=BOT_TOKEN) as fake:
        yield fake


@pytest.fixture
async def replicate() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(token=REPLICATE_TOKEN)
    fake.latency_s = 0.15
    async with fake:
        yield fake


@pytest.fixture
async def fal() -> AsyncIterator[FakeFal]:
    fake = FakeFal(key=FAL_KEY)
    fake.latency_s = 0.15
    async with fake:
        yield fake


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    tmp_path: Path, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> SettingsFactory:
    """Settings pointed at the fakes, fast intervals, loopback allowed for media; override any
    section with keyword arguments (`limits={"max_running": 1}`)."""

    def factory(**sections: Any) -> Settings:
        data: dict[str, Any] = {
            "telegram": {
                "api_base_url": telegram.url,
                "poll_timeout_s": 1,
                "rate_per_chat_per_s": 30,
                "rate_group_per_min": 600,
                "rate_overall_per_s": 200,
            },
            "webhook": {"listen": "127.0.0.1", "port": 0, "url": "http://127.0.0.1:9/hook"},
            "ops": {"listen": "127.0.0.1", "port": 0},
            "storage": {
                "database": str(tmp_path / "imagebot.db"),
                "results_dir": str(tmp_path / "results"),
            },
            "access": {"open": True},
            "limits": {"retry_base_s": 0.05, "retry_max_s": 0.2, "rate_per_minute": 100},
            "replicate": {"base_url": replicate.url, "poll_interval_s": 0.05},
            "fal": {"base_url": fal.url, "poll_interval_s": 0.05},
            "media": {
                "allowed_hosts": ["127.0.0.1"],
                "allowed_private_networks": ["127.0.0.1/32"],
            },
            "progress": {"edit_interval_s": 1, "queue_refresh_s": 1},
            "TELEGRAM_BOT_TOKEN": BOT_TOKEN,
            "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
            "FAL_KEY": FAL_KEY,
            "IMAGEBOT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
        return Settings(**deep_merge(data, sections))

    return factory


@asynccontextmanager
async def running(settings: Settings, resolver: Resolver = system_resolver) -> AsyncIterator[App]:
    """The real bot (app.run) in this event loop until the block ends."""
    app = build(settings, resolver=resolver)
    task = asyncio.create_task(run(app))
    try:
        await wait_until(lambda: app.state.ready or task.done(), within=10)
        if task.done():
            task.result()  # raises what made start-up fail
        yield app
    finally:
        app.request_stop("test over")
        await asyncio.wait_for(task, 30)


@pytest.fixture
def bot(make_settings: SettingsFactory) -> Callable[..., Any]:
    """`async with bot(limits={...}) as app:` runs the bot with those overrides."""

    def start(**sections: Any) -> Any:
        return running(make_settings(**sections))

    return start
