"""Credits bought with Telegram Stars (issue 18): invoices, pre-checkout, crediting once,
spending past the free caps, refunds, reconciliation. The real bot runs in-process against the
fake Telegram, which knows sendInvoice, answerPreCheckoutQuery, refundStarPayment and
getStarTransactions and can play a user who pays."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imagebot.config import load_settings
from imagebot.errors import ConfigError
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, Invoice
from tests.storeview import query
from tests.support import CREDITS, behind_front_door

CHAT = USER = updates.DEFAULT_USER_ID
OTHER = 2002
ADMIN = 4242


def credits(**overrides: Any) -> dict[str, Any]:
    return {**CREDITS, **overrides}


def sections(**overrides: Any) -> dict[str, Any]:
    """Credits on, an admin, free caps at 0 (every job is paid) unless overridden."""
    base: dict[str, Any] = {
        "credits": credits(),
        "access": {"open": True, "admins": [ADMIN]},
        "generate": {"daily_cap": 0},
        "edit": {"daily_cap": 0},
    }
    base.update(overrides)
    return base


def db_rows(app: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    return query(str(app.services.settings.storage.database), sql, params)


def balance(app: Any, user_id: int = USER) -> int:
    (row,) = db_rows(
        app, "SELECT coalesce(sum(credits), 0) FROM credit_ledger WHERE user_id = ?", (user_id,)
    )
    return int(row[0])


def purchases(app: Any) -> list[Any]:
    return db_rows(app, "SELECT * FROM credit_ledger WHERE kind = 'purchase' ORDER BY id")


async def ops_text(app: Any, path: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}{path}") as resp,
    ):
        return await resp.text()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def buy(telegram: FakeTelegram, pack: str = "s", user_id: int = USER) -> Invoice:
    """/buy <pack> from `user_id` in their private chat; the invoice the bot sent."""
    before = len(telegram.invoices_in(user_id))
    telegram.push_update(updates.command(f"/buy {pack}", chat_id=user_id, user_id=user_id))
    await wait_until(lambda: len(telegram.invoices_in(user_id)) > before)
    return telegram.invoices_in(user_id)[-1]


def texts_with(telegram: FakeTelegram, needle: str, chat: int = CHAT) -> list[str]:
    return [t for t in telegram.texts(chat) if needle in t]


async def test_buy_sends_a_stars_invoice_and_a_payment_credits_once(
    bot: Any, telegram: FakeTelegram
) -> None:
    """/buy sends an XTR invoice (one price, no provider token, no tips) whose payload names
    the order row; paying credits 20 once with a receipt; the same update again, or the same
    charge in another update, changes nothing."""
    async with bot(**sections()) as app:
        invoice = await buy(telegram, "s")
        assert (invoice.currency, invoice.amount, invoice.title) == ("XTR", 50, "20 credits")
        assert "provider_token" not in invoice.params
        assert "max_tip_amount" not in invoice.params
        assert "suggested_tip_amounts" not in invoice.params
        (order,) = db_rows(app, "SELECT * FROM star_orders WHERE payload = ?", (invoice.payload,))
        assert (order["user_id"], order["pack_id"], order["stars"], order["credits"]) == (
            USER,
            "s",
            50,
            20,
        )
        assert order["status"] == "open"

        checkout, charge = await telegram.pay(invoice)
        assert checkout.outcome == "approved"
        assert charge is not None
        await wait_until(lambda: bool(texts_with(telegram, "received")))
        assert "Your balance: 20 credits" in texts_with(telegram, "received")[0]
        assert balance(app) == 20

        # Telegram redelivers the update; then (never documented, guarded anyway) the same
        # charge arrives in an update with a new id.
        telegram.push_update(charge.update)
        again = dict(charge.update, update_id=updates.next_update_id())
        telegram.push_update(again)
        await wait_until(
            lambda: bool(
                db_rows(
                    app,
                    "SELECT 1 FROM inbox WHERE update_id = ? AND processed_at IS NOT NULL",
                    (again["update_id"],),
                )
            )
        )
        (row,) = purchases(app)
        assert (row["charge_id"], row["credits"], row["stars"]) == (charge.charge_id, 20, 50)
        assert row["order_id"] == order["id"]
        assert balance(app) == 20
        assert len(texts_with(telegram, "received")) == 1
        (order,) = db_rows(app, "SELECT * FROM star_orders WHERE id = ?", (order["id"],))
        assert order["status"] == "paid"

        telegram.push_update(updates.command("/balance"))
        await wait_until(lambda: bool(texts_with(telegram, "Your last purchases")))
        shown = texts_with(telegram, "Your last purchases")[0]
        assert "Your balance: 20 credits." in shown
        assert charge.charge_id in shown
        assert "Generate: 1 credit" in shown
        assert "Edit: 3 credits" in shown
        page = await ops_text(app, "/metrics")
    assert metric(page, "imagebot_stars_received_total") == 50
    assert metric(page, 'imagebot_payments_total{outcome="credited"}') == 1
    assert metric(page, 'imagebot_payments_total{outcome="duplicate"}') == 1


async def test_the_same_invoice_paid_twice_is_two_purchases(
    bot: Any, telegram: FakeTelegram
) -> None:
    """Two taps on Pay approved before either payment lands are two charges: both credited,
    each in its own row; once the order is paid, a further pre-checkout is refused."""
    async with bot(**sections()) as app:
        invoice = await buy(telegram, "s")
        first, second = await asyncio.gather(
            telegram.pre_checkout(invoice), telegram.pre_checkout(invoice)
        )
        assert (first.outcome, second.outcome) == ("approved", "approved")
        one = telegram.complete_payment(first)
        two = telegram.complete_payment(second)
        await wait_until(lambda: len(purchases(app)) == 2)
        assert {r["charge_id"] for r in purchases(app)} == {one.charge_id, two.charge_id}
        await wait_until(lambda: len(texts_with(telegram, "received")) == 2)
        assert balance(app) == 40
        late = await telegram.pre_checkout(invoice)
        assert late.outcome == "refused"
        assert late.error_message is not None
        assert "already paid" in late.error_message


async def test_tampered_pre_checkouts_are_refused(bot: Any, telegram: FakeTelegram) -> None:
    """A pre-checkout with a wrong amount or currency, from another user, or for an unknown
    order is refused with a clear message; nothing is charged or credited."""
    async with bot(**sections()) as app:
        invoice = await buy(telegram, "s")
        cheap = await telegram.pre_checkout(invoice, amount=1)
        other = await telegram.pre_checkout(invoice, user_id=OTHER)
        unknown = await telegram.pre_checkout(invoice, payload="o:999:forged")
        wrong_currency = await telegram.pre_checkout(invoice, currency="USD")
        for checkout in (cheap, other, unknown, wrong_currency):
            assert checkout.outcome == "refused", checkout
        assert cheap.error_message is not None
        assert "amount" in cheap.error_message
        assert other.error_message is not None
        assert "someone else" in other.error_message
        assert unknown.error_message is not None
        assert "isn't valid" in unknown.error_message
        assert purchases(app) == []
        assert telegram.charges == {}
        # The real one still goes through.
        checkout, _ = await telegram.pay(invoice)
        assert checkout.outcome == "approved"
        await wait_until(lambda: balance(app) == 20)


async def test_pay_during_edit_is_credited_and_the_edit_goes_on(
    bot: Any, telegram: FakeTelegram
) -> None:
    """A user in the middle of /edit (the bot waits for a photo) pays: the payment is credited
    with a receipt, and the conversation still takes the photo next."""
    async with bot(**sections()) as app:
        invoice = await buy(telegram, "s")
        telegram.push_update(updates.command("/edit"))
        await wait_until(lambda: bool(texts_with(telegram, "Send me the photo")))
        checkout, _ = await telegram.pay(invoice)
        assert checkout.outcome == "approved"
        await wait_until(lambda: balance(app) == 20)
        await wait_until(lambda: bool(texts_with(telegram, "received")))
        assert not texts_with(telegram, "I need a photo")  # the edit did not see the payment
        file_id = telegram.add_file(b"not really a photo", file_size=18)
        telegram.push_update(updates.photo_message(file_id))
        await wait_until(lambda: bool(texts_with(telegram, "What should I change?")))


async def test_jobs_past_the_free_cap_spend_credits_and_failures_give_them_back(
    bot: Any, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With the free cap at 0 a user without credits is told so and offered the packs as
    buttons; a pack button brings the invoice; after paying, a delivered image costs 1 credit
    (shown in /jobs) and a failed job gives its credit back."""
    async with bot(**sections()) as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: bool(texts_with(telegram, "isn't free")))
        offer = next(m for m in telegram.messages(CHAT) if "isn't free" in (m.text or ""))
        assert "costs 1 credit and you have 0 credits" in (offer.text or "")
        assert offer.reply_markup is not None
        buttons = [b for row in offer.reply_markup["inline_keyboard"] for b in row]
        assert [b["callback_data"] for b in buttons] == ["buy:s", "buy:m"]
        assert db_rows(app, "SELECT * FROM jobs") == []

        telegram.push_update(
            updates.callback_query("buy:m", message=updates.bot_message_dict(offer))
        )
        await wait_until(lambda: len(telegram.invoices_in(CHAT)) == 1)
        invoice = telegram.invoices_in(CHAT)[0]
        assert (invoice.amount, invoice.title) == (100, "50 credits")
        await telegram.pay(invoice)
        await wait_until(lambda: balance(app) == 50)

        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(
            lambda: bool(db_rows(app, "SELECT 1 FROM credit_ledger WHERE kind = 'job_refund'"))
        )
        assert balance(app) == 49
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{app.ops.port}/jobs") as resp,
        ):
            listed = await resp.json()
        assert listed["jobs"][0]["credits_cost"] == 1

        replicate.outcome = "failed"
        telegram.push_update(updates.command("/generate another fox"))
        await wait_until(lambda: bool(texts_with(telegram, "failed")))
        await wait_until(
            lambda: len(db_rows(app, "SELECT 1 FROM credit_ledger WHERE kind = 'job_refund'")) == 2
        )
        assert balance(app) == 49
        # The failed job (by status, not by id: PostgreSQL's identity skips the id a refused
        # request's rolled-back insert took, SQLite's does not).
        rows = db_rows(
            app,
            "SELECT kind, credits, job_id FROM credit_ledger"
            " WHERE job_id = (SELECT id FROM jobs WHERE status = 'failed')",
        )
        assert sorted((r["kind"], r["credits"]) for r in rows) == [
            ("job_refund", 1),
            ("spend", -1),
        ]
        page = await ops_text(app, "/metrics")
    assert metric(page, 'imagebot_credits_spent_total{kind="generate"}') == 1


