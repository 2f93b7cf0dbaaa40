"""The /edit conversation and per-chat order when a chat's updates reach different processes
(issue 16): conversation state in the database, written with the inbox's processed mark in
one transaction; a chat's update waits for the chat's earlier one that another process runs.

Real daemons (tests/crash_harness.py) on one PostgreSQL database, updates POSTed to their
webhooks as a load balancer would; the kill -9 tests run on either store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telegram import Bot, Update

from imagebot import texts
from imagebot.intake import _chat_key
from imagebot.store.inbox import chat_key
from tests import updates
from tests.conftest import BOT_TOKEN, WEBHOOK_SECRET
from tests.crash_harness import WEBHOOK_PATH, Daemon, query, write
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.support import photo_upd

CHAT = updates.DEFAULT_CHAT_ID
FAST_LEASE = {"heartbeat_s": 0.3, "lease_s": 1.0}


def make_daemon(
    tmp_path: Path,
    name: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    database: str,
    **sections: Any,
) -> Daemon:
    """A daemon with its own directory (config, log, results) on the shared `database`."""
    home = tmp_path / name
    home.mkdir()
    return Daemon(home, telegram, replicate, fal, database=database, **sections)


async def post(daemon: Daemon, telegram: FakeTelegram, update: dict[str, Any]) -> None:
    """POST one update to this daemon's webhook, as Telegram (or a load balancer) would."""
    if "message" in update:
        telegram.note_user_message(update["message"])
    status, _ = await updates.post_webhook(
        f"{daemon.front_door.url}{WEBHOOK_PATH}", update, WEBHOOK_SECRET
    )
    assert status == 200


async def said(telegram: FakeTelegram, text: str, times: int = 1) -> None:
    await wait_until(lambda: telegram.texts(CHAT).count(text) >= times, within=10)


def processed(db: Any, update: dict[str, Any]) -> bool:
    rows = query(
        db, "SELECT processed_at FROM inbox WHERE update_id = ?", (int(update["update_id"]),)
    )
    return bool(rows) and rows[0]["processed_at"] is not None


def conversation_rows(db: Any) -> list[tuple[int, int, str, str, dict[str, Any]]]:
    rows = query(db, "SELECT chat_id, user_id, name, state, data FROM conversations")
    return [
        (
            r["chat_id"],
            r["user_id"],
            r["name"],
            r["state"],
            r["data"] if isinstance(r["data"], dict) else json.loads(r["data"]),
        )
        for r in rows
    ]


