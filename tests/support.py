"""Small helpers shared by the tests, the crash harness and the benchmark."""

from __future__ import annotations

import ipaddress
import json
import struct
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.front_door import FrontDoor
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.storeview import query

CHAT = updates.DEFAULT_CHAT_ID


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # inside a list: an inline table ([[credits.packs]])
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(data: Mapping[str, Any], prefix: str = "") -> str:
    """Nested dicts of scalars and lists as TOML tables (enough for imagebot's config)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = []
    if scalars:
        out.append((f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n")
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.append(toml_dumps(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out)


# -- reading a running bot (the App of conftest's `bot` fixture) ----------------------------


@asynccontextmanager
async def behind_front_door(
    bot: Any, webhook: Mapping[str, Any] | None = None, **sections: Any
) -> AsyncIterator[tuple[Any, FrontDoor]]:
    """conftest's `bot(**sections)` in webhook mode on an OS-picked port, its webhook.url a
    FrontDoor (known before the bot starts) that forwards to the port the bot got."""
    apps: list[Any] = []
    async with FrontDoor(lambda: apps[0].services.intake.webhook_port if apps else None) as door:
        hook = {"port": 0, "url": f"{door.url}/telegram/webhook", **(webhook or {})}
        telegram = {"mode": "webhook", **sections.pop("telegram", {})}
        async with bot(telegram=telegram, webhook=hook, **sections) as app:
            apps.append(app)
            yield app, door


def webhook_url(app: Any) -> str:
    port = app.services.intake.webhook_port
    return f"http://127.0.0.1:{port}{app.services.settings.webhook.path}"


async def ops_get(app: Any, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}{path}") as resp,
    ):
        return resp.status, await resp.json()


def rows(db_path: str, sql: str = "SELECT * FROM jobs ORDER BY id") -> list[Any]:
    """Rows of `sql` from the bot's store (SQLite file or PostgreSQL, see tests.storeview)."""
    return query(db_path, sql)


def db_path(app: Any) -> str:
    return str(app.services.settings.storage.database)


def jobs(app: Any) -> list[Any]:
    """Every job row, oldest first."""
    return rows(db_path(app))


async def told(telegram: FakeTelegram, fragment: str, chat: int = CHAT) -> str:
    """Wait for a text containing `fragment` in the chat (failure notices follow the row)."""
    await wait_until(lambda: any(fragment in t for t in telegram.texts(chat)), within=5)
    return next(t for t in telegram.texts(chat) if fragment in t)


async def finished(app: Any, count: int = 1) -> list[Any]:
    done = ("succeeded", "failed", "canceled")
    await wait_until(lambda: len([r for r in jobs(app) if r["status"] in done]) >= count, within=8)
    return jobs(app)


def photo_upd(file_id: str, caption: str | None = None, **kw: Any) -> dict[str, Any]:
    return updates.photo_message(file_id, width=64, height=48, caption=caption, **kw)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(app: Any, token: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}/metrics", headers=headers) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def scrape(app: Any) -> Samples:
    """GET /metrics and parse it the way Prometheus does."""
    status, _, text = await scrape_text(app)
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- test data --------------------------------------------------------------------------------

CREDITS: dict[str, Any] = {
    "enabled": True,
    "generate_cost": 1,
    "edit_cost": 3,
    "support_text": "Payment problems? Write to @owner.",
    "terms_text": "Terms: credits never expire.",
    "privacy_text": "Privacy: we keep your user id and your payments.",
    "packs": [
        {"id": "s", "credits": 20, "stars": 50, "title": "20 credits"},
        {"id": "m", "credits": 50, "stars": 100, "title": "50 credits"},
    ],
}


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims `width`x`height` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def connected_to(seen: list[Any], host: str) -> bool:
    return any(ipaddress.ip_address(a[0]) == ipaddress.ip_address(host) for a in seen)


# -- pressing buttons ------------------------------------------------------------------------


def press(telegram: FakeTelegram, sent: SentMessage, data: str, user_id: int = CHAT) -> str:
    """Press the button `data` under `sent` (as `user_id`); returns the callback query id."""
    update = updates.callback_query(
        data, message=updates.bot_message_dict(sent), user_id=user_id, chat_id=sent.chat_id
    )
    telegram.push_update(update)
    return str(update["callback_query"]["id"])


def answer(telegram: FakeTelegram, query_id: str) -> dict[str, Any] | None:
    """The bot's answerCallbackQuery for that query, if it answered."""
    for record in telegram.answered_callbacks:
        if record.get("callback_query_id") == query_id:
            return record
    return None


def button_data(sent: SentMessage) -> list[str]:
    """The callback data of every inline button under `sent`."""
    markup = sent.reply_markup or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


def answer_text(telegram: FakeTelegram, update: dict[str, Any]) -> str | None:
    """The text of the bot's answer to that button press, if it answered."""
    query_id = update["callback_query"]["id"]
    for record in telegram.answered_callbacks:
        if record.get("callback_query_id") == query_id:
            return str(record.get("text") or "")
    return None