async def test_free_allowance_first_and_admins_spend_nothing(
    bot: Any, telegram: FakeTelegram
) -> None:
    """A free cap of 1 is used before credits; an admin past every cap pays nothing."""
    async with bot(
        **sections(generate={"daily_cap": 1}, credits=credits(welcome_credits=5))
    ) as app:
        telegram.push_update(updates.command("/generate one"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        assert balance(app) == 5  # the welcome grant, untouched by the free job
        telegram.push_update(updates.command("/generate two"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await wait_until(lambda: balance(app) == 4)
        for n in range(2):
            telegram.push_update(
                updates.command(f"/generate admin {n}", chat_id=ADMIN, user_id=ADMIN)
            )
        await wait_until(lambda: len(telegram.photos(ADMIN)) == 2)
        kinds = db_rows(app, "SELECT kind FROM credit_ledger WHERE user_id = ?", (ADMIN,))
        assert [r["kind"] for r in kinds] == ["welcome"]  # nothing spent
        assert balance(app, ADMIN) == 5


async def test_admin_refund_takes_credits_back_and_calls_telegram_once(
    bot: Any, telegram: FakeTelegram
) -> None:
    """/refund <charge>: refundStarPayment once, the credits leave the balance, the user is
    told; a second /refund says it is done already and does not call Telegram again."""
    async with bot(**sections()) as app:
        _, charge = await telegram.pay(await buy(telegram, "s"))
        assert charge is not None
        await wait_until(lambda: balance(app) == 20)
        telegram.push_update(
            updates.command(f"/refund {charge.charge_id}", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "Refunded charge", ADMIN)))
        assert len(telegram.calls_of("refundStarPayment")) == 1
        assert telegram.charges[charge.charge_id].refunded
        assert balance(app) == 0
        await wait_until(lambda: bool(texts_with(telegram, "were refunded to you")))
        telegram.push_update(
            updates.command(f"/refund {charge.charge_id}", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "already refunded", ADMIN)))
        assert len(telegram.calls_of("refundStarPayment")) == 1
        # Telegram's refunded_payment message was only a confirmation.
        refunds = db_rows(app, "SELECT * FROM credit_ledger WHERE kind = 'star_refund'")
        assert [(r["credits"], r["stars"]) for r in refunds] == [(-20, -50)]
        telegram.push_update(updates.command(f"/refund {charge.charge_id}"))
        await wait_until(lambda: bool(texts_with(telegram, "I don't know /refund")))
        assert len(telegram.calls_of("refundStarPayment")) == 1
        page = await ops_text(app, "/metrics")
    assert metric(page, "imagebot_stars_refunded_total") == 50


async def test_refund_refused_when_credits_are_spent_and_already_refunded_counts_as_done(
    bot: Any, telegram: FakeTelegram
) -> None:
    """A refund that would push a balance below zero is refused with the reason (Telegram not
    called); Telegram's CHARGE_ALREADY_REFUNDED is taken as done; any other error leaves the
    credits where they were."""
    async with bot(**sections(credits=credits(generate_cost=15))) as app:
        _, spent = await telegram.pay(await buy(telegram, "s"))
        assert spent is not None
        await wait_until(lambda: balance(app) == 20)
        telegram.push_update(updates.command("/generate a fox"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: balance(app) == 5)
        telegram.push_update(
            updates.command(f"/refund {spent.charge_id}", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "Not refunded", ADMIN)))
        assert "can't go below zero" in texts_with(telegram, "Not refunded", ADMIN)[0]
        assert telegram.calls_of("refundStarPayment") == []
        assert balance(app) == 5

        _, other = await telegram.pay(await buy(telegram, "s"))
        assert other is not None
        await wait_until(lambda: balance(app) == 25)
        telegram.fail_method("refundStarPayment", 400, "Bad Request: USER_ID_INVALID")
        telegram.push_update(
            updates.command(f"/refund {other.charge_id}", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "didn't refund", ADMIN)))
        assert balance(app) == 25
        telegram.refund_elsewhere(other.charge_id)
        telegram.push_update(
            updates.command(f"/refund {other.charge_id}", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "Refunded charge", ADMIN)))
        assert balance(app) == 5


