"""Forged and malformed button presses through the real bot: nobody acts on another user's job,
no file leaves its job's chat, garbage data is answered and logged, and nothing else happens.

Telegram passes on whatever callback data a client sends, so every press here is one a modified
client could make. Users: ALICE (the requester), BOB (a stranger), ADMIN (in access.admins).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import pytest

from imagebot import texts
from imagebot.bot.callbacks import Button, ButtonData, parse_button_data
from imagebot.delivery import cancel_keyboard, result_keyboard, upscaled_keyboard
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.support import answer_text, db_path, rows

ALICE, BOB, ADMIN = 11, 22, 99
GROUP = -100_700
EXPIRED = texts.BUTTON_EXPIRED
NOT_YOURS = texts.NOT_YOUR_JOB
OTHER_CHAT = texts.BUTTON_OTHER_CHAT
QUIET_CALLS = {"getUpdates", "answerCallbackQuery"}  # what a refused press may cause

MALFORMED = [
    "",
    "a",
    "a:",
    ":1",
    "a:abc",
    "a:-1",
    "a:0",
    "a:01",
    "a:+1",
    "a:1.5",
    "a: 1",
    "a:1 ",
    "a:1\n",
    "A:1",
    "q:1",
    "pay:1",
    "a:9223372036854775808",  # 2**63: over SQLite's INTEGER
    "a:" + "9" * 30,
    "x:" + "1" * 62,  # 64 bytes of digits
    "a:1" + " " * 70,  # over Telegram's 64 bytes
    "a:٣",  # Arabic-Indic digit three: int() would take it
    "a:\uff11",  # fullwidth digit one
    "a:²",
    "é:1",
    "a:1🔥",
    "e:1",  # Edit this names an image
    "e:1:*",  # ...exactly one
    "e:1:-1",
    "e:1:100",
    "e:1:05",
    "o:1",
    "o:1:0:0",
    "x:1:0",
    "a:1:0",
    "a:1;x:1",
]


@dataclass
class Scene:
    """Alice's finished jobs (one in the group, one in her private chat) and quiet messages
    (no keyboard) in each chat to press on."""

    group_job: int
    private_job: int
    group_result: SentMessage
    quiet: dict[int, SentMessage]  # chat id -> a bot message without buttons


def payload(sent: SentMessage) -> dict[str, Any]:
    return updates.bot_message_dict(sent)


def press(telegram: FakeTelegram, on: SentMessage, data: str, user_id: int) -> dict[str, Any]:
    update = updates.callback_query(data, message=payload(on), user_id=user_id)
    telegram.push_update(update)
    return update


def processed(app: Any, sent: list[dict[str, Any]]) -> bool:
    """Every one of these updates went through the handlers (its inbox row is processed)."""
    done = {r["update_id"] for r in rows(db_path(app), "SELECT * FROM inbox") if r["processed_at"]}
    return all(u["update_id"] in done for u in sent)


def job_data(kind: Button, job_id: int) -> str:
    index = 0 if kind in (Button.EDIT, Button.ORIGINAL, Button.UPSCALE) else None
    name = "square" if kind is Button.SHAPE else None  # the shape buttons name a shape
    return ButtonData(kind, job_id, index, name=name).encode()


def footprint(telegram: FakeTelegram) -> list[tuple[int, int, int, bool]]:
    """Every message the bot sent, with its edit count and deletion: any change shows here."""
    return [
        (m.chat_id, m.message_id, len(m.edits), m.deleted)
        for m in telegram.all_sent(include_deleted=True)
    ]


async def quiet_message(telegram: FakeTelegram, chat_id: int, user_id: int) -> SentMessage:
    """A bot message without buttons in the chat (the answer to /usage)."""
    before = len(telegram.texts(chat_id))
    telegram.push_update(updates.command("/usage", chat_id=chat_id, user_id=user_id))
    await wait_until(lambda: len(telegram.texts(chat_id)) > before)
    return telegram.messages(chat_id)[-1]


async def set_scene(app: Any, telegram: FakeTelegram) -> Scene:
    telegram.push_update(updates.command("/generate group fox", chat_id=GROUP, user_id=ALICE))
    await wait_until(lambda: len(telegram.photos(GROUP)) == 1)
    telegram.push_update(updates.command("/generate own fox", chat_id=ALICE, user_id=ALICE))
    await wait_until(lambda: len(telegram.photos(ALICE)) == 1)
    await wait_until(lambda: all(r["status"] == "succeeded" for r in rows(db_path(app))))
    jobs = {r["chat_id"]: r["id"] for r in rows(db_path(app))}
    quiet = {
        GROUP: await quiet_message(telegram, GROUP, BOB),
        ALICE: await quiet_message(telegram, ALICE, ALICE),
        BOB: await quiet_message(telegram, BOB, BOB),
        ADMIN: await quiet_message(telegram, ADMIN, ADMIN),
    }
    return Scene(jobs[GROUP], jobs[ALICE], telegram.photos(GROUP)[0], quiet)


def log_lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]


def refusals(log: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in log_lines(log) if line.get("event") == "button_refused"]


SETTINGS: dict[str, Any] = {
    "telegram": {"groups_require_mention": False},
    "access": {"open": True, "admins": [ADMIN]},
}


async def test_forged_presses_change_nothing(
    bot,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    log_output: io.StringIO,
) -> None:
    """Every button kind, pressed by a stranger (group and private), from another chat (by the
    requester and by an admin), on a job that does not exist, or with data not on the pressed
    message: each press gets a short answer and a log line, and nothing is sent, edited, made,
    charged or asked of a vendor."""
    async with bot(**SETTINGS) as app:
        scene = await set_scene(app, telegram)
        quiet = scene.quiet
        before = (footprint(telegram), len(replicate.calls), len(fal.calls), len(telegram.calls))
        jobs_before = rows(db_path(app))
        cases: list[tuple[str, dict[str, Any], str]] = []
        for kind in Button:
            group_job, private_job = scene.group_job, scene.private_job
            forged = {
                "stranger in the group": (quiet[GROUP], job_data(kind, group_job), BOB),
                "stranger naming a private job": (quiet[BOB], job_data(kind, private_job), BOB),
                "requester in another chat": (quiet[ALICE], job_data(kind, group_job), ALICE),
                "admin in another chat": (quiet[ADMIN], job_data(kind, private_job), ADMIN),
                "no such job": (quiet[ALICE], job_data(kind, 424_242), ALICE),
                "not on the message": (scene.group_result, job_data(kind, private_job), ALICE),
            }
            for name, (message, data, user) in forged.items():
                cases.append((f"{kind.name} {name}", press(telegram, message, data, user), data))
        await wait_until(lambda: processed(app, [u for _, u, _ in cases]), within=15)
        after = (footprint(telegram), len(replicate.calls), len(fal.calls))
        new_calls = {c.op for c in telegram.calls[before[3] :]}
        jobs_after = rows(db_path(app))

    expected = {
        "stranger in the group": NOT_YOURS,
        "stranger naming a private job": NOT_YOURS,
        "requester in another chat": OTHER_CHAT,
        "admin in another chat": OTHER_CHAT,
        "no such job": EXPIRED,
        "not on the message": EXPIRED,
    }
    seen = {name: answer_text(telegram, update) for name, update, _ in cases}
    for name, text in seen.items():
        assert text == expected[name.split(" ", 1)[1]], name
    assert len(cases) == 6 * len(Button)  # every button kind, the new ones (issue 17) too
    assert after == before[:3]  # no message sent, edited or deleted; no vendor call
    assert new_calls <= QUIET_CALLS, new_calls
    assert [dict(r) for r in jobs_after] == [dict(r) for r in jobs_before]  # no job, no quota
    assert telegram.documents(GROUP) == telegram.documents(ALICE) == []
    assert telegram.documents(BOB) == telegram.documents(ADMIN) == []
    logged = refusals(log_output)
    assert len(logged) == len(cases)
    reasons = sorted({line["reason"] for line in logged})
    assert reasons == ["no_job", "not_on_message", "not_owner", "other_chat"]


async def test_malformed_data_is_answered_and_logged(
    bot,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    fal: FakeFal,
    log_output: io.StringIO,
) -> None:
    """Malformed callback data (no colon, signs, huge and non-ASCII numbers, unknown prefixes,
    over 64 bytes, a wrong shape for the button) gets "This button has expired." and an operator
    log line, crashes nothing, and the bot still works afterwards."""
    async with bot(**SETTINGS) as app:
        scene = await set_scene(app, telegram)
        before = (footprint(telegram), len(replicate.calls), len(fal.calls), len(telegram.calls))
        sent = [press(telegram, scene.quiet[ALICE], data, ALICE) for data in MALFORMED]
        await wait_until(lambda: processed(app, sent), within=15)
        after = (footprint(telegram), len(replicate.calls), len(fal.calls))
        new_calls = {c.op for c in telegram.calls[before[3] :]}
        # still alive: a real press by the requester works
        document = press(telegram, scene.group_result, f"o:{scene.group_job}:0", ALICE)
        await wait_until(lambda: len(telegram.documents(GROUP)) == 1)
    assert [answer_text(telegram, u) for u in sent] == [EXPIRED] * len(MALFORMED)
    assert after == before[:3]
    assert new_calls <= QUIET_CALLS, new_calls
    logged = refusals(log_output)
    assert [line["reason"] for line in logged] == ["malformed"] * len(MALFORMED)
    assert all(line["user_id"] == ALICE for line in logged)
    assert answer_text(telegram, document) == texts.ORIGINAL_SENDING
    assert "Traceback" not in log_output.getvalue()
    errors = [line for line in log_lines(log_output) if line.get("level") in ("error", "critical")]
    assert errors == []


async def test_requester_and_admin_still_can(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """In the group the requester gets 📎 Original; an admin may use 🔁 Again, ✏️ Edit this and
    📎 Original on her job there; every file goes to the job's own chat."""
    async with bot(**SETTINGS) as app:
        scene = await set_scene(app, telegram)
        result, job = scene.group_result, scene.group_job
        mine = press(telegram, result, f"o:{job}:0", ALICE)
        await wait_until(lambda: len(telegram.documents(GROUP)) == 1)
        admin_original = press(telegram, result, f"o:{job}:0", ADMIN)
        await wait_until(lambda: len(telegram.documents(GROUP)) == 2)
        admin_again = press(telegram, result, f"a:{job}", ADMIN)
        await wait_until(lambda: len(telegram.photos(GROUP)) == 2)
        admin_edit = press(telegram, result, f"e:{job}:0", ADMIN)
        await wait_until(lambda: texts.EDIT_ASK_INSTRUCTION in telegram.texts(GROUP))
        telegram.push_update(updates.text_message("make it blue", chat_id=GROUP, user_id=ADMIN))
        await wait_until(lambda: len(telegram.photos(GROUP)) == 3)
        jobs = rows(db_path(app))
    assert answer_text(telegram, mine) == texts.ORIGINAL_SENDING
    assert answer_text(telegram, admin_original) == texts.ORIGINAL_SENDING
    assert answer_text(telegram, admin_again) == ""
    assert answer_text(telegram, admin_edit) == ""
    assert [(r["chat_id"], r["user_id"], r["kind"]) for r in jobs[2:]] == [
        (GROUP, ADMIN, "generate"),
        (GROUP, ADMIN, "edit"),
    ]
    assert len(fal.submits) == 1
    assert telegram.documents(ALICE) == telegram.documents(ADMIN) == []


