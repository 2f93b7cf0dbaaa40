"""Albums captioned /edit (issue 17): one edit over all the album's photos, up to
edit.max_input_images; parts collected durably (kill -9 inside the quiet window still makes
exactly one job); a reply to one album photo edits that photo only."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from imagebot import texts
from imagebot.store.db import Database
from imagebot.store.migrate import load_migrations, migrate
from tests import updates
from tests.crash_harness import MakeDaemon, exists, query
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID
GROUP = -100_321
COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]
QUIET = {"album_quiet_s": 0.5}


def album(
    telegram: FakeTelegram,
    count: int,
    caption: str | None,
    *,
    caption_on: int = 0,
    group: str = "album-1",
    chat_id: int = CHAT,
) -> tuple[list[bytes], list[dict[str, Any]]]:
    """`count` distinct photos as one album (each its own message sharing media_group_id),
    the caption on part `caption_on`; returns the images and the updates, not yet pushed."""
    images = [make_image(64, 48, COLOURS[n % len(COLOURS)]) for n in range(count)]
    parts = [
        updates.photo_message(
            telegram.add_file(png),
            width=64,
            height=48,
            caption=caption if n == caption_on else None,
            media_group_id=group,
            chat_id=chat_id,
        )
        for n, png in enumerate(images)
    ]
    return images, parts


def received_images(fal: FakeFal, n: int = -1) -> list[bytes]:
    """The bytes of every data URI in the n-th submit's image_urls, in order."""
    uris = fal.submits[n].params["image_urls"]
    return [base64.b64decode(uri.partition(",")[2]) for uri in uris]