async def test_grant_and_the_operator_texts(bot: Any, telegram: FakeTelegram) -> None:
    """Admin /grant adds credits with a note; /paysupport, /terms and /privacy answer with the
    operator's texts; a user's /grant and /refund get the unknown-command answer."""
    async with bot(**sections()) as app:
        telegram.push_update(
            updates.command(f"/grant {USER} 7 sorry for the wait", chat_id=ADMIN, user_id=ADMIN)
        )
        await wait_until(lambda: bool(texts_with(telegram, "Gave user", ADMIN)))
        assert balance(app) == 7
        (row,) = db_rows(app, "SELECT * FROM credit_ledger WHERE kind = 'grant'")
        assert row["note"] == f"granted by admin {ADMIN}: sorry for the wait"
        await wait_until(lambda: bool(texts_with(telegram, "You got 7 credits")))
        for command, expected in (
            ("/paysupport", CREDITS["support_text"]),
            ("/terms", CREDITS["terms_text"]),
            ("/privacy", CREDITS["privacy_text"]),
        ):
            telegram.push_update(updates.command(command))
            await wait_until(lambda expected=expected: bool(texts_with(telegram, expected)))
        # Admin commands do not exist for anyone else: the unknown-command answer, no hint.
        telegram.push_update(updates.command(f"/grant {USER} 100"))
        await wait_until(lambda: bool(texts_with(telegram, "I don't know /grant")))
        telegram.push_update(updates.command("/refund stxWHATEVER"))
        await wait_until(lambda: bool(texts_with(telegram, "I don't know /refund")))
        assert balance(app) == 7
        assert telegram.calls_of("refundStarPayment") == []


