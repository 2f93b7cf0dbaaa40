"""The operator's control room in the chat: /allow /deny /users /invite /invites /stats /pause
/resume for admins only, invite links, the pause across a restart, and the "/" menus."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import timedelta
from typing import Any

from imagebot import texts
from imagebot.clock import iso, utcnow
from imagebot.store.access import AccessStore, Redeem
from imagebot.store.db import Database
from imagebot.store.migrate import migrate
from imagebot.store.usage import day_start
from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import execute
from tests.support import db_path, ops_get, rows

ADMIN = updates.DEFAULT_USER_ID  # private chat id = user id
FRIEND = 2002
OTHER = 3003
CONFIG_USER = 4004
STRANGER = 5005
GROUP = -100_777
BOT = "@imagebot_test_bot"
CLOSED = {"open": False, "admins": [ADMIN]}


async def say(
    telegram: FakeTelegram, text: str, user: int = ADMIN, chat: int | None = None, **kw: Any
) -> str:
    """Send a command as `user` and return the bot's next text in that chat."""
    chat_id = user if chat is None else chat
    before = len(telegram.texts(chat_id))
    telegram.push_update(updates.command(text, user_id=user, chat_id=chat_id, **kw))
    await wait_until(lambda: len(telegram.texts(chat_id)) > before)
    return telegram.texts(chat_id)[before]


async def generates(telegram: FakeTelegram, user: int) -> None:
    """`user` asks for an image in their private chat and gets it."""
    before = len(telegram.photos(user))
    telegram.push_update(updates.command("/generate a fox", user_id=user, chat_id=user))
    await wait_until(lambda: len(telegram.photos(user)) > before)


async def processed(path: str, update_ids: list[int]) -> None:
    """Wait until the bot has handled these updates (their inbox rows are closed)."""
    wanted = set(update_ids)
    await wait_until(
        lambda: (
            wanted
            <= {r["update_id"] for r in rows(path, "SELECT * FROM inbox") if r["processed_at"]}
        )
    )


def invite_code(text: str) -> str:
    match = re.search(r"\?start=([A-Za-z0-9_-]+)", text)
    assert match, text
    return match.group(1)


async def test_allow_by_reply_and_by_id(bot, telegram: FakeTelegram) -> None:
    """An admin lets one person in by replying /allow to their group message and another by
    id; both are served at once, the first is told in private, and the database says who
    let them in."""
    async with bot(access=CLOSED) as app:
        hello = updates.text_message("hi all", user_id=FRIEND, chat_id=GROUP, username="bob")
        telegram.push_update(hello)
        answer = await say(
            telegram, f"/allow{BOT}", chat=GROUP, reply_to=hello["message"], username="alice"
        )
        assert answer.startswith(f"Done: {FRIEND} (@bob) can use the bot now")
        await wait_until(lambda: bool(telegram.texts(FRIEND)))
        assert telegram.texts(FRIEND) == [
            "Good news: you can use this bot now. Send /help to see what I can do."
        ]
        await generates(telegram, FRIEND)
        assert (await say(telegram, f"/allow {OTHER}")).startswith(f"Done: {OTHER} can use")
        await generates(telegram, OTHER)
        assert await say(telegram, f"/allow {OTHER}") == f"{OTHER} can use the bot already."
        assert (await say(telegram, "/allow")).startswith("Usage: /allow <user id>")
        assert (await say(telegram, "/allow @bob")).startswith("Usage: /allow <user id>")
    listed = {r["user_id"]: r for r in rows(db_path(app), "SELECT * FROM allowed_users")}
    assert set(listed) == {FRIEND, OTHER}
    assert listed[FRIEND]["added_by"] == ADMIN and listed[FRIEND]["source"] == "admin"
    assert listed[FRIEND]["name"] == "@bob"


