"""One chat cannot slow down the others: a chat's backlog is worked through in order while
holding one processing slot, and updates without a chat are not lined up behind each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from telegram import Bot, Update

from imagebot.intake import PerChatUpdateProcessor
from imagebot.store.db import Database
from imagebot.store.inbox import Inbox
from imagebot.store.migrate import migrate
from tests import updates
from tests.conftest import BOT_TOKEN
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows

BACKLOG_CHAT = 5_001
OTHER_CHAT = 5_002
BACKLOG = 400
SLOTS = 256  # PerChatUpdateProcessor's default max_concurrent_updates


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    db = Database(tmp_path / "fair.db", synchronous="off")
    await db.open()
    await migrate(db)
    try:
        yield Inbox(db)
    finally:
        await db.close()


def parsed(update: dict[str, Any]) -> Update:
    return updates.to_update(update, Bot(BOT_TOKEN))


def inline_query() -> dict[str, Any]:
    """An update without a chat (an inline query)."""
    return {
        "update_id": updates.next_update_id(),
        "inline_query": {"id": "iq", "from": updates.user(), "query": "fox", "offset": ""},
    }


async def test_a_chats_backlog_holds_one_slot(inbox: Inbox) -> None:
    """With 2 slots, a chat whose 50 updates wait behind one that is stuck does not stop
    another chat's update, and the stuck chat's next update starts only after the first."""
    processor = PerChatUpdateProcessor(inbox, max_concurrent_updates=2)
    release = asyncio.Event()
    started: list[int] = []

    async def handle(update_id: int, hold: bool) -> None:
        started.append(update_id)
        if hold:
            await release.wait()

    backlog = [parsed(updates.command("/help", chat_id=BACKLOG_CHAT)) for _ in range(50)]
    other = parsed(updates.command("/help", chat_id=OTHER_CHAT))
    await inbox.save([u.to_dict() for u in [*backlog, other]])
    tasks = [
        asyncio.create_task(processor.process_update(u, handle(u.update_id, hold=n == 0)))
        for n, u in enumerate(backlog)
    ]
    tasks.append(
        asyncio.create_task(processor.process_update(other, handle(other.update_id, False)))
    )
    await wait_until(lambda: other.update_id in started, within=10)
    # The other chat was served while the backlog's first update still held its chat.
    assert started == [backlog[0].update_id, other.update_id]
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert started[2:] == [u.update_id for u in backlog[1:]]  # the backlog kept its order
    assert await inbox.unprocessed() == []


async def test_updates_without_a_chat_are_not_lined_up(inbox: Inbox) -> None:
    """Two chat-less updates run side by side: the first waits for something only the second
    does, which would never happen if they shared one lock."""
    processor = PerChatUpdateProcessor(inbox)
    second_ran = asyncio.Event()
    first, second = parsed(inline_query()), parsed(inline_query())
    await inbox.save([first.to_dict(), second.to_dict()])

    async def wait_for_second() -> None:
        await second_ran.wait()

    async def run_second() -> None:
        second_ran.set()

    tasks = [
        asyncio.create_task(processor.process_update(first, wait_for_second())),
        asyncio.create_task(processor.process_update(second, run_second())),
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert await inbox.unprocessed() == []


async def test_a_backlog_in_one_chat_does_not_delay_another_chats_generate(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """400 queued updates in one group (more than the 256 processing slots), its first one
    stuck on a Telegram call, then /generate in another chat: the photo arrives while the whole
    backlog is still unprocessed; once Telegram answers, the backlog is worked through in order."""
    group = -BACKLOG_CHAT
    async with bot() as app:
        path = db_path(app)
        telegram.hold_chat(group)  # every call for the group waits until released
        # Every 50th is addressed to the bot and answered; the rest are not for it (no reply).
        backlog = [
            updates.command(
                "/help@imagebot_test_bot" if n % 50 == 0 else "/help", chat_id=group, user_id=77
            )
            for n in range(BACKLOG)
        ]
        for update in backlog:
            telegram.push_update(update)
        await wait_until(lambda: any(c.params.get("chat_id") == group for c in telegram.calls))
        telegram.push_update(updates.command("/generate a fair fox", chat_id=OTHER_CHAT))
        await wait_until(lambda: len(telegram.photos(OTHER_CHAT)) == 1, within=30)
        backlog_ids = {u["update_id"] for u in backlog}
        unprocessed = rows(path, "SELECT update_id FROM inbox WHERE processed_at IS NULL")
        waiting = sum(1 for r in unprocessed if r["update_id"] in backlog_ids)
        telegram.release_chat(group)
        await wait_until(
            lambda: (
                rows(path, "SELECT count(*) AS n FROM inbox WHERE processed_at IS NULL")[0]["n"]
                == 0
            ),
            within=30,
        )
    print(f"fairness: backlog {BACKLOG}, still unprocessed at the other chat's photo: {waiting}")  # noqa: T201
    # Before the fix the other chat waited for a slot behind the stuck backlog (forever here).
    assert waiting == BACKLOG
    replies = [m.reply_to_message_id for m in telegram.messages(group)]
    assert replies == [u["message"]["message_id"] for u in backlog[::50]]
    order = rows(path, "SELECT update_id FROM inbox ORDER BY processed_at, update_id")
    handled = [
        r["update_id"] for r in order if r["update_id"] in {u["update_id"] for u in backlog}
    ]
    assert handled == [u["update_id"] for u in backlog]
    assert [r["prompt"] for r in rows(path)] == ["a fair fox"]