async def test_a_lost_payment_is_credited_by_reconciliation(
    bot: Any, telegram: FakeTelegram
) -> None:
    """Payments whose successful_payment never reached the bot (it was down past Telegram's
    24 h) are credited at the next start from getStarTransactions, read page by page; a refund
    made outside the bot is recorded and reported at the same time."""
    settings = sections(credits=credits(reconcile_page_size=2))
    async with bot(**settings) as app:
        invoices = [await buy(telegram, "s") for _ in range(4)]
        lost = []
        for invoice in invoices:
            checkout = await telegram.pre_checkout(invoice)
            assert checkout.outcome == "approved"
            lost.append(telegram.complete_payment(checkout, deliver=False))
        _, kept = await telegram.pay(await buy(telegram, "s"))
        assert kept is not None
        await wait_until(lambda: balance(app) == 20)
    telegram.refund_elsewhere(kept.charge_id)
    telegram.push_refunded_payment = False

    async with bot(**settings) as app:
        await wait_until(lambda: len(purchases(app)) == 5)
        await wait_until(
            lambda: bool(db_rows(app, "SELECT 1 FROM credit_ledger WHERE kind = 'star_refund'"))
        )
        assert {r["charge_id"] for r in purchases(app)} >= {c.charge_id for c in lost}
        assert balance(app) == 4 * 20
        await wait_until(lambda: len(texts_with(telegram, "received")) == 5)
        offsets = [c.params.get("offset") for c in telegram.calls_of("getStarTransactions")]
        assert {0, 2, 4} <= set(offsets)
        # The cursor is saved after the pass has credited what it read: wait for that write.
        await wait_until(
            lambda: (
                [tuple(r) for r in db_rows(app, "SELECT next_offset FROM star_sync")]
                == [(len(telegram.star_transactions),)]
            )
        )
        await wait_until(
            lambda: (
                not db_rows(
                    app,
                    "SELECT charge_id FROM credit_ledger"
                    " WHERE kind = 'purchase' AND reconciled_at IS NULL",
                )
            )
        )