async def test_deny_and_config_users_stay(bot, telegram: FakeTelegram) -> None:
    """/deny takes a database entry away at once (their next request is refused); a /deny of
    a config.toml user says it can't be changed from the chat and they keep their access."""
    async with bot(access={**CLOSED, "users": [CONFIG_USER]}) as app:
        await say(telegram, f"/allow {FRIEND}")
        await generates(telegram, FRIEND)
        assert (
            await say(telegram, f"/deny {FRIEND}") == f"Done: {FRIEND} can no longer use the bot."
        )
        refusal = await say(telegram, "/generate a fox", user=FRIEND)
        assert refusal.startswith("Sorry, this bot is private") and str(FRIEND) in refusal
        assert "imagebot users allow" not in refusal  # an admin exists: no operator hint
        assert await say(telegram, f"/deny {FRIEND}") == (
            f"{FRIEND} isn't on the list, so there's nothing to take away."
        )
        answer = await say(telegram, f"/deny {CONFIG_USER}")
        assert "config.toml (access.users)" in answer and "can't change" in answer
        assert "config.toml (access.admins)" in await say(telegram, f"/deny {ADMIN}")
        await generates(telegram, CONFIG_USER)
    assert rows(db_path(app), "SELECT * FROM allowed_users") == []
    assert [r["user_id"] for r in rows(db_path(app))] == [FRIEND, CONFIG_USER]


async def test_users_lists_config_and_database_with_usage(bot, telegram: FakeTelegram) -> None:
    """/users shows the config admins and users (marked read-only) and the ones let in here
    (by whom), each with their requests today."""
    async with bot(access={**CLOSED, "users": [CONFIG_USER], "chats": [GROUP]}):
        await say(telegram, f"/allow {FRIEND}")
        await generates(telegram, FRIEND)
        await generates(telegram, FRIEND)
        await generates(telegram, CONFIG_USER)
        text = await say(telegram, "/users")
    admins, config_users, added = (
        text.split("Admins (config.toml):\n")[1].split("Users (config.toml, read-only here):\n")[
            0
        ],
        text.split("Users (config.toml, read-only here):\n")[1].split("Let in here")[0],
        text.split("Let in here (/deny takes them off):\n")[1],
    )
    assert admins.strip() == f"• {ADMIN}: 0 requests today"
    assert config_users.strip() == f"• {CONFIG_USER}: 1 request today"
    assert added.startswith(f"• {FRIEND}: by {ADMIN}, ") and "2 requests today" in added
    assert f"Group chats (config.toml): {GROUP}" in text


async def test_invite_admits_once_then_refuses(bot, telegram: FakeTelegram) -> None:
    """/invite makes a one-use t.me link: the first person to open it is in and served, the
    second is told kindly it was used up (once per interval), and the code is stored only
    as its SHA-256."""
    async with bot(access=CLOSED) as app:
        text = await say(telegram, "/invite")
        assert "https://t.me/imagebot_test_bot?start=" in text and "works once" in text
        code = invite_code(text)
        assert len(code) >= 16  # at least 96 random bits
        welcome = await say(telegram, f"/start {code}", user=FRIEND)
        assert welcome.startswith("Welcome, Alice! The invite worked")
        await generates(telegram, FRIEND)
        refusal = await say(telegram, f"/start {code}", user=STRANGER)
        assert refusal.startswith("Sorry! This invite link has been used up.")
        # Another try within the interval costs nothing; anything else gets the usual one
        # notice (with their id), and again nothing more.
        tries = [
            updates.command(f"/start {code}", user_id=STRANGER, chat_id=STRANGER),
            updates.command("/help", user_id=STRANGER, chat_id=STRANGER),
            updates.command("/generate x", user_id=STRANGER, chat_id=STRANGER),
        ]
        for update in tries:
            telegram.push_update(update)
        await processed(db_path(app), [u["update_id"] for u in tries])
        assert len(telegram.texts(STRANGER)) == 2
        assert telegram.texts(STRANGER)[1].startswith("Sorry, this bot is private")
    (invite,) = rows(db_path(app), "SELECT * FROM invites")
    assert invite["uses_left"] == 0 and invite["created_by"] == ADMIN
    assert invite["code_sha256"] == hashlib.sha256(code.encode()).hexdigest()
    assert code not in str(tuple(invite))
    (admitted,) = rows(db_path(app), "SELECT * FROM allowed_users")
    assert (admitted["user_id"], admitted["source"], admitted["invite_id"]) == (
        FRIEND,
        "invite",
        invite["id"],
    )


