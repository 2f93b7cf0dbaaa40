"""Payments survive kill -9 (issue 18): the real daemon as a subprocess (tests/crash_harness.py)
is killed after a successful_payment update was saved and before it was processed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import updates
from tests.crash_harness import Daemon, query
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import CREDITS, deep_merge, toml_dumps

pytestmark = pytest.mark.slow

CHAT = updates.DEFAULT_CHAT_ID


def purchases(daemon: Daemon) -> list[tuple[str, int]]:
    rows = query(
        daemon.db_path,
        "SELECT charge_id, credits FROM credit_ledger WHERE kind = 'purchase' ORDER BY id",
    )
    return [(r["charge_id"], r["credits"]) for r in rows]


def receipts(telegram: FakeTelegram) -> list[str]:
    return [t for t in telegram.texts(CHAT) if "received" in t]


async def test_kill_between_saving_a_payment_and_crediting_it(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    store_target: str,
) -> None:
    """kill -9 while a successful_payment update sits saved but unprocessed (its chat is busy):
    after the restart it is credited exactly once, with one receipt, and neither a redelivery
    nor the start-up reconciliation credits it again."""
    daemon = Daemon(tmp_path, telegram, replicate, fal, database=store_target, credits=CREDITS)
    # ("telegram" is also the harness's own argument: set the section after construction)
    daemon.config = deep_merge(daemon.config, {"telegram": {"request_timeout_s": 60}})
    daemon.config_path.write_text(toml_dumps(daemon.config), encoding="utf-8")
    try:
        await daemon.start()
        telegram.push_update(updates.command("/buy s"))
        await telegram.wait_for(lambda: len(telegram.invoices_in(CHAT)) == 1)
        invoice = telegram.invoices_in(CHAT)[0]
        # Busy the chat: the handler of this /generate waits 60 s for its "Generating…" send,
        # and the chat's next update waits behind it.
        telegram.delay_next("sendMessage", 60)
        telegram.push_update(updates.command("/generate hold the chat"))
        await telegram.wait_for(lambda: len(telegram.calls_of("sendMessage")) == 1)

        checkout, charge = await telegram.pay(invoice)
        assert checkout.outcome == "approved"  # the pre-checkout does not wait for the chat
        assert charge is not None
        update_id = charge.update["update_id"]
        await wait_until(lambda: update_id in telegram.webhook_acked_update_ids)
        saved = query(
            daemon.db_path, "SELECT processed_at FROM inbox WHERE update_id = ?", (update_id,)
        )
        assert [r["processed_at"] for r in saved] == [None]
        assert purchases(daemon) == []

        await daemon.kill()
        calls_before = len(telegram.calls_of("getStarTransactions"))
        await daemon.start()
        await wait_until(lambda: len(purchases(daemon)) == 1, within=20)
        # (reconciliation is the maintenance leader's: on PostgreSQL the new process takes the
        # lease once the killed one's runs out)
        await wait_until(lambda: len(receipts(telegram)) == 1, within=20)
        await wait_until(
            lambda: len(telegram.calls_of("getStarTransactions")) > calls_before, within=20
        )
        telegram.push_update(charge.update)  # Telegram resends it, for good measure
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=20)

        assert purchases(daemon) == [(charge.charge_id, 20)]
        assert len(receipts(telegram)) == 1
        assert "Your balance: 20 credits" in receipts(telegram)[0]
        (row,) = query(
            daemon.db_path, "SELECT processed_at FROM inbox WHERE update_id = ?", (update_id,)
        )
        assert row["processed_at"] is not None
        code, _ = await daemon.terminate()
        assert code == 0
        # The replayed update and the start-up reconciliation race for the charge: whichever
        # wins credits it (logged once), the other finds it in the ledger.
        events = daemon.log_events("payment_credited") + daemon.log_events("payment_reconciled")
        assert [(e["user_id"], e["charge_id"], e["order_id"]) for e in events] == [
            (CHAT, charge.charge_id, 1)
        ]
        assert all("successful_payment" not in str(e) for e in events)  # never the update
    finally:
        await daemon.close()