async def test_cancel_button_by_stranger_other_chat_and_admin(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """✖ on Alice's running group job: a stranger and Alice from her private chat are refused
    and the job keeps running; an admin in the group cancels it."""
    replicate.latency_s = 20
    async with bot(**SETTINGS) as app:
        telegram.push_update(updates.command("/generate slow", chat_id=GROUP, user_id=ALICE))
        await wait_until(lambda: len(replicate.predictions) == 1)
        status = next(m for m in telegram.messages(GROUP) if m.kind == "text")
        quiet = await quiet_message(telegram, ALICE, ALICE)
        stranger = press(telegram, status, "x:1", BOB)
        elsewhere = press(telegram, quiet, "x:1", ALICE)
        await wait_until(lambda: processed(app, [stranger, elsewhere]))
        assert rows(db_path(app))[0]["status"] == "running"
        assert replicate.cancels == []
        admin = press(telegram, status, "x:1", ADMIN)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "canceled")
    assert answer_text(telegram, stranger) == NOT_YOURS
    assert answer_text(telegram, elsewhere) == OTHER_CHAT
    assert answer_text(telegram, admin) == texts.CANCELED_SHORT
    assert len(replicate.cancels) == 1


async def test_refused_edit_press_leaves_a_pending_edit_alone(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A refused ✏️ press while Alice is in the middle of /edit neither ends nor restarts her
    conversation: the photo she sends next is edited with the instruction she gave first."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot(**SETTINGS) as app:
        quiet = await quiet_message(telegram, ALICE, ALICE)
        telegram.push_update(updates.command("/edit make it blue", chat_id=ALICE, user_id=ALICE))
        await wait_until(lambda: texts.EDIT_ASK_PHOTO in telegram.texts(ALICE))
        forged = press(telegram, quiet, "e:77:0", ALICE)
        await wait_until(lambda: processed(app, [forged]))
        telegram.push_update(updates.photo_message(file_id, chat_id=ALICE, user_id=ALICE))
        await wait_until(lambda: len(telegram.photos(ALICE)) == 1)
        jobs = rows(db_path(app))
    assert answer_text(telegram, forged) == EXPIRED
    assert [(r["kind"], r["prompt"]) for r in jobs] == [("edit", "make it blue")]
    assert fal.submits[0].params["prompt"] == "make it blue"
    assert texts.EDIT_TIMED_OUT not in telegram.texts(ALICE)


async def test_refusal_whose_answer_fails_stays_quiet(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, log_output: io.StringIO
) -> None:
    """When Telegram will not take the answer to a refused press (a press replayed after a
    restart is "too old"), that is logged as information: no error, no message in the chat."""
    async with bot(**SETTINGS) as app:
        scene = await set_scene(app, telegram)
        before = footprint(telegram)
        telegram.fail_method("answerCallbackQuery", 400, "Bad Request: query is too old")
        forged = press(telegram, scene.quiet[BOB], f"o:{scene.group_job}:0", BOB)
        await wait_until(lambda: processed(app, [forged]))
        after = footprint(telegram)
    assert after == before
    assert [line["reason"] for line in refusals(log_output)] == ["not_owner"]
    failed = [line for line in log_lines(log_output) if line["event"] == "button_answer_failed"]
    assert len(failed) == 1 and "too old" in failed[0]["error"]
    assert [line for line in log_lines(log_output) if line.get("level") == "error"] == []


async def test_press_without_a_message_is_refused(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, log_output: io.StringIO
) -> None:
    """A press that claims to come from an inline message (the bot sends none, so no chat to
    check) naming a real job is answered and refused, and nothing is sent."""
    async with bot(**SETTINGS) as app:
        scene = await set_scene(app, telegram)
        before = footprint(telegram)
        update = updates.callback_query(
            f"o:{scene.group_job}:0", message=payload(scene.group_result), user_id=ALICE
        )
        del update["callback_query"]["message"]
        update["callback_query"]["inline_message_id"] = "inline-1"
        telegram.push_update(update)
        await wait_until(lambda: processed(app, [update]))
        after = footprint(telegram)
    assert answer_text(telegram, update) == EXPIRED
    assert after == before
    assert [line["reason"] for line in refusals(log_output)] == ["no_message"]


# -- the parser alone ------------------------------------------------------------------------


@pytest.mark.parametrize("data", MALFORMED)
def test_parser_refuses_malformed_data(data: str) -> None:
    """Each malformed string parses to nothing, without raising."""
    assert parse_button_data(data) is None


@pytest.mark.parametrize("data", [None, 7, b"a:1", ["a:1"]])
def test_parser_refuses_data_that_is_not_text(data: object) -> None:
    """Callback data that is not a string (PTB's arbitrary data, bytes) parses to nothing."""
    assert parse_button_data(data) is None


def test_parser_reads_every_button_the_bot_makes() -> None:
    """The data of every keyboard the bot sends parses back to its button, job and image, and
    encodes to the same text: the parser and the keyboards agree."""
    keyboards = [
        result_keyboard(7, 1),
        result_keyboard(2**63 - 1, 3),
        cancel_keyboard(12),
        result_keyboard(8, 1, upscale=True),
        result_keyboard(9, 2, upscale=True),
        upscaled_keyboard(10),
    ]
    found = []
    for keyboard in keyboards:
        for row in keyboard.inline_keyboard:
            for button in row:
                data = str(button.callback_data)
                parsed = parse_button_data(data)
                assert parsed is not None, data
                assert parsed.encode() == data
                found.append((parsed.button, parsed.job_id, parsed.index))
    assert found == [
        (Button.AGAIN, 7, None),
        (Button.EDIT, 7, 0),
        (Button.ORIGINAL, 7, 0),
        (Button.DELETE, 7, None),
        (Button.AGAIN, 2**63 - 1, None),
        (Button.ORIGINAL, 2**63 - 1, None),
        (Button.EDIT, 2**63 - 1, 0),
        (Button.EDIT, 2**63 - 1, 1),
        (Button.EDIT, 2**63 - 1, 2),
        (Button.DELETE, 2**63 - 1, None),
        (Button.CANCEL, 12, None),
        (Button.AGAIN, 8, None),
        (Button.EDIT, 8, 0),
        (Button.ORIGINAL, 8, 0),
        (Button.UPSCALE, 8, 0),
        (Button.DELETE, 8, None),
        (Button.AGAIN, 9, None),
        (Button.ORIGINAL, 9, None),
        (Button.EDIT, 9, 0),
        (Button.EDIT, 9, 1),
        (Button.UPSCALE, 9, 0),
        (Button.UPSCALE, 9, 1),
        (Button.DELETE, 9, None),
        (Button.DELETE, 10, None),
    ]