async def test_pre_checkout_is_answered_in_time_under_load(
    bot: Any, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With 100 jobs running and the outgoing limiter paused by flood waits, a pre-checkout
    is still answered within Telegram's 10 s and the payment is credited."""
    replicate.latency_s = 60.0
    settings = sections(
        generate={"daily_cap": 1000},
        limits={"rate_per_minute": 1000},
        runner={"max_running": 100},
    )
    async with bot(**settings) as app:
        invoice = await buy(telegram, "s")
        for n in range(100):
            chat = 10_000 + n
            telegram.push_update(updates.command(f"/generate {n}", chat_id=chat, user_id=chat))
        await wait_until(
            lambda: len(db_rows(app, "SELECT 1 FROM jobs WHERE status = 'running'")) == 100,
            within=40,
        )
        # Every chat-bound call now gets a 15 s flood wait (longer than the 10 s Telegram gives
        # a pre-checkout): the limiter pauses all of them.
        for method in ("sendMessage", "editMessageText", "sendChatAction", "deleteMessage"):
            telegram.fail_method(
                method, 429, "Too Many Requests: retry after 15", retry_after=15, times=1000
            )
        for _ in range(300):  # bounded: until the bot has met a flood wait
            if metric(await ops_text(app, "/metrics"), "imagebot_telegram_flood_waits_total"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no flood wait reached the bot")
        checkout = await telegram.pre_checkout(invoice)
        # (measured: answered after 0.02 s; the fake gives up after 10 s, as Telegram does)
        assert checkout.outcome == "approved", checkout
        telegram.complete_payment(checkout)
        await wait_until(lambda: balance(app) == 20)


async def test_webhook_mode_asks_for_pre_checkout_queries(
    bot: Any, telegram: FakeTelegram
) -> None:
    """In webhook mode setWebhook's allowed_updates include pre_checkout_query, and a payment
    goes through end to end."""
    async with behind_front_door(bot, **sections()) as (app, _):
        assert telegram.webhook is not None
        assert telegram.webhook.allowed_updates is not None
        assert "pre_checkout_query" in telegram.webhook.allowed_updates
        checkout, _ = await telegram.pay(await buy(telegram, "s"))
        assert checkout.outcome == "approved"
        await wait_until(lambda: balance(app) == 20)


async def test_credits_off_keeps_todays_behaviour(bot: Any, telegram: FakeTelegram) -> None:
    """Without [credits] a capped user is told the cap, /buy is an unknown command, and polling
    still asks for pre_checkout_query updates."""
    async with bot(generate={"daily_cap": 0}):
        telegram.push_update(updates.command("/generate a fox"))
        telegram.push_update(updates.command("/buy s"))
        await wait_until(lambda: bool(texts_with(telegram, "I don't know /buy")))
        assert texts_with(telegram, "switched off")
        assert telegram.invoices == []
        assert telegram.allowed_updates is not None
        assert "pre_checkout_query" in telegram.allowed_updates


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            '[credits]\nenabled = true\nsupport_text="s"\nterms_text="t"\nprivacy_text="p"\n',
            "credits.packs",
        ),
        (
            '[credits]\nenabled = true\nterms_text="t"\nprivacy_text="p"\n'
            '[[credits.packs]]\nid="s"\ncredits=1\nstars=1\ntitle="x"\n',
            "credits.support_text",
        ),
        (
            '[[credits.packs]]\nid="s"\ncredits=1\nstars=1\ntitle="x"\n'
            '[[credits.packs]]\nid="s"\ncredits=2\nstars=2\ntitle="y"\n',
            "credits.packs.1.id",
        ),
        ('[[credits.packs]]\nid="S!"\ncredits=1\nstars=1\ntitle="x"\n', "credits.packs.0.id"),
    ],
)
def test_bad_credits_config_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, key: str
) -> None:
    """Credits on without packs or texts, a duplicate or malformed pack id: start-up stops and
    names the key."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123456:TEST-token_abc")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_x")
    monkeypatch.setenv("FAL_KEY", "a:b")
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.key == key


async def test_a_canceled_paid_job_gives_its_credits_back(
    bot: Any, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/cancel on a paid job still at the provider: the job is canceled and its credit is back
    in the balance."""
    replicate.latency_s = 30.0
    async with bot(**sections()) as app:
        telegram.push_update(updates.command(f"/grant {USER} 3", chat_id=ADMIN, user_id=ADMIN))
        await wait_until(lambda: balance(app) == 3)
        telegram.push_update(updates.command("/generate a slow fox"))
        await wait_until(lambda: len(replicate.creates) == 1)
        assert balance(app) == 2
        telegram.push_update(updates.command("/cancel"))
        await wait_until(
            lambda: [r["status"] for r in db_rows(app, "SELECT status FROM jobs")] == ["canceled"]
        )
        await wait_until(lambda: balance(app) == 3)


