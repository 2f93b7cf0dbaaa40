"""Telegram's outgoing limits shared by several processes through the database (issue 16).

Each "process" here is what one imagebot process has: its own Database object on the one
PostgreSQL, its own SharedRateLimiter and its own PTB bot; they send to the fake Telegram,
which enforces the real flood limits with 429s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from telegram.ext import ExtBot
from telegram.request import HTTPXRequest

from imagebot.config import TelegramSettings
from imagebot.sharedlimit import AHEAD_SLACK_S, SharedRateLimiter
from imagebot.store.db import PACING, Database
from imagebot.store.migrate import migrate
from imagebot.store.sendslots import SendSlots
from tests import storeview, updates
from tests.conftest import BOT_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.pgcluster import start_cluster
from tests.support import toml_dumps

LIMITS = {"rate_overall_per_s": 25, "rate_per_chat_per_s": 1, "rate_group_per_min": 20}


@asynccontextmanager
async def opened(target: str | Path) -> AsyncIterator[Database]:
    db = Database(target)
    await db.open()
    try:
        await migrate(db)
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def sender(
    telegram: FakeTelegram, db: Database, processes: int = 3, slots: SendSlots | None = None
) -> AsyncIterator[tuple[ExtBot[None], SharedRateLimiter]]:
    """One process's sending side: a PTB bot whose requests go through a shared limiter
    (which counts `processes` live processes) on `slots` (made here if not given)."""
    settings = TelegramSettings(api_base_url=telegram.url, **LIMITS)

    async def peers() -> int:
        return processes

    limiter = SharedRateLimiter(settings, slots or SendSlots(db), peers=peers)
    limiter.keep_timings = True
    bot: ExtBot[None] = ExtBot(
        BOT_TOKEN,
        base_url=settings.bot_url,
        request=HTTPXRequest(connection_pool_size=64),
        rate_limiter=limiter,
    )
    async with bot:
        yield bot, limiter


def busiest_second(times: list[float]) -> int:
    """The most sends that fall into any one-second window."""
    times = sorted(times)
    most, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]


async def test_slots_are_spaced_on_the_database_clock(store_target: str) -> None:
    """Reservations of one key come back a step apart, a busy chat reserves nothing and says
    when it is free, and a pause holds the global slot back (both stores)."""
    async with opened(store_target) as db:
        slots = SendSlots(db)
        waits = [(await slots.reserve(60.0)).wait_s for _ in range(3)]
        assert waits[0] == 0.0
        assert 55 < waits[1] < 61 and 115 < waits[2] < 121
        chat = ("chat:5", 30.0)
        first = await slots.reserve(0.001, chat)
        assert first.reserved and 170 < first.wait_s < 181  # behind the three global slots
        busy = await slots.reserve(0.001, chat)
        assert not busy.reserved and 195 < busy.wait_s < 211  # the chat: that slot + 30 s
        await slots.pause(1000.0)
        assert 990 < (await slots.reserve(0.001)).wait_s < 1001
        assert await slots.prune() == 0  # every row is in the future: none is free


async def test_asks_at_once_share_a_round_trip_and_each_sees_the_ones_before(
    pg_url: str,
) -> None:
    """40 sends ask at once (a busy process): fewer writer calls than asks, one global slot
    each a step apart, a chat asked for twice in one group reserved once (the second ask sees
    the first's slot), a hold and the holds of a group applied, every ask answered."""
    async with opened(pg_url) as db:
        slots = SendSlots(db)
        gates = [("chat:1", 30.0), ("chat:1", 30.0), *((f"chat:{n}", 30.0) for n in range(2, 40))]
        answers = await asyncio.gather(*(slots.reserve(1.0, gate) for gate in gates))
        taken = sorted(a.wait_s for a in answers if a.reserved)
        refused = [a for a in answers if not a.reserved]
        assert len(taken) == 39 and len(refused) == 1
        assert 29 < refused[0].wait_s < 70  # chat:1's slot (0 to 39 s away) + its 30 s
        assert taken[0] < 0.05
        steps = [later - earlier for earlier, later in itertools.pairwise(taken)]
        assert all(0.95 < step < 1.05 for step in steps), steps
        assert 0 < slots.calls < slots.asks == 40
        # holds grouped too: each key busy for its own step from now
        await asyncio.gather(slots.hold("chat:2", 100.0), slots.hold("chat:3", 500.0))
        busy = [await slots.reserve(1.0, (key, 30.0)) for key in ("chat:2", "chat:3")]
        assert not busy[0].reserved and 95 < busy[0].wait_s <= 100
        assert not busy[1].reserved and 495 < busy[1].wait_s <= 500


async def test_two_processes_groups_over_the_same_chats_do_not_deadlock(pg_url: str) -> None:
    """Two processes each send to the same 20 chats, in opposite orders, while their writers
    are busy, so that each process's asks go as one group and the two groups meet on the
    server (each reservation locks its chat's row, then 'global'). Every ask is answered,
    and each chat is reserved by exactly one process. (PostgreSQL found a deadlock here and
    failed a whole group; its process paced in memory for 5 s and drew 429s.)"""
    keys = [f"chat:{n}" for n in range(20)]
    async with opened(pg_url) as db_a, opened(pg_url) as db_b:
        releases = [threading.Event() for _ in range(4)]
        holds = [  # both PACING writers of each process, until released
            asyncio.create_task(db.run(lambda conn, r=r: r.wait(10), priority=PACING))
            for db, r in zip((db_a, db_a, db_b, db_b), releases, strict=True)
        ]
        await asyncio.sleep(0.1)
        a, b = SendSlots(db_a), SendSlots(db_b)
        asks = [asyncio.create_task(a.reserve(0.001, (key, 5.0))) for key in keys]
        asks += [asyncio.create_task(b.reserve(0.001, (key, 5.0))) for key in reversed(keys)]
        await asyncio.sleep(0.2)  # every ask joined its process's one open group
        for release in releases:
            release.set()
        await asyncio.gather(*holds)
        answers = await asyncio.wait_for(asyncio.gather(*asks), 20)
        assert (a.calls, b.calls) == (1, 1)
    by_a, by_b = answers[:20], list(reversed(answers[20:]))
    assert [x.reserved != y.reserved for x, y in zip(by_a, by_b, strict=True)] == [True] * 20


async def test_three_processes_share_one_limit(telegram: FakeTelegram, pg_url: str) -> None:
    """Three processes burst 240 messages at once (60 chats hear once from each process, one
    chat three times from each) while Telegram enforces 30/s overall and 1/s per chat: no
    429, every message arrives, and no second holds more than Telegram's 30."""
    telegram.enforce_flood(overall_per_s=30, per_chat_per_s=1)
    chats = [4000 + n for n in range(60)]
    busy_chat = 4999
    async with AsyncExitStack() as stack:
        senders = []
        for _ in range(3):
            db = await stack.enter_async_context(opened(pg_url))
            senders.append(await stack.enter_async_context(sender(telegram, db)))

        async def burst(p: int, bot: ExtBot[None]) -> None:
            sends = [bot.send_message(chat, f"p{p} c{chat}") for chat in chats]
            sends += [bot.send_message(busy_chat, f"p{p} m{m}") for m in range(3)]
            await asyncio.gather(*sends)

        started = time.monotonic()
        await asyncio.gather(*(burst(p, bot) for p, (bot, _) in enumerate(senders)))
        elapsed = time.monotonic() - started
    assert telegram.flood_429s == 0
    for chat in chats:
        assert sorted(m.text or "" for m in telegram.messages(chat)) == [
            f"p{p} c{chat}" for p in range(3)
        ]
    assert sorted(m.text or "" for m in telegram.messages(busy_chat)) == [
        f"p{p} m{m}" for p in range(3) for m in range(3)
    ]
    sends = [m.sent_at for chat in [*chats, busy_chat] for m in telegram.messages(chat)]
    assert busiest_second(sends) <= 30  # Telegram's limit (the limiter aims at 25)
    timings = [s for _, limiter in senders for s in limiter.reservation_s]
    spread = sorted(m.sent_at for chat in chats for m in telegram.messages(chat))
    print(  # noqa: T201 - the figures for RELIABILITY.md
        f"\n3 senders: {len(sends)} messages in {elapsed:.2f} s; the {len(spread)} to distinct"
        f" chats at {(len(spread) - 1) / (spread[-1] - spread[0]):.1f}/s"
        f" (busiest second {busiest_second(sends)}); {len(timings)} reservations:"
        f" p50 {statistics.median(timings) * 1000:.2f} ms,"
        f" p99 {percentile(timings, 99) * 1000:.2f} ms"
    )


async def test_a_slot_reserved_ahead_is_used_and_keeps_the_chat_spaced(
    telegram: FakeTelegram, pg_url: str
) -> None:
    """A request's answer has its slot asked for while its job is being made (reserve_ahead):
    the send goes on it without an ask of its own. Another process sending to the same chat
    at that moment still comes a chat's spacing after it, also when the answer went later
    than the slack its slot was reserved with (its chat's next slot is moved on first then).
    Telegram, enforcing 1 message a second per chat, refuses nothing."""
    telegram.enforce_flood(overall_per_s=30, per_chat_per_s=1)
    async with opened(pg_url) as db_a, opened(pg_url) as db_b:
        slots_a = SendSlots(db_a)
        async with (
            sender(telegram, db_a, slots=slots_a) as (bot_a, limiter_a),
            sender(telegram, db_b) as (bot_b, _),
        ):
            # (chat, how long the job takes to make, A's asks: ahead, [move on], after)
            for chat, making_s, asks in ((6001, 0.2, 2), (6002, AHEAD_SLACK_S + 0.4, 3)):
                before = slots_a.asks
                limiter_a.reserve_ahead(chat)
                await asyncio.sleep(making_s)
                assert slots_a.asks - before == 1  # asked while the job was being made
                await asyncio.gather(
                    bot_a.send_message(chat, "A: your job is queued"),
                    bot_b.send_message(chat, "B: your picture"),
                )
                assert slots_a.asks - before == asks
    assert telegram.flood_429s == 0
    for chat in (6001, 6002):
        first, second = telegram.messages(chat)
        assert first.text == "A: your job is queued"
        assert second.sent_at - first.sent_at >= 1.0


async def test_a_429_pauses_every_process(telegram: FakeTelegram, pg_url: str) -> None:
    """When Telegram answers one process "retry after 3", another process sends nothing
    until that time has passed, and the refused message still arrives."""
    telegram.fail_method("sendMessage", 429, "Too Many Requests: retry after 3", retry_after=3)
    async with (
        opened(pg_url) as db_a,
        opened(pg_url) as db_b,
        sender(telegram, db_a) as (bot_a, _),
        sender(telegram, db_b) as (bot_b, _),
    ):
        refused = asyncio.create_task(bot_a.send_message(5001, "first"))
        # the pause is in the database: the global slot is ~3 s ahead
        await wait_until(
            lambda: bool(
                storeview.query(
                    pg_url,
                    "SELECT 1 FROM send_slots WHERE key = 'global'"
                    " AND tat > now() + interval '2 seconds'",
                )
            ),
            within=10,
        )
        paused_at = time.time()
        await bot_b.send_message(5002, "second")
        await refused
    (first,) = telegram.messages(5001)
    (second,) = telegram.messages(5002)
    assert first.text == "first"
    assert second.sent_at - paused_at >= 2.0


async def test_database_away_falls_back_to_pacing_in_memory(
    telegram: FakeTelegram, tmp_path: Path, log_output: Any
) -> None:
    """With PostgreSQL gone, a process still sends (paced in memory, said once in the log),
    and once the server is back it shares the database's slots again."""
    cluster = start_cluster()
    if cluster is None:
        pytest.skip("PostgreSQL is not installed")
    try:
        url = cluster.create_db()
        async with opened(url) as db, sender(telegram, db) as (bot, _):
            await bot.send_message(6001, "shared")
            await asyncio.to_thread(cluster.stop)
            for n in range(3):
                await bot.send_message(6002 + n, f"local {n}")
            await asyncio.to_thread(cluster.start)
            await wait_until(lambda: storeview.query(url, "SELECT 1 AS one"), within=20)
            # sends go on; within RETRY_SHARED_S (5 s) the limiter asks the database again
            # and the chat's slot shows up there (bounded: 40 sends, 0.25 s apart)
            for n in range(40):
                await bot.send_message(6100 + n, "back?")
                if storeview.query(
                    url, "SELECT 1 FROM send_slots WHERE key = ?", (f"chat:{6100 + n}",)
                ):
                    break
                await asyncio.sleep(0.25)
            else:
                raise AssertionError("the limiter never used the database again")
    finally:
        cluster.destroy()
    assert [m.text for m in telegram.messages(6001)] == ["shared"]
    assert [telegram.messages(6002 + n)[0].text for n in range(3)] == [
        f"local {n}" for n in range(3)
    ]
    assert all(telegram.messages(6100 + k)[0].text == "back?" for k in range(n + 1))
    log = log_output.getvalue()
    assert log.count('"telegram_send_limit_local"') == 1
    (local,) = [json.loads(line) for line in log.splitlines() if "send_limit_local" in line]
    assert local["processes"] == 3 and local["rate_overall_per_s"] == 8.33  # 25/s shared by 3
    assert log.count('"telegram_send_limit_shared"') == 1


@pytest.mark.timeout(120)
async def test_three_daemons_deliver_everything_without_a_429(
    telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal, pg_url: str, tmp_path: Path
) -> None:
    """Three real imagebot processes on one PostgreSQL, updates POSTed round-robin to their
    webhooks (20 chats asking twice, one chat asking six times), Telegram enforcing 30/s and
    1/s per chat: every photo arrives and no 429 is ever answered."""
    from tests.crash_harness import WEBHOOK_PATH, Daemon

    telegram.enforce_flood(overall_per_s=30, per_chat_per_s=1)
    replicate.latency_s = 0.1
    daemons = []
    for n in range(3):
        (tmp_path / f"node{n}").mkdir()
        daemon = Daemon(
            tmp_path / f"node{n}",
            telegram,
            replicate,
            fal,
            database=pg_url,
            progress={"edit_interval_s": 1, "queue_refresh_s": 5},
        )
        daemon.config["telegram"].update(LIMITS)  # ("telegram" is the fake's argument)
        daemon.config_path.write_text(toml_dumps(daemon.config), encoding="utf-8")
        daemons.append(daemon)
    chats = [7000 + n for n in range(20)]
    busy_chat = 7999
    asks = [(chat, n) for n in range(2) for chat in chats] + [(busy_chat, n) for n in range(6)]
    try:
        await asyncio.gather(*(daemon.start() for daemon in daemons))
        for i, (chat, n) in enumerate(asks):
            port = daemons[i % 3].webhook_port
            update = updates.command(f"/generate cat {n}", chat_id=chat, user_id=chat)
            status, _ = await updates.post_webhook(
                f"http://127.0.0.1:{port}{WEBHOOK_PATH}", update, secret=WEBHOOK_SECRET
            )
            assert status == 200
        await wait_until(
            lambda: (
                all(len(telegram.photos(c)) >= 2 for c in chats)
                and len(telegram.photos(busy_chat)) >= 6
            ),
            within=50,
            interval=0.2,
        )
        jobs = daemons[0].jobs()
        floods = [e for d in daemons for e in d.log_events("telegram_flood_wait")]
    finally:
        for daemon in daemons:
            await daemon.close()
    assert telegram.flood_429s == 0, floods
    # Every job's photo arrived. (Jobs are asserted no further here: until result files are
    # shared by every process, a job a second process resumed may end results_expired.)
    assert len(jobs) == len(asks)
    sends = [m.sent_at for c in [*chats, busy_chat] for m in telegram.messages(c, True)]
    print(  # noqa: T201 - the figures for RELIABILITY.md
        f"\n3 daemons: {len(jobs)} jobs, {len(sends)} messages, photos"
        f" {sum(len(telegram.photos(c)) for c in [*chats, busy_chat])},"
        f" busiest second {busiest_second(sends)}, 429s {telegram.flood_429s}"
    )