async def test_photo_on_one_process_instruction_on_another(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """/edit and its photo reach process A, the instruction reaches process B (one PostgreSQL):
    exactly one edit job, of that photo with that instruction, and fal is asked once."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    a = make_daemon(tmp_path, "a", telegram, replicate, fal, pg_url)
    b = make_daemon(tmp_path, "b", telegram, replicate, fal, pg_url)
    try:
        await a.start()
        await b.start()
        await post(a, telegram, updates.command("/edit"))
        await said(telegram, texts.EDIT_ASK_PHOTO)
        photo = photo_upd(file_id)
        await post(a, telegram, photo)
        await said(telegram, texts.EDIT_ASK_INSTRUCTION)
        await wait_until(lambda: processed(pg_url, photo), within=10)
        ((chat, _user, name, state, data),) = conversation_rows(pg_url)
        assert (chat, name, state, data["photo"]["file_id"]) == (
            CHAT,
            "edit",
            "instruction",
            file_id,
        )
        instruction = updates.text_message("make it a watercolor")
        await post(b, telegram, instruction)
        await a.wait_jobs(lambda rows: len(rows) == 1 and rows[0]["status"] == "succeeded")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
        (job,) = a.jobs()
    finally:
        await a.close()
        await b.close()
    assert (job["kind"], job["prompt"], job["input_file_id"]) == (
        "edit",
        "make it a watercolor",
        file_id,
    )
    assert job["update_id"] == instruction["update_id"]
    assert len(fal.submits) == 1
    assert fal.submits[0].params["prompt"] == "make it a watercolor"
    assert conversation_rows(pg_url) == []  # the conversation ended with its job
    assert texts.PRIVATE_TEXT_HINT not in "".join(telegram.texts(CHAT))  # not taken as chatter
    assert b.log_events("edit_conversation")  # B continued what A started


async def test_chat_order_holds_across_processes(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """While process A is still handling a chat's update (its answer held at Telegram), the
    chat's next update on process B waits and sends nothing; once A is done, B goes on, and
    the chat gets the answers in the order it asked."""
    a = make_daemon(tmp_path, "a", telegram, replicate, fal, pg_url)
    b = make_daemon(tmp_path, "b", telegram, replicate, fal, pg_url)
    try:
        await a.start()
        await b.start()
        telegram.hold_chat(CHAT)
        first = updates.command("/edit")
        await post(a, telegram, first)
        await wait_until(lambda: len(telegram.calls_of("sendMessage")) == 1, within=10)
        second = updates.command("/usage")
        await post(b, telegram, second)
        await wait_until(lambda: b.log_events("chat_order_waiting"), within=10)
        (waiting,) = b.log_events("chat_order_waiting")
        assert (waiting["update_id"], waiting["waiting_for"]) == (
            second["update_id"],
            first["update_id"],
        )
        assert len(telegram.calls_of("sendMessage")) == 1  # B has not answered
        assert not processed(pg_url, first) and not processed(pg_url, second)
        telegram.release_chat(CHAT)
        await wait_until(lambda: processed(pg_url, second), within=10)
        await wait_until(lambda: len(telegram.texts(CHAT)) == 2, within=10)
        (waited,) = b.log_events("chat_order_waited")
    finally:
        await a.close()
        await b.close()
    answers = telegram.texts(CHAT)
    assert answers[0] == texts.EDIT_ASK_PHOTO
    assert answers[1] != texts.EDIT_ASK_PHOTO
    assert waited["waited_for"] == first["update_id"]
    assert not b.log_events("chat_order_wait_gave_up")


async def test_chat_order_gives_up_on_an_update_nobody_runs(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """An earlier update of the chat left unprocessed by a process that is stuck (alive by its
    heartbeat, so nobody adopts the update) holds the chat's next update only for
    cluster.chat_order_wait_s; then it runs, and the operator sees chat_order_wait_gave_up
    naming both updates."""
    a = make_daemon(
        tmp_path, "a", telegram, replicate, fal, pg_url, cluster={"chat_order_wait_s": 1}
    )
    try:
        await a.start()
        orphan = updates.command("/help")
        payload = json.dumps(orphan)
        write(
            pg_url,
            [
                (
                    "INSERT INTO nodes (id, host, pid, roles, started_at, heartbeat_at)"
                    " VALUES ('stuck', 'elsewhere', 1, 'intake', '2026-01-01T00:00:00.000Z',"
                    " '2999-01-01T00:00:00.000Z')",
                    (),
                ),
                (
                    "INSERT INTO inbox (update_id, kind, received_at, payload, chat_key,"
                    " received_by) VALUES (?, 'message', '2026-01-01T00:00:00.000Z', ?, ?,"
                    " 'stuck')",
                    (orphan["update_id"], payload, CHAT),
                ),
            ],
        )
        later = updates.command("/edit")
        await post(a, telegram, later)
        await said(telegram, texts.EDIT_ASK_PHOTO)
        (gave_up,) = a.log_events("chat_order_wait_gave_up")
    finally:
        await a.close()
    assert (gave_up["update_id"], gave_up["waited_for"]) == (
        later["update_id"],
        orphan["update_id"],
    )
    assert gave_up["waited_s"] >= 1


async def test_an_earlier_update_adopted_after_a_later_one_goes_first(
    tmp_path: Path,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    pg_url: str,
) -> None:
    """A chat's update saved by a process that then dies reaches this process (adopted and
    replayed) after the chat's next update, which already waits for it: the waiting one
    steps aside, the earlier runs first, then the later; no wait for chat_order_wait_s."""
    a = make_daemon(tmp_path, "a", telegram, replicate, fal, pg_url, cluster=FAST_LEASE)
    try:
        await a.start()
        earlier = updates.command("/help")
        alive_until = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        write(
            pg_url,
            [
                (  # a process that saved the update and is about to go silent (dead 1 s on)
                    "INSERT INTO nodes (id, host, pid, roles, started_at, heartbeat_at)"
                    " VALUES ('gone', 'elsewhere', 1, 'intake', ?, ?)",
                    (alive_until, alive_until),
                ),
                (
                    "INSERT INTO inbox (update_id, kind, received_at, payload, chat_key,"
                    " received_by) VALUES (?, 'message', ?, ?, ?, 'gone')",
                    (earlier["update_id"], alive_until, json.dumps(earlier), CHAT),
                ),
            ],
        )
        later = updates.command("/edit")
        await post(a, telegram, later)
        await said(telegram, texts.EDIT_ASK_PHOTO)
        # the conversation's state and the update's close are committed just after the
        # question is sent: wait for them (bounded) before stopping the process
        await wait_until(lambda: processed(pg_url, later), within=10)
        texts_in_order = telegram.texts(CHAT)
        stepped = a.log_events("chat_order_stepped_aside")
        gave_up = a.log_events("chat_order_wait_gave_up")
    finally:
        await a.close()
    asked = texts_in_order.index(texts.EDIT_ASK_PHOTO)
    assert asked > 0 and all(t != texts.EDIT_ASK_PHOTO for t in texts_in_order[:asked])
    assert [(e["update_id"], e["waiting_for"]) for e in stepped] == [
        (later["update_id"], earlier["update_id"])
    ]
    assert gave_up == []
    assert processed(pg_url, earlier) and processed(pg_url, later)


async def test_kill_9_after_the_photo_keeps_the_conversation(
    daemon: Any, telegram: FakeTelegram, fal: FakeFal, store_target: str
) -> None:
    """kill -9 right after the photo was taken: its inbox row is processed and the conversation
    waits for the instruction in the same commit; after the restart the instruction makes the
    edit of that photo (and the photo is not asked for again)."""
    file_id = telegram.add_file(make_image(64, 48))
    bot = daemon()
    await bot.start()
    await post(bot, telegram, updates.command("/edit"))
    await said(telegram, texts.EDIT_ASK_PHOTO)
    photo = photo_upd(file_id)
    await post(bot, telegram, photo)
    await said(telegram, texts.EDIT_ASK_INSTRUCTION)
    await wait_until(lambda: processed(bot.db_path, photo), within=10)
    await bot.kill()
    ((_, _, _, state, data),) = conversation_rows(bot.db_path)
    assert (state, data["photo"]["file_id"]) == ("instruction", file_id)
    await bot.start()
    await post(bot, telegram, updates.text_message("make it red"))
    await bot.wait_jobs(lambda rows: len(rows) == 1 and rows[0]["status"] == "succeeded")
    (job,) = bot.jobs()
    assert (job["prompt"], job["input_file_id"]) == ("make it red", file_id)
    assert telegram.texts(CHAT).count(texts.EDIT_ASK_INSTRUCTION) == 1
    assert len(fal.submits) == 1
    assert conversation_rows(bot.db_path) == []


async def test_kill_9_while_the_photo_is_handled_replays_it(
    daemon: Any, telegram: FakeTelegram, fal: FakeFal, store_target: str
) -> None:
    """kill -9 while the photo's handler is still at work (its question held at Telegram):
    neither the conversation nor the inbox moved on, so the restart replays the photo, asks
    for the instruction, and the instruction makes one edit of that photo."""
    file_id = telegram.add_file(make_image(64, 48))
    # on PostgreSQL the restart is a new node: the killed one's updates are replayed once
    # its lease lapses (short here)
    bot = daemon(cluster=FAST_LEASE)
    await bot.start()
    await post(bot, telegram, updates.command("/edit"))
    await said(telegram, texts.EDIT_ASK_PHOTO)
    telegram.hold_chat(CHAT)
    photo = photo_upd(file_id)
    await post(bot, telegram, photo)
    await wait_until(lambda: len(telegram.calls_of("sendMessage")) == 2, within=10)
    await bot.kill()
    telegram.release_chat(CHAT)
    assert not processed(bot.db_path, photo)
    ((_, _, _, state, _),) = conversation_rows(bot.db_path)
    assert state == "photo"  # still waiting for the photo: the handler's write never came
    await bot.start()
    await wait_until(lambda: processed(bot.db_path, photo), within=10)
    ((_, _, _, state, _),) = conversation_rows(bot.db_path)
    assert state == "instruction"
    await post(bot, telegram, updates.text_message("make it green"))
    await bot.wait_jobs(lambda rows: len(rows) == 1 and rows[0]["status"] == "succeeded")
    (job,) = bot.jobs()
    assert (job["prompt"], job["input_file_id"]) == ("make it green", file_id)
    assert len(fal.submits) == 1


def test_saved_chat_key_is_the_processors() -> None:
    """The chat key saved with each inbox row is the one the processor orders by, for every
    kind of update the bot takes (and None where there is no chat)."""
    bot = Bot(BOT_TOKEN)
    samples = [
        updates.command("/edit"),
        updates.text_message("hi", chat_id=-100_5),
        photo_upd("f"),
        updates.callback_query(
            "e:1:0",
            message={"message_id": 9, "date": 0, "chat": {"id": -100_7, "type": "group"}},
        ),
        updates.pre_checkout_query(query_id="q", total_amount=5, invoice_payload="p"),
        {"update_id": 5, "edited_message": updates.text_message("x")["message"]},
        {"update_id": 6, "message": {"chat": {"id": "not-a-number"}}},
    ]
    for payload in samples:
        parsed = Update.de_json(payload, bot) if payload["update_id"] != 6 else None
        expected = _chat_key(parsed) if parsed is not None else None
        assert chat_key(payload) == expected, payload
    assert chat_key(updates.command("/edit")) == CHAT


async def test_timeout_left_by_a_killed_process_is_still_told(
    daemon: Any, telegram: FakeTelegram, fal: FakeFal, store_target: str
) -> None:
    """A conversation whose process was killed (its timer gone with it) still times out: after
    the restart the periodic pass tells the user once, and the next text is no instruction."""
    bot = daemon(edit={"conversation_timeout_s": 1})
    await bot.start()
    await post(bot, telegram, updates.command("/edit"))
    await said(telegram, texts.EDIT_ASK_PHOTO)
    await wait_until(lambda: len(conversation_rows(bot.db_path)) == 1, within=10)
    await bot.kill()
    await bot.start()
    await said(telegram, texts.EDIT_TIMED_OUT)
    assert conversation_rows(bot.db_path) == []
    later = updates.text_message("make it blue")
    await post(bot, telegram, later)
    await wait_until(lambda: processed(bot.db_path, later), within=10)
    assert bot.jobs() == []
    assert telegram.texts(CHAT).count(texts.EDIT_TIMED_OUT) == 1
    (notice,) = [m for m in telegram.messages(CHAT) if m.text == texts.EDIT_TIMED_OUT]
    assert notice.reply_to_message_id is not None  # it quotes the /edit, as before