async def test_expired_invite_is_refused(bot, telegram: FakeTelegram) -> None:
    """An invite past its hours admits nobody: the opener is told it expired."""
    async with bot(access=CLOSED) as app:
        control = app.services.control
        code, _ = await control.access.create_invite(
            uses=3, hours=1, created_by=ADMIN, now=utcnow() - timedelta(hours=2)
        )
        refusal = await say(telegram, f"/start {code}", user=FRIEND)
        assert refusal.startswith("Sorry! This invite link has expired.")
        assert str(FRIEND) in refusal
        assert await say(telegram, "/invites") == "No open invites. /invite makes one."
        assert not app.services.policy.may_use(FRIEND, FRIEND)
    assert rows(db_path(app), "SELECT * FROM allowed_users") == []


async def test_revoked_invite_is_refused(bot, telegram: FakeTelegram) -> None:
    """/invites lists an open invite by number; /invites revoke <n> withdraws it, and its
    link then admits nobody."""
    async with bot(access=CLOSED) as app:
        code = invite_code(await say(telegram, "/invite 5 24"))
        listing = await say(telegram, "/invites")
        assert "• #1: 5 of 5 uses left, until " in listing and f"made by {ADMIN}" in listing
        assert code not in listing
        assert await say(telegram, "/invites revoke 1") == (
            "Invite #1 is withdrawn: its link no longer works."
        )
        assert await say(telegram, "/invites revoke 1") == "Invite #1 was withdrawn already."
        assert await say(telegram, "/invites revoke 9") == "There's no invite #9."
        refusal = await say(telegram, f"/start {code}", user=FRIEND)
        assert refusal.startswith("Sorry! This invite link was withdrawn.")
        assert (await say(telegram, "/invite 0")).startswith("Usage: /invite [uses] [hours]")
    (invite,) = rows(db_path(app), "SELECT * FROM invites")
    assert invite["revoked_by"] == ADMIN and invite["uses_left"] == 5


async def test_admin_commands_do_not_exist_for_others(bot, telegram: FakeTelegram) -> None:
    """For an allowed user who is not an admin every admin command is an unknown command
    (no hint it exists) and changes nothing; a stranger gets only the usual one notice."""
    async with bot(access={**CLOSED, "users": [FRIEND]}) as app:
        for command in (
            f"/allow {OTHER}",
            "/deny 1001",
            "/users",
            "/invite",
            "/invites",
            "/stats",
            "/pause now",
            "/resume",
        ):
            name = command.split()[0]
            assert await say(telegram, command, user=FRIEND) == (
                f"I don't know {name}. Try /help."
            )
        telegram.push_update(updates.command("/pause", user_id=STRANGER, chat_id=STRANGER))
        telegram.push_update(updates.command("/users", user_id=STRANGER, chat_id=STRANGER))
        await wait_until(lambda: len(telegram.texts(STRANGER)) == 1)
        await say(telegram, "/help")  # the bot caught up
        assert telegram.texts(STRANGER)[0].startswith("Sorry, this bot is private")
        assert len(telegram.texts(STRANGER)) == 1
        assert not app.services.control.paused
        await generates(telegram, FRIEND)
    path = db_path(app)
    assert rows(path, "SELECT * FROM allowed_users") == []
    assert rows(path, "SELECT * FROM invites") == []


