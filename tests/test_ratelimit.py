"""Outgoing flood control against a fake Telegram that enforces the real limits with 429s."""

from __future__ import annotations

from itertools import pairwise

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CHATS = [3001, 3002, 3003, 3004, 3005]
DEFAULT_LIMITS = {"rate_overall_per_s": 25, "rate_per_chat_per_s": 1, "rate_group_per_min": 20}


async def test_bursts_to_many_chats_draw_no_429(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Two jobs in each of five chats at once, with Telegram's limits enforced: every result
    arrives, no 429 is ever answered, and sends to one chat are spaced at least 1 s apart."""
    replicate.latency_s = 0.2
    telegram.enforce_flood(overall_per_s=30, per_chat_per_s=1)
    async with bot(telegram=DEFAULT_LIMITS, limits={"rate_per_minute": 100}):
        for chat in CHATS:
            for n in range(2):
                telegram.push_update(updates.command(f"/generate {n}", chat_id=chat, user_id=chat))
        await wait_until(lambda: all(len(telegram.photos(c)) == 2 for c in CHATS), within=30)
    assert telegram.flood_429s == 0
    for chat in CHATS:
        sends = sorted(m.sent_at for m in telegram.messages(chat, include_deleted=True))
        assert all(b - a >= 1.0 for a, b in pairwise(sends))


async def test_group_sends_are_spaced_for_twenty_a_minute(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """In a group, sends are spaced so that no minute can hold more than 20 of them."""
    group = -100_9001
    replicate.latency_s = 0.1
    telegram.enforce_flood(group_per_min=20)
    async with bot(telegram={**DEFAULT_LIMITS, "groups_require_mention": False}):
        telegram.push_update(updates.command("/generate together", chat_id=group, user_id=7))
        await wait_until(lambda: len(telegram.photos(group)) == 1, within=30)
    assert telegram.flood_429s == 0
    sends = sorted(m.sent_at for m in telegram.messages(group, include_deleted=True))
    assert len(sends) == 2  # "Generating…" and the photo
    assert sends[1] - sends[0] >= 3.0  # 60 s / 19 = 3.2 s apart
