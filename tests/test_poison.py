"""Poison input never stops the bot: bodies PTB cannot parse, handlers that raise, and webhook
bodies Telegram would never send, live and across a restart on the same database."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from typing import Any

from imagebot.clock import iso
from tests import updates
from tests.conftest import WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import execute, is_pg
from tests.support import db_path, rows, scrape, value, webhook_url

CHAT = updates.DEFAULT_CHAT_ID
SECRET = WEBHOOK_SECRET.encode()


def unparseable_updates() -> list[dict[str, Any]]:
    """Bodies that pass the webhook's checks but that PTB 22's Update.de_json rejects (found by
    running de_json on each: wrong types or missing required fields inside the update)."""

    def broken(**fields: Any) -> dict[str, Any]:
        update = updates.command("/help")
        update["message"].update(fields)
        return update

    no_type = updates.command("/help")
    del no_type["message"]["chat"]["type"]
    return [
        broken(chat="not a chat"),  # TypeError: Chat() argument after ** must be a mapping
        broken(date="yesterday"),  # TypeError: 'str' object cannot be interpreted as an integer
        broken(date=10**15),  # ValueError: year 31690708 is out of range
        broken(photo=[1, 2]),  # TypeError: PhotoSize() argument after ** must be a mapping
        broken(entities=["x"]),  # AttributeError: 'str' object has no attribute 'copy'
        broken(**{"from": "bob"}),  # TypeError: User() argument after ** must be a mapping
        no_type,  # TypeError: missing 1 required positional argument: 'type'
        {"update_id": updates.next_update_id(), "message": "hello"},  # AttributeError
        {"update_id": updates.next_update_id(), "message": [1, 2]},  # TypeError
        {"update_id": updates.next_update_id(), "callback_query": {}},  # missing id, ...
    ]


def handler_raising_update(chat_id: int = CHAT) -> dict[str, Any]:
    """Parses, but the command handlers raise on it: its text is a number under a bot_command
    entity, and PTB slices the text to find the command (TypeError in check_update)."""
    update = updates.command("/generate boom", chat_id=chat_id, user_id=chat_id)
    update["message"]["text"] = 12345
    return update


def insert_unprocessed(path: str, bodies: list[tuple[int, str]]) -> None:
    """Save updates in the inbox as a run that died before handling them would have left them."""
    for update_id, body in bodies:
        execute(
            path,
            "INSERT INTO inbox (update_id, kind, received_at, payload)"
            " VALUES (?, 'message', ?, ?)",
            (update_id, iso(), body),
        )


def inbox(path: str) -> dict[int, Any]:
    return {row["update_id"]: row for row in rows(path, "SELECT * FROM inbox")}


async def test_poison_saved_before_a_restart_is_closed_and_start_up_goes_on(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Unparseable bodies, a stored body that is not JSON and an update whose handler raises,
    all saved but unprocessed, neither stop start-up nor the replay of a good /generate saved
    with them: each is closed with its reason (in the store), counted and the bot serves on."""
    async with bot() as app:
        pass  # a first run creates and migrates the database
    path = db_path(app)
    bad = unparseable_updates()
    raising = handler_raising_update()
    good = updates.command("/generate saved fox")
    corrupt_id = updates.next_update_id()
    # A stored body that is not JSON at all: SQLite's text column can hold one; PostgreSQL's
    # jsonb column refuses it at the INSERT, so there it cannot happen.
    corrupt = [] if is_pg(path) else [(corrupt_id, "{not json")]
    insert_unprocessed(
        path, [(u["update_id"], json.dumps(u)) for u in [*bad, raising, good]] + corrupt
    )

    async with bot() as app:
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(lambda: all(r["processed_at"] for r in inbox(path).values()))
        telegram.push_update(updates.command("/generate after restart"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        samples = await scrape(app)

    saved = inbox(path)
    for update in bad:
        assert saved[update["update_id"]]["failure"].startswith("unparseable: "), update
    if corrupt:
        assert saved[corrupt_id]["failure"].startswith("unparseable: ValueError")
    assert saved[raising["update_id"]]["failure"].startswith("handler_error: TypeError")
    assert saved[good["update_id"]]["failure"] is None
    assert [p.caption for p in telegram.photos(CHAT)] == ["saved fox", "after restart"]
    assert value(samples, "imagebot_updates_poisoned_total", reason="unparseable") == len(
        bad
    ) + len(corrupt)
    assert value(samples, "imagebot_updates_poisoned_total", reason="handler_error") == 1
    # The raising update got the generic apology, not silence and not a job.
    assert [r["prompt"] for r in rows(path)] == ["saved fox", "after restart"]


async def test_poison_arriving_live_is_closed_and_other_updates_go_on(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """On the webhook, unparseable bodies and a handler that raises are acknowledged (saved:
    Telegram must not resend them), closed with their reason, and a /generate sent after them
    in the same chat still ends as a photo."""
    async with bot(telegram={"mode": "webhook"}) as app:
        url = webhook_url(app)
        bad = unparseable_updates()
        raising = handler_raising_update()
        statuses = [
            (await updates.post_webhook(url, body, WEBHOOK_SECRET))[0] for body in [*bad, raising]
        ]
        good = updates.command("/generate still here")
        assert (await updates.post_webhook(url, good, WEBHOOK_SECRET))[0] == 200
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        path = db_path(app)
        await wait_until(lambda: all(r["processed_at"] for r in inbox(path).values()))
        samples = await scrape(app)
    assert statuses == [200] * (len(bad) + 1)
    saved = inbox(path)
    assert [saved[u["update_id"]]["failure"].split(":")[0] for u in bad] == ["unparseable"] * len(
        bad
    )
    assert saved[raising["update_id"]]["failure"].startswith("handler_error: TypeError")
    assert saved[good["update_id"]]["failure"] is None
    assert value(samples, "imagebot_updates_poisoned_total", reason="unparseable") == len(bad)
    assert telegram.photos(CHAT)[0].caption == "still here"


def nasty_bodies() -> list[tuple[str, bytes, int]]:
    """(name, body, expected status) for bodies Telegram would never send."""
    valid = updates.command("/help")
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = {"update_id": updates.next_update_id(), "message": {}}
    inner: dict[str, Any] = deep_object["message"]
    for _ in range(200):
        inner["x"] = {}
        inner = inner["x"]

    def with_id(update_id: Any) -> bytes:
        return json.dumps({**valid, "update_id": update_id}).encode()

    return [
        ("empty", b"", 400),
        ("not json", b"hello", 400),
        ("truncated", json.dumps(valid).encode()[:-3], 400),
        ("array", b"[1, 2, 3]", 400),
        ("string", b'"update"', 400),
        ("null", b"null", 400),
        ("no update_id", json.dumps({"message": valid["message"]}).encode(), 400),
        ("update_id true", with_id(True), 400),
        ("update_id false", with_id(False), 400),
        ("update_id string", with_id("12"), 400),
        ("update_id float", with_id(12.0), 400),
        ("update_id 2**63", with_id(2**63), 400),
        ("update_id -2**63-1", with_id(-(2**63) - 1), 400),
        ("update_id 5000 digits", b'{"update_id": ' + b"9" * 5000 + b"}", 400),
        ("NaN inside", b'{"update_id": 5, "message": {"date": NaN}}', 400),
        ("huge int inside", b'{"update_id": 5, "message": {"date": ' + b"9" * 30 + b"}}", 400),
        ("deep array", deep, 400),
        ("deep object", json.dumps(deep_object).encode(), 400),
        ("invalid utf-8", b'{"update_id": 5, "message": {"text": "\xff\xfe"}}', 400),
        ("lone surrogate", b'{"update_id": 5, "message": {"text": "\\ud800"}}', 400),
        ("lone surrogate key", b'{"update_id": 5, "\\udc00": 1}', 400),
        ("utf-16", json.dumps(valid).encode("utf-16"), 400),
        ("huge", b'{"update_id": 5, "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}', 413),
    ]


def _mutate(value: Any, rng: random.Random, pool: list[Any]) -> Any:
    """One random change somewhere inside `value`: replace, delete or add a field."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.2:
            del value[key]
        elif roll < 0.3:
            value[rng.choice(["zz", "message", "chat", "from", "photo", "date"])] = rng.choice(
                pool
            )
        elif roll < 0.6:
            value[key] = copy.deepcopy(rng.choice(pool))
        else:
            value[key] = _mutate(value[key], rng, pool)
        return value
    if isinstance(value, list) and value and rng.random() < 0.7:
        index = rng.randrange(len(value))
        value[index] = _mutate(value[index], rng, pool)
        return value
    return copy.deepcopy(rng.choice(pool))


def fuzz_corpus(seed: int, count: int) -> list[bytes]:
    """`count` bodies from valid updates of every kind the bot handles, mutated structurally
    (1-3 random changes at any depth) or bytewise (cut, flipped, spliced), with a fixed seed."""
    rng = random.Random(seed)
    pool: list[Any] = [
        None, True, False, 0, -1, 1.5, 2**53, 2**63, -(2**63) - 1, "", "x", "/generate",
        "\u202e", "\ud800", "🦊" * 50, [], {}, [1], [{}], {"id": "x"}, {"id": 5},
        {"id": 5, "type": "private"}, [[[[[]]]]], "a" * 5000,
    ]  # fmt: skip
    bases: list[dict[str, Any]] = [
        updates.command("/help"),
        updates.command("/start"),
        updates.command("/usage"),
        updates.command("/cancel"),
        updates.command("/nope"),
        updates.text_message("hello there"),
        updates.photo_message("fuzz-photo"),
        updates.document_message("fuzz-doc", caption="just a file"),
        updates.sticker_message(),
        updates.command("/help@imagebot_test_bot", chat_id=-100_555, user_id=77),
        updates.callback_query(
            "a:999999",
            message={
                "message_id": 1,
                "date": 1,
                "chat": updates.chat(),
                "from": updates.user(123456, "imagebot_test_bot"),
                "text": "old",
            },
        ),
    ]
    corpus: list[bytes] = []
    for _ in range(count):
        update = copy.deepcopy(rng.choice(bases))
        update["update_id"] = updates.next_update_id()
        if rng.random() < 0.75:
            for _ in range(rng.randint(1, 3)):
                key = rng.choice([k for k in update if k != "update_id"] or ["update_id"])
                if rng.random() < 0.05:
                    key = "update_id"
                update[key] = _mutate(update[key], rng, pool)
            corpus.append(json.dumps(update).encode())
            continue
        raw = bytearray(json.dumps(update).encode())
        roll = rng.random()
        if roll < 0.3:
            del raw[rng.randrange(len(raw)) :]
        elif roll < 0.6:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        else:
            at = rng.randrange(len(raw))
            raw[at:at] = rng.choice([b"{", b"]", b'"', b"\\u", b"\xc3", b"\x00", b",,", b"null"])
        corpus.append(bytes(raw))
    return corpus


async def test_webhook_answers_4xx_to_bodies_telegram_never_sends(
    bot, telegram: FakeTelegram
) -> None:
    """Not JSON, not an object, a missing or boolean or out-of-range update_id, absurd nesting,
    invalid UTF-8, lone surrogates, a huge body: 400 (413 for the size), never 5xx, nothing
    saved; a secret header that is not UTF-8 or is wrong is 403."""
    async with bot(telegram={"mode": "webhook"}) as app:
        url = webhook_url(app)
        got = {
            name: await updates.post_webhook_raw(url, body, SECRET)
            for name, body, _ in nasty_bodies()
        }
        valid = json.dumps(updates.command("/help")).encode()
        forbidden = [
            await updates.post_webhook_raw(url, valid, secret)
            for secret in (None, b"", b"wrong", b"\xff\xfe" + SECRET, SECRET + b"\xc3")
        ]
        samples = await scrape(app)
        saved = rows(db_path(app), "SELECT update_id FROM inbox")
    assert got == {name: status for name, _, status in nasty_bodies()}
    assert forbidden == [403] * 5
    assert saved == []
    assert value(samples, "imagebot_webhook_rejected_total", reason="bad_update_id") == 7


async def test_webhook_fuzz_never_5xx_and_a_restart_closes_saved_poison(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A seeded corpus of mutated updates and the named nasty bodies POSTed to the real webhook
    get no 5xx; /generate still works; every saved update gets closed; and a restart on the same
    database with poison saved but unprocessed starts, closes it with a reason and serves."""
    corpus = fuzz_corpus(seed=13, count=400) + [body for _, body, _ in nasty_bodies()]
    statuses: Counter[int] = Counter()
    async with bot(telegram={"mode": "webhook"}) as app:
        url = webhook_url(app)
        for body in corpus:
            statuses[await updates.post_webhook_raw(url, body, SECRET)] += 1
        good = updates.command("/generate after the fuzz")
        assert (await updates.post_webhook(url, good, WEBHOOK_SECRET))[0] == 200
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=30)
        path = db_path(app)
        await wait_until(lambda: all(r["processed_at"] for r in inbox(path).values()), within=30)
        fuzz_saved = inbox(path)
    print(f"fuzz: {len(corpus)} bodies, statuses {dict(sorted(statuses.items()))}")  # noqa: T201
    print(  # noqa: T201
        "fuzz: saved", len(fuzz_saved), "closed with a failure",
        Counter((r["failure"] or "handled").split(":")[0] for r in fuzz_saved.values()),
    )  # fmt: skip
    assert not [s for s in statuses if s >= 500 or s == 0]
    assert statuses[200] > 0 and statuses[400] > 0

    raising = handler_raising_update()
    bad = unparseable_updates()
    insert_unprocessed(path, [(u["update_id"], json.dumps(u)) for u in [*bad, raising]])
    async with bot(telegram={"mode": "webhook"}) as app:
        await wait_until(lambda: all(r["processed_at"] for r in inbox(path).values()))
        later = updates.command("/generate after the restart")
        assert (await updates.post_webhook(webhook_url(app), later, WEBHOOK_SECRET))[0] == 200
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
    saved = inbox(path)
    assert all(saved[u["update_id"]]["failure"].startswith("unparseable") for u in bad)
    assert saved[raising["update_id"]]["failure"].startswith("handler_error")
    assert telegram.photos(CHAT)[1].caption == "after the restart"


async def test_an_unparseable_update_does_not_stall_polling(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """getUpdates returning a body PTB rejects (which fails PTB's whole batch) does not stall
    polling: the batch is taken raw, the bad update is saved and closed with its reason, the
    good one in the same batch and a later /generate are served."""
    async with bot() as app:
        bad = updates.command("/help")
        bad["message"]["date"] = "yesterday"
        good = updates.command("/generate same batch")
        telegram.push_update(bad)
        telegram.push_update(good)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(updates.command("/generate next batch"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        path = db_path(app)
        await wait_until(lambda: all(r["processed_at"] for r in inbox(path).values()))
    saved = inbox(path)
    assert saved[bad["update_id"]]["failure"].startswith("unparseable: TypeError")
    assert saved[good["update_id"]]["failure"] is None
    assert [p.caption for p in telegram.photos(CHAT)] == ["same batch", "next batch"]
    assert telegram.confirmed_update_ids >= {bad["update_id"], good["update_id"]}