def _insert_job(path: str, **fields: Any) -> None:
    now = iso()
    row = {
        "kind": "generate",
        "phase": "done",
        "chat_id": 9,
        "user_id": 9,
        "chat_type": "private",
        "prompt": "x",
        "provider": "replicate",
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    execute(
        path,
        f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
        tuple(row.values()),
    )


async def test_stats_on_a_known_set_of_jobs(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/stats counts today's jobs by kind and status, images delivered, the spend estimate,
    median and 95th percentile time to result, the top error codes, and what runs now."""
    replicate.latency_s = 30  # the live jobs stay running / waiting while /stats is asked
    async with bot(
        access={**CLOSED, "users": [FRIEND]},
        runner={"max_running": 1},
        generate={"cost_per_image_usd": 0.02},
    ) as app:
        path = db_path(app)
        now = utcnow()
        for n, (seconds, images) in enumerate([(2, 1), (4, 1), (10, 2)]):
            _insert_job(
                path,
                update_id=-1 - n,
                status="succeeded",
                cost_estimate_usd=0.01,
                created_at=iso(now),
                finished_at=iso(now + timedelta(seconds=seconds)),
                result_file_ids=str(["f"] * images).replace("'", '"'),
            )
        failures = [("generate", "timeout"), ("edit", "timeout"), ("generate", "safety")]
        for n, (kind, code) in enumerate(failures):
            _insert_job(
                path,
                update_id=-10 - n,
                kind=kind,
                status="failed",
                error_code=code,
                cost_estimate_usd=0.5,
            )
        _insert_job(path, update_id=-20, status="canceled", cost_estimate_usd=0.5)
        yesterday = iso(day_start(now) - timedelta(hours=1))
        _insert_job(
            path, update_id=-21, status="succeeded", created_at=yesterday, cost_estimate_usd=7.0
        )
        for _ in range(2):
            telegram.push_update(
                updates.command("/generate a slow fox", user_id=FRIEND, chat_id=FRIEND)
            )
        await wait_until(lambda: app.services.runner.running_count == 1)
        await wait_until(
            lambda: len(rows(path, "SELECT * FROM jobs WHERE status = 'queued'")) == 1
        )
        text = await say(telegram, "/stats")
    assert text.splitlines() == [
        "Today (UTC): 9 requests",
        "• Generate: 1 canceled, 2 failed, 1 queued, 1 running, 3 succeeded",
        "• Edit: 1 failed",
        "Images delivered: 4",
        "Estimated spend: $0.07",  # 3 x 0.01 + the 2 live jobs x 0.02
        "Time to result: median 4.0 s, 95% within 10 s",
        "Top errors: timeout (2), safety (1)",
        "Now: 1 running, 1 waiting",
    ]


async def test_pause_and_resume_survive_a_restart(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/pause: a running job still finishes, new requests get the admin's message and no job,
    /healthz says paused; after a restart it still is, until /resume."""
    replicate.latency_s = 1.0
    settings = {"access": {**CLOSED, "users": [FRIEND]}}
    async with bot(**settings) as app:
        telegram.push_update(updates.command("/generate a fox", user_id=FRIEND, chat_id=FRIEND))
        await wait_until(lambda: app.services.runner.running_count == 1)
        answer = await say(telegram, "/pause Back at 5 pm, sorry!")
        assert answer.startswith("Paused: new requests are refused")
        assert "Back at 5 pm, sorry!" in answer
        assert await say(telegram, "/generate more", user=FRIEND) == "Back at 5 pm, sorry!"
        await wait_until(lambda: len(telegram.photos(FRIEND)) == 1)  # the running one finished
        status, health = await ops_get(app, "/healthz")
        assert status == 200 and health["paused"] is True
        assert health["pause_message"] == "Back at 5 pm, sorry!"
    async with bot(**settings) as app:
        assert await say(telegram, "/generate again", user=FRIEND) == "Back at 5 pm, sorry!"
        assert (await say(telegram, "/generate mine")).startswith("Back at 5 pm, sorry!\n\n")
        _, health = await ops_get(app, "/healthz")
        assert health["paused"] is True
        assert await say(telegram, "/resume") == "Resumed: the bot takes new requests again."
        assert await say(telegram, "/resume") == "The bot isn't paused."
        _, health = await ops_get(app, "/healthz")
        assert health["paused"] is False and "pause_message" not in health
        await generates(telegram, FRIEND)
    assert len(rows(db_path(app))) == 2


async def test_pause_without_message_uses_the_default(bot, telegram: FakeTelegram) -> None:
    """/pause alone tells users the default words."""
    async with bot(access={**CLOSED, "users": [FRIEND]}) as app:
        await say(telegram, "/pause")
        answer = await say(telegram, "/generate a fox", user=FRIEND)
        assert answer.startswith("The bot is taking a short break")
    assert rows(db_path(app)) == []


async def test_command_menus_per_scope_set_only_when_changed(bot, telegram: FakeTelegram) -> None:
    """At start the default menu gets the user commands and each admin's chat gets user +
    admin commands, once for every language and once per translated language; an unchanged
    restart makes no call; a new admin costs one call per language and a removed admin's
    menus are deleted."""
    per_scope = 1 + len(texts.menu_language_codes())  # the default menu + each translation
    async with bot(access=CLOSED):
        pass
    user_menu = [
        "generate",
        "edit",
        "cancel",
        "usage",
        "settings",
        "style",
        "history",
        "language",
        "help",
    ]
    admin_menu = [
        *user_menu,
        "allow",
        "deny",
        "users",
        "invite",
        "invites",
        "stats",
        "pause",
        "resume",
    ]
    assert telegram.menu("default") == user_menu
    assert telegram.menu(f"chat:{ADMIN}") == admin_menu
    assert telegram.menu_for(ADMIN) == admin_menu and telegram.menu_for(FRIEND) == user_menu
    assert telegram.menu_for(ADMIN, "ru") == admin_menu
    assert len(telegram.calls_of("setMyCommands")) == 2 * per_scope
    async with bot(access=CLOSED):
        pass
    assert len(telegram.calls_of("setMyCommands")) == 2 * per_scope  # unchanged: no call
    async with bot(access={**CLOSED, "admins": [ADMIN, OTHER]}):
        pass
    assert len(telegram.calls_of("setMyCommands")) == 3 * per_scope
    assert telegram.menu_for(OTHER) == admin_menu
    async with bot(access={**CLOSED, "admins": [OTHER]}):
        pass
    assert len(telegram.calls_of("setMyCommands")) == 3 * per_scope
    assert len(telegram.calls_of("deleteMyCommands")) == per_scope
    assert telegram.menu_for(ADMIN) == user_menu


async def test_failed_menu_is_tried_again_next_start(bot, telegram: FakeTelegram) -> None:
    """When Telegram refuses setMyCommands the bot still starts, and the next start sets it."""
    telegram.fail_method("setMyCommands", 400, "Bad Request: chat not found", times=2)
    async with bot(access=CLOSED):
        pass
    # the two refused calls were the first: the menus for every language (None)
    assert telegram.menu("default") == [] and telegram.menu(f"chat:{ADMIN}") == []
    async with bot(access=CLOSED):
        pass
    assert telegram.menu(f"chat:{ADMIN}")[-1] == "resume"
    # the first start's first two calls failed; the second start makes only those two again
    per_scope = 1 + len(texts.menu_language_codes())
    assert len(telegram.calls_of("setMyCommands")) == 2 * per_scope + 2


async def test_racing_for_the_last_use_admits_one(tmp_path) -> None:
    """Ten people opening a one-use link at the same moment: exactly one gets in."""
    db = Database(tmp_path / "race.db")
    await db.open()
    try:
        await migrate(db)
        access = AccessStore(db)
        code, _ = await access.create_invite(uses=1, hours=1, created_by=None)
        outcomes = await asyncio.gather(*(access.redeem(code, 9000 + n, None) for n in range(10)))
        admitted = [o for o, _ in outcomes if o is Redeem.ADMITTED]
        assert len(admitted) == 1
        assert sorted({o.value for o, _ in outcomes}) == ["admitted", "used_up"]
        assert len(await access.allowed()) == 1
    finally:
        await db.close()