def test_withheld_images_are_given_back(make_settings: Any) -> None:
    """A paid job that reserved for two images but delivered one keeps one image's price; a
    failed one keeps nothing."""
    from imagebot.credits import Credits
    from imagebot.metrics import Metrics
    from imagebot.models import Job, JobKind, JobStatus, Phase
    from imagebot.policy import Policy
    from imagebot.store.db import Database
    from imagebot.store.jobs import JobStore
    from imagebot.store.ledger import Ledger

    settings = make_settings(
        credits=credits(generate_cost=2), generate={"params": {"num_outputs": 2}}
    )
    db = Database(settings.storage.database)
    rules = Credits(settings, Ledger(db), Policy(settings), Metrics(), JobStore(db))
    assert rules.job_cost(JobKind.GENERATE) == 4
    job = Job(
        id=1,
        kind=JobKind.GENERATE,
        status=JobStatus.SUCCEEDED,
        phase=Phase.DONE,
        update_id=1,
        chat_id=CHAT,
        user_id=USER,
        chat_type="private",
        prompt="two foxes",
        provider="replicate",
        params={},
        created_at="2026-12-03T00:00:00.000Z",
        result_file_ids=["only-one"],
    )
    assert rules.due(job, 4)[0] == 2
    job.result_file_ids = ["a", "b"]
    assert rules.due(job, 4)[0] == 4
    job.status = JobStatus.FAILED
    assert rules.due(job, 4)[0] == 0