async def test_album_becomes_one_edit_of_all_its_photos(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """Three photos sent as one album with the caption /edit on the second: one job, one fal
    request whose image_urls carry the three photos in the order sent, one edited result, and
    no "send me with /edit" hint for the other two photos."""
    async with bot(edit=QUIET) as app:
        images, parts = album(telegram, 3, "/edit put them on a beach", caption_on=1)
        for part in parts:
            telegram.push_update(part)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
        await wait_until(lambda: rows(db_path(app))[0]["status"] == "succeeded")
        (row,) = rows(db_path(app))
        leftover = rows(db_path(app), "SELECT * FROM album_parts")
    assert len(fal.submits) == 1
    assert received_images(fal) == images
    assert fal.submits[0].params["prompt"] == "put them on a beach"
    assert (row["kind"], row["prompt"]) == ("edit", "put them on a beach")
    sent_ids = [p["message"]["photo"][-1]["file_id"] for p in parts]
    assert json.loads(row["input_file_ids"]) == sent_ids
    assert row["update_id"] == parts[1]["update_id"]  # the captioned part names the job
    assert row["command_message_id"] == parts[1]["message"]["message_id"]
    assert texts.PHOTO_HINT not in telegram.texts(CHAT)
    assert texts.ALBUM_HINT not in telegram.texts(CHAT)
    assert leftover == []


async def test_album_over_the_limit_uses_the_first_photos_and_says_so(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """Six photos with max_input_images = 4: fal gets the first four (in order) and the user is
    told that the first 4 of 6 were used."""
    async with bot(edit={**QUIET, "max_input_images": 4}) as app:
        images, parts = album(telegram, 6, "/edit make it winter")
        for part in parts:
            telegram.push_update(part)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
        await wait_until(lambda: texts.album_first_used(6, 4) in telegram.texts(CHAT))
        (row,) = rows(db_path(app))
    assert len(fal.submits) == 1
    assert received_images(fal) == images[:4]
    assert len(json.loads(row["input_file_ids"])) == 4
    assert "image_urls" not in texts.album_first_used(6, 4)


async def test_album_without_edit_caption_gets_one_hint(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """An album of three photos without a caption: one hint in a private chat (not one per
    photo), no job, no vendor call; the same album in a group gets nothing."""
    async with bot(edit=QUIET, telegram={"groups_require_mention": True}) as app:
        _, parts = album(telegram, 3, None)
        _, in_group = album(telegram, 2, None, group="album-g", chat_id=GROUP)
        for part in [*parts, *in_group]:
            telegram.push_update(part)
        await wait_until(lambda: texts.ALBUM_HINT in telegram.texts(CHAT), within=10)
        await wait_until(lambda: not rows(db_path(app), "SELECT * FROM album_parts"), within=10)
        jobs = rows(db_path(app))
    assert telegram.texts(CHAT) == [texts.ALBUM_HINT]
    assert telegram.messages(GROUP) == []
    assert jobs == []
    assert fal.submits == []


async def test_reply_to_one_album_photo_edits_that_photo_only(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A caption-less album, then /edit as a reply to its second photo: the edit uses that one
    photo, not the album."""
    async with bot(edit=QUIET) as app:
        images, parts = album(telegram, 3, None)
        for part in parts:
            telegram.push_update(part)
        await wait_until(lambda: texts.ALBUM_HINT in telegram.texts(CHAT), within=10)
        telegram.push_update(updates.command("/edit make it glow", reply_to=parts[1]["message"]))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
        (row,) = rows(db_path(app))
    assert received_images(fal) == [images[1]]
    assert row["input_file_id"] == parts[1]["message"]["photo"][-1]["file_id"]
    assert json.loads(row["input_file_ids"]) == []


async def test_again_on_an_album_edit_sends_every_photo_again(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """🔁 Again under an album edit's result makes a second edit of the same photos."""
    async with bot(edit=QUIET) as app:
        images, parts = album(telegram, 2, "/edit swap the faces")
        for part in parts:
            telegram.push_update(part)
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=10)
        result = telegram.photos(CHAT)[0]
        telegram.push_update(
            updates.callback_query("a:1", message=updates.bot_message_dict(result))
        )
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2, within=10)
        assert len(rows(db_path(app))) == 2
    assert received_images(fal, 1) == images


async def test_schema_8_keeps_every_jobs_column_and_id(tmp_path: Path) -> None:
    """Migration 0008 replaces jobs.kind (for 'upscale'): every column and row the earlier
    migrations made survives, other kinds are still refused, and a pruned id is still never
    reused."""
    every = load_migrations()
    before = [m for m in every if m.name < "0008"]
    db = Database(tmp_path / "m.db")
    await db.open()
    try:
        await migrate(db, before)
        stamp = "2026-01-01T00:00:00.000Z"
        for update_id in (1, 2, 3):
            await db.execute_write(
                "INSERT INTO jobs (kind, status, update_id, chat_id, user_id, chat_type, prompt,"
                " provider, created_at, updated_at) VALUES ('generate', 'succeeded', ?, 1, 1,"
                " 'private', 'fox', 'replicate', ?, ?)",
                (update_id, stamp, stamp),
            )
        await db.execute_write("DELETE FROM jobs WHERE id = 3")
        columns_before = {r["name"] for r in await db.fetchall("PRAGMA table_info(jobs)")}
        await migrate(db, every)
        columns_after = {r["name"] for r in await db.fetchall("PRAGMA table_info(jobs)")}
        kept = [r["id"] for r in await db.fetchall("SELECT id FROM jobs ORDER BY id")]
        await db.execute_write(
            "INSERT INTO jobs (kind, status, update_id, chat_id, user_id, chat_type, prompt,"
            " provider, created_at, updated_at) VALUES ('upscale', 'queued', 9, 1, 1,"
            " 'private', 'fox', 'replicate', ?, ?)",
            (stamp, stamp),
        )
        newest = await db.fetchone("SELECT id, kind FROM jobs ORDER BY id DESC LIMIT 1")
        try:
            await db.execute_write(
                "INSERT INTO jobs (kind, status, update_id, chat_id, user_id, chat_type, prompt,"
                " provider, created_at, updated_at) VALUES ('paint', 'queued', 10, 1, 1,"
                " 'private', 'fox', 'replicate', ?, ?)",
                (stamp, stamp),
            )
        except sqlite3.IntegrityError as exc:
            refused = str(exc)
        else:
            refused = ""
        check = await db.fetchall("PRAGMA integrity_check")
    finally:
        await db.close()
    assert columns_before <= columns_after
    assert {"input_file_ids", "source_index", "deleted_at", "deleted_by"} <= columns_after
    assert kept == [1, 2]
    assert newest is not None and (newest["id"], newest["kind"]) == (4, "upscale")
    assert [r[0] for r in check] == ["ok"]
    assert "CHECK constraint failed" in refused


# -- kill -9 inside the quiet window (the real daemon as a subprocess) -----------------------


def album_parts(db: Path | str) -> list[Any]:
    return query(db, "SELECT * FROM album_parts") if exists(db) else []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["webhook", "polling"])
async def test_kill_9_inside_the_quiet_window_still_makes_exactly_one_job(
    daemon: MakeDaemon, telegram: FakeTelegram, fal: FakeFal, mode: str
) -> None:
    """kill -9 while an album's parts are saved but its quiet window has not passed: after the
    restart the album becomes exactly one edit job of all its photos (one fal request, one
    result), and a later restart makes no second one."""
    bot = daemon(mode=mode, edit={"album_quiet_s": 4.0, "daily_cap": 100, "timeout_s": 60})
    await bot.start()
    images, parts = album(telegram, 3, "/edit make it a painting")
    for part in parts:
        telegram.push_update(part)
    await wait_until(lambda: len(album_parts(bot.db_path)) == 3, within=10)
    await bot.kill()  # well inside the 4 s window: no job yet
    assert bot.jobs() == []
    assert fal.submits == []
    await bot.start()
    await telegram.wait_for(lambda: len(telegram.photos(CHAT)) == 1, within=20)
    await bot.wait_jobs(lambda r: len(r) == 1 and r[0]["status"] == "succeeded")
    await bot.terminate()
    await bot.start()  # nothing left to turn into a job
    await bot.wait_jobs(lambda r: not album_parts(bot.db_path))
    (row,) = bot.jobs()
    assert row["update_id"] == parts[0]["update_id"]
    assert len(fal.submits) == 1
    assert received_images(fal) == images
    assert len(telegram.photos(CHAT)) == 1
    assert album_parts(bot.db_path) == []
