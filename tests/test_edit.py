"""/edit end to end through the real app: a photo in via Telegram, bytes to the fake fal, a photo
out; every way in, the input checks, the SSRF guard on outputs, and the bot token staying home."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from imagebot import texts
from imagebot.config import MediaSettings
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, SettingsFactory, running
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import inverted, make_image
from tests.fakes.origin import Origin
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import dump, is_pg
from tests.support import (
    connected_to,
    db_path,
    finished,
    jobs,
    ops_get,
    photo_upd,
    png_claiming,
    rows,
    told,
)

CHAT = updates.DEFAULT_CHAT_ID
GROUP = -100_555
TOKEN_SECRET = BOT_TOKEN.split(":", 1)[1]
EDIT_PARAMS = {"num_images": 1, "output_format": "png", "aspect_ratio": "4:3", "seed": 7}
DEFAULT_HOSTS = MediaSettings().allowed_hosts


# -- helpers --------------------------------------------------------------------------------


def sent_image(fal: FakeFal, n: int = -1) -> tuple[str, bytes]:
    """The MIME type and bytes of the image_urls data URI in the n-th submit fal received."""
    (uri,) = fal.submits[n].params["image_urls"]
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    return header.removeprefix("data:").removesuffix(";base64"), base64.b64decode(payload)


async def photos(telegram: FakeTelegram, count: int, chat: int = CHAT) -> None:
    await wait_until(lambda: len(telegram.photos(chat)) >= count, within=8)


async def texts_seen(telegram: FakeTelegram, text: str, chat: int = CHAT, times: int = 1) -> None:
    await wait_until(lambda: telegram.texts(chat).count(text) >= times, within=5)


async def settle(app: Any, update: dict[str, Any]) -> None:
    """Wait until the bot's handlers are done with an update (its inbox row is processed)."""
    update_id = int(update["update_id"])

    def processed() -> bool:
        found = rows(db_path(app), "SELECT update_id, processed_at FROM inbox")
        return any(r["update_id"] == update_id and r["processed_at"] for r in found)

    await wait_until(processed, within=5)


def no_token_in(blob: bytes | str, where: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    assert BOT_TOKEN.encode() not in data, f"bot token in {where}"
    assert TOKEN_SECRET.encode() not in data, f"token secret in {where}"
    # a Telegram file URL may only appear masked ("/file/bot<redacted>", in debug logs)
    assert b"/file/bot" not in data.replace(b"/file/bot<redacted>", b""), f"file URL in {where}"


async def assert_token_stayed_home(app: Any, fal: FakeFal) -> None:
    """The token-leak check: not in anything fal received, the store, or the ops API."""
    no_token_in(fal.everything_received(), "what fal received")
    for call in fal.calls:
        assert call.headers.get("Authorization") in (None, f"Key {FAL_KEY}")
    for call in fal.calls_of("file"):  # output downloads carry no credentials at all
        assert "Authorization" not in call.headers
    for row in jobs(app):
        no_token_in(json.dumps(dict(row)), f"job row {row['id']}")
    _, listing = await ops_get(app, "/jobs")
    no_token_in(json.dumps(listing), "/jobs")
    for row in jobs(app):
        _, one = await ops_get(app, f"/jobs/{row['id']}")
        no_token_in(json.dumps(one), f"/jobs/{row['id']}")


def files_without_token(root: Path) -> list[str]:
    """Check every file under `root` (database, WAL, result files); return their names."""
    names = []
    for path in root.rglob("*"):
        if path.is_file():
            no_token_in(path.read_bytes(), str(path.relative_to(root)))
            names.append(path.name)
    return names


# -- ways in --------------------------------------------------------------------------------


async def test_caption_edit_end_to_end(
    bot, telegram: FakeTelegram, fal: FakeFal, connections: list[Any], log_output: io.StringIO
) -> None:
    """A photo captioned /edit: "Editing… (job 1)" before fal is asked, fal gets the photo as a
    data URI with the instruction and [edit.params], the edited photo replies, the row succeeds,
    and the bot token is nowhere fal, the store, the ops API or the logs can show."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    async with bot(edit={"params": EDIT_PARAMS}) as app:
        update = photo_upd(file_id, "/edit make it blue")
        telegram.push_update(update)
        await texts_seen(telegram, "Editing… (job 1)")
        await photos(telegram, 1)
        (row,) = await finished(app)
        await assert_token_stayed_home(app, fal)

    # The answer does not wait for the work: "Editing…" was out before fal was asked.
    assert telegram.messages(CHAT, include_deleted=True)[0].sent_at <= fal.submits[0].at
    message_id = update["message"]["message_id"]
    status = telegram.messages(CHAT, include_deleted=True)[0]
    assert status.text == "Editing… (job 1)" and status.reply_to_message_id == message_id
    (photo,) = telegram.photos(CHAT)
    assert photo.reply_to_message_id == message_id
    assert photo.caption == "make it blue"
    assert photo.file_id is not None
    assert telegram.file_bytes(photo.file_id) == inverted(png)  # what the fake editor made
    # what fal was asked
    (submit,) = fal.submits
    assert submit.path == "/fal-ai/nano-banana/edit"
    assert submit.headers["Authorization"] == f"Key {FAL_KEY}"
    params = dict(submit.params)
    assert len(params.pop("image_urls")) == 1  # one data URI, its bytes checked below
    assert params == {**EDIT_PARAMS, "prompt": "make it blue"}
    assert sent_image(fal) == ("image/png", png)
    assert fal.last_request.received_images == [png]
    request_id = fal.last_request.id
    polled = {c.path.split("?")[0] for c in fal.calls if c.op in ("status", "result")}
    assert polled <= {
        f"/fal-ai/nano-banana/requests/{request_id}/status",
        f"/fal-ai/nano-banana/requests/{request_id}",
    }
    # the bot fetched the photo from Telegram itself
    assert telegram.file_downloads == [telegram.files[file_id].file_path]
    # the row
    assert (row["kind"], row["status"], row["provider"]) == ("edit", "succeeded", "fal")
    assert row["prompt"] == "make it blue"
    assert row["input_file_id"] == file_id
    assert row["provider_request_id"] == request_id
    assert json.loads(row["delivered_message_ids"]) == [photo.message_id]
    # and the logs
    assert '"job_delivered"' in log_output.getvalue()  # the logs really were captured
    no_token_in(log_output.getvalue(), "the logs")
    assert {a[0] for a in connections} == {"127.0.0.1"}


async def test_caption_with_bot_mention(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """/edit@imagebot_test_bot in a caption works in a private chat and in a group."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit@imagebot_test_bot make it blue"))
        telegram.push_update(
            photo_upd(file_id, "/edit@imagebot_test_bot add a hat", chat_id=GROUP)
        )
        await photos(telegram, 1)
        await photos(telegram, 1, chat=GROUP)
        done = await finished(app, 2)
    assert sorted(r["prompt"] for r in done) == ["add a hat", "make it blue"]
    assert {r["status"] for r in done} == {"succeeded"}
    assert sorted(s.params["prompt"] for s in fal.submits) == ["add a hat", "make it blue"]


async def test_group_caption_for_another_bot_is_ignored(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """In a group, /edit@other_bot (or a bare /edit) in a caption is not ours: no job."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        first = photo_upd(file_id, "/edit@other_bot make it blue", chat_id=GROUP)
        second = photo_upd(file_id, "/edit make it blue", chat_id=GROUP)
        telegram.push_update(first)
        telegram.push_update(second)
        await settle(app, second)
        assert jobs(app) == []
    assert fal.submits == [] and telegram.messages(GROUP) == []


async def test_reply_to_a_user_photo(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """/edit <instruction> as a reply to a photo the user sent earlier edits that photo."""
    png = make_image(80, 60, (10, 90, 200))
    file_id = telegram.add_file(png)
    async with bot() as app:
        original = photo_upd(file_id)
        telegram.push_update(original)
        await texts_seen(telegram, texts.PHOTO_HINT)  # a bare photo gets a hint
        command = updates.command("/edit make it red", reply_to=original["message"])
        telegram.push_update(command)
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded" and row["kind"] == "edit"
    assert row["prompt"] == "make it red" and row["input_file_id"] == file_id
    assert row["command_message_id"] == command["message"]["message_id"]
    assert sent_image(fal) == ("image/png", png)
    assert telegram.photos(CHAT)[0].reply_to_message_id == command["message"]["message_id"]


async def test_reply_to_bot_results_chains_edits(
    bot, telegram: FakeTelegram, fal: FakeFal, replicate: FakeReplicate
) -> None:
    """A /generate result can be edited by replying /edit to it, and that edit edited again."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await photos(telegram, 1)
        generated = telegram.photos(CHAT)[0]
        first = updates.command("/edit add a hat", reply_to=updates.bot_message_dict(generated))
        telegram.push_update(first)
        await photos(telegram, 2)
        edited = telegram.photos(CHAT)[1]
        second = updates.command("/edit make it night", reply_to=updates.bot_message_dict(edited))
        telegram.push_update(second)
        await photos(telegram, 3)
        done = await finished(app, 3)
    assert [(r["kind"], r["status"]) for r in done] == [
        ("generate", "succeeded"),
        ("edit", "succeeded"),
        ("edit", "succeeded"),
    ]
    assert generated.file_id and edited.file_id
    assert done[1]["input_file_id"] == generated.file_id
    assert done[2]["input_file_id"] == edited.file_id
    # fal got exactly the images the chat shows, each as bytes
    assert sent_image(fal, 0)[1] == telegram.file_bytes(generated.file_id)
    assert sent_image(fal, 1)[1] == telegram.file_bytes(edited.file_id)
    assert [s.params["prompt"] for s in fal.submits] == ["add a hat", "make it night"]
    final = telegram.photos(CHAT)[2]
    assert final.file_id is not None
    assert telegram.file_bytes(final.file_id) == inverted(telegram.file_bytes(edited.file_id))


async def test_edit_this_button_edits_the_result(
    bot, telegram: FakeTelegram, fal: FakeFal, replicate: FakeReplicate
) -> None:
    """✏️ Edit this under a result asks what to change, then edits that result."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a lighthouse"))
        await photos(telegram, 1)
        result = telegram.photos(CHAT)[0]
        telegram.push_update(
            updates.callback_query("e:1:0", message=updates.bot_message_dict(result))
        )
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        telegram.push_update(updates.text_message("paint it purple"))
        await photos(telegram, 2)
        done = await finished(app, 2)
    assert done[1]["kind"] == "edit" and done[1]["status"] == "succeeded"
    assert done[1]["prompt"] == "paint it purple"
    assert result.file_id is not None
    assert sent_image(fal)[1] == telegram.file_bytes(result.file_id)


@pytest.mark.parametrize(
    ("fmt", "mime", "name"), [("PNG", "image/png", "a.png"), ("JPEG", "image/jpeg", "a.jpg")]
)
async def test_image_sent_as_document(
    bot, telegram: FakeTelegram, fal: FakeFal, fmt: str, mime: str, name: str
) -> None:
    """An image sent uncompressed as a file works by caption and by reply."""
    data = make_image(64, 48, fmt=fmt)
    file_id = telegram.add_file(data)
    async with bot() as app:
        telegram.push_update(
            updates.document_message(file_id, mime, name, len(data), caption="/edit first")
        )
        await photos(telegram, 1)
        document = updates.document_message(file_id, mime, name, len(data))
        telegram.push_update(document)
        telegram.push_update(updates.command("/edit second", reply_to=document["message"]))
        await photos(telegram, 2)
        done = await finished(app, 2)
    assert [(r["prompt"], r["status"]) for r in done] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]
    assert sent_image(fal, 0) == (mime, data) and sent_image(fal, 1) == (mime, data)


async def test_largest_photo_size_that_fits_is_used(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """Of the sizes Telegram offers, the largest one under the 20 MB download limit is edited."""
    small = make_image(64, 48, (1, 2, 3))
    medium = make_image(128, 96, (4, 5, 6))
    small_id, medium_id = telegram.add_file(small), telegram.add_file(medium)
    huge_id = telegram.add_file(make_image(8, 8), file_size=25_000_000)
    sizes = [
        (small_id, 64, 48, len(small)),
        (medium_id, 128, 96, len(medium)),
        (huge_id, 8000, 6000, 25_000_000),
    ]
    async with bot() as app:
        telegram.push_update(updates.photo_message(huge_id, sizes=sizes, caption="/edit x"))
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["input_file_id"] == medium_id
    assert (row["input_width"], row["input_height"]) == (128, 96)
    assert sent_image(fal)[1] == medium


# -- the conversation -----------------------------------------------------------------------


async def test_conversation_asks_for_photo_then_instruction(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """/edit alone asks for a photo, then for the instruction, then edits."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    async with bot() as app:
        telegram.push_update(updates.command("/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(photo_upd(file_id))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        assert jobs(app) == []
        instruction = updates.text_message("turn it into a watercolor")
        telegram.push_update(instruction)
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded" and row["prompt"] == "turn it into a watercolor"
    assert row["input_file_id"] == file_id
    assert sent_image(fal) == ("image/png", png)
    assert "Editing… (job 1)" in [m.text for m in telegram.messages(CHAT, include_deleted=True)]
    assert telegram.photos(CHAT)[0].reply_to_message_id == instruction["message"]["message_id"]
    assert texts.PHOTO_HINT not in telegram.texts(CHAT)  # the photo was taken, not hinted at


async def test_conversation_with_instruction_first(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """/edit make it red alone asks only for the photo, then edits with that instruction."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(updates.command("/edit make it red"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(photo_upd(file_id))
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded" and row["prompt"] == "make it red"
    assert texts.EDIT_ASK_INSTRUCTION not in telegram.texts(CHAT)
    assert [s.params["prompt"] for s in fal.submits] == ["make it red"]


async def test_conversation_cancel(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """/cancel ends the conversation: the next photo is just a photo, no job is made."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(updates.command("/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(updates.command("/cancel"))
        await texts_seen(telegram, texts.EDIT_CANCELED)
        telegram.push_update(photo_upd(file_id))
        await texts_seen(telegram, texts.PHOTO_HINT)
        assert jobs(app) == []
    assert fal.submits == []
    assert texts.NOTHING_TO_CANCEL not in telegram.texts(CHAT)


async def test_conversation_cancel_while_waiting_for_instruction(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """/cancel after the photo drops it: the next text gets the help, not an edit."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(updates.command("/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(photo_upd(file_id))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        telegram.push_update(updates.command("/cancel"))
        await texts_seen(telegram, texts.EDIT_CANCELED)
        later = updates.text_message("make it blue")
        telegram.push_update(later)
        await settle(app, later)
        assert jobs(app) == []
    assert fal.submits == []


async def test_conversation_times_out(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """Left waiting past edit.conversation_timeout_s, the bot says so and forgets the photo."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot(edit={"conversation_timeout_s": 1}) as app:
        telegram.push_update(updates.command("/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(photo_upd(file_id))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        await texts_seen(telegram, texts.EDIT_TIMED_OUT)
        later = updates.text_message("make it blue")
        telegram.push_update(later)
        await settle(app, later)
        assert jobs(app) == []
    assert fal.submits == []


async def test_conversation_hints_at_wrong_kinds(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """Text while a photo is awaited, or a sticker at any point, gets a hint, and the
    conversation carries on to an edit."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(updates.command("/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(updates.text_message("here it comes"))
        await texts_seen(telegram, texts.EDIT_WRONG_KIND)
        telegram.push_update(updates.sticker_message())
        await texts_seen(telegram, texts.EDIT_UNSUPPORTED_MEDIA)
        telegram.push_update(photo_upd(file_id))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        telegram.push_update(updates.video_message())
        await texts_seen(telegram, texts.EDIT_UNSUPPORTED_MEDIA, times=2)
        assert jobs(app) == []
        telegram.push_update(updates.text_message("make it blue"))
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded" and row["prompt"] == "make it blue"
    assert len(fal.submits) == 1


# -- input checks ---------------------------------------------------------------------------


async def test_photo_over_20_mb_is_refused_without_a_job(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A photo (or file) over Telegram's 20 MB bot download limit gets a clear reply, no job,
    and no download attempt."""
    file_id = telegram.add_file(make_image(64, 48), file_size=25_000_000)
    async with bot() as app:
        telegram.push_update(
            updates.photo_message(
                file_id, sizes=[(file_id, 6000, 4000, 25_000_000)], caption="/edit x"
            )
        )
        await texts_seen(telegram, texts.EDIT_FILE_TOO_BIG)
        document = updates.document_message(
            file_id, "image/png", "big.png", 25_000_000, caption="/edit x"
        )
        telegram.push_update(document)
        await texts_seen(telegram, texts.EDIT_FILE_TOO_BIG, times=2)
        assert jobs(app) == []
    assert fal.submits == []
    assert telegram.calls_of("getFile") == [] and telegram.file_downloads == []


async def test_file_telegram_says_is_over_20_mb_fails_the_job(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """If Telegram's getFile says the file is too big (the update claimed less), the job fails
    with a clear message and nothing reaches fal."""
    file_id = telegram.add_file(make_image(64, 48), file_size=25_000_000)
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
        await told(telegram, "job 1 failed: that image is too large")
    assert (row["status"], row["error_code"]) == ("failed", "too_large")
    assert fal.submits == []


@pytest.mark.parametrize(
    ("mime", "name"), [("application/pdf", "doc.pdf"), ("image/png", "fake.png")]
)
async def test_file_that_is_not_an_image_fails(
    bot, telegram: FakeTelegram, fal: FakeFal, mime: str, name: str
) -> None:
    """Bytes that are not an image fail the job (not_an_image) whatever the MIME type says."""
    file_id = telegram.add_file(b"hello")
    async with bot() as app:
        telegram.push_update(updates.document_message(file_id, mime, name, 5, caption="/edit x"))
        (row,) = await finished(app)
        await told(telegram, "job 1 failed")
    assert (row["status"], row["error_code"]) == ("failed", "not_an_image")
    assert fal.submits == []
    assert telegram.photos(CHAT) == []
    failure = next(t for t in telegram.texts(CHAT) if "job 1 failed" in t)
    assert "isn't a JPEG, PNG or WebP image" in failure


async def test_decompression_bomb_is_refused(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """A tiny PNG claiming 30000x30000 pixels fails as too_many_pixels, never decoded or sent."""
    bomb = png_claiming(30_000, 30_000)
    file_id = telegram.add_file(bomb)
    async with bot() as app:
        telegram.push_update(
            updates.document_message(
                file_id, "image/png", "bomb.png", len(bomb), caption="/edit x"
            )
        )
        (row,) = await finished(app)
        await told(telegram, "too many pixels")
    assert (row["status"], row["error_code"]) == ("failed", "too_many_pixels")
    assert fal.submits == []


async def test_image_over_max_pixels_is_refused(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """media.max_pixels is the operator's pixel limit for edit inputs."""
    file_id = telegram.add_file(make_image(200, 100))
    async with bot(media={"max_pixels": 10_000}) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "too_many_pixels")
    assert fal.submits == []


async def test_stickers_animations_and_videos_are_refused(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """/edit on a sticker, GIF, video or video note (by reply or caption) says only still
    photos can be edited, and makes no job."""
    sticker = updates.sticker_message()
    video = updates.video_message()
    animation = updates.animation_message()
    note = updates.text_message("")
    note["message"].pop("text")
    note["message"]["video_note"] = {
        "file_id": "note-1",
        "file_unique_id": "note-1-u",
        "length": 240,
        "duration": 3,
    }
    pushes = [
        updates.command("/edit make it blue", reply_to=sticker["message"]),
        updates.command("/edit make it blue", reply_to=video["message"]),
        updates.command("/edit make it blue", reply_to=animation["message"]),
        updates.command("/edit make it blue", reply_to=note["message"]),
        updates.animation_message(caption="/edit make it blue"),
        updates.video_message(caption="/edit make it blue"),
        updates.video_message(caption="/edit@imagebot_test_bot make it blue", chat_id=GROUP),
    ]
    async with bot() as app:
        for update in pushes:
            telegram.push_update(update)
        await texts_seen(telegram, texts.EDIT_UNSUPPORTED_MEDIA, times=6)
        await texts_seen(telegram, texts.EDIT_UNSUPPORTED_MEDIA, chat=GROUP)
        await settle(app, pushes[-1])
        assert jobs(app) == []
    assert fal.submits == []
    assert telegram.calls_of("getFile") == []


# -- SSRF: what fal (or Replicate) names as its output is fetched only under the guard ------


async def test_loopback_outputs_refused_with_default_media_config(
    bot, telegram: FakeTelegram, fal: FakeFal, connections: list[Any]
) -> None:
    """With the shipped media settings, fal outputs on 127.0.0.1 are refused (blocked_address),
    nothing is downloaded, and the user is told."""
    file_id = telegram.add_file(make_image(64, 48))
    media = {"allowed_hosts": DEFAULT_HOSTS, "allowed_private_networks": []}
    async with bot(media=media) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
        await told(telegram, "job 1 failed: the image service returned a file I'm not allowed")
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "is not on media.allowed_hosts" in row["error_message"]
    assert fal.calls_of("file") == [] and set(fal.downloads.values()) == {0}
    assert telegram.photos(CHAT) == []


async def test_loopback_host_allowed_but_not_its_network_is_refused(
    bot, telegram: FakeTelegram, fal: FakeFal, connections: list[Any]
) -> None:
    """127.0.0.1 on the host allowlist is still refused by the address filter unless its
    network is listed in media.allowed_private_networks."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot(media={"allowed_hosts": ["127.0.0.1"], "allowed_private_networks": []}) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "non-public address 127.0.0.1" in row["error_message"]
    assert fal.calls_of("file") == []


@pytest.mark.parametrize(
    "base",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://169.254.169.254/latest",
        "http://10.0.0.1/outputs",
        "https://[fd00::1]/outputs",
        "http://[::ffff:127.0.0.1]:{port}/files",
        "http://[::ffff:169.254.169.254]/x",
    ],
)
async def test_private_output_urls_refused_without_connecting(
    bot, telegram: FakeTelegram, fal: FakeFal, connections: list[Any], base: str
) -> None:
    """fal outputs naming metadata, private or mapped-loopback addresses are refused by the
    address filter before any socket opens: no connect was attempted and nothing was served."""
    fal.output_url_base = base.format(port=fal.port)
    file_id = telegram.add_file(make_image(64, 48))
    literals = ["169.254.169.254", "10.0.0.1", "fd00::1", "::ffff:127.0.0.1"]
    literals.append("::ffff:169.254.169.254")
    media = {"allowed_hosts": literals, "allowed_private_networks": ["127.0.0.1/32"]}
    async with bot(media=media) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "non-public address" in row["error_message"]
    assert json.loads(row["output_urls"])[0].startswith(base.format(port=fal.port))
    assert fal.calls_of("file") == []
    assert {a[0] for a in connections} == {"127.0.0.1"}  # only the fakes were ever dialled


async def test_redirect_to_loopback_is_refused(
    bot, telegram: FakeTelegram, fal: FakeFal, connections: list[Any]
) -> None:
    """An allowed output host (127.0.0.2) answering 302 to 127.0.0.1 is refused at the hop,
    and the 127.0.0.1 target receives nothing."""
    file_id = telegram.add_file(make_image(64, 48))
    async with Origin("127.0.0.2") as outputs, Origin("127.0.0.1") as inner:
        outputs.redirect_to = f"{inner.url}/img.png"
        fal.output_url_base = f"{outputs.url}/away?to="
        media = {
            "allowed_hosts": ["127.0.0.2", "127.0.0.1"],
            "allowed_private_networks": ["127.0.0.2/32"],
        }
        async with bot(media=media) as app:
            telegram.push_update(photo_upd(file_id, "/edit x"))
            (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "non-public address 127.0.0.1" in row["error_message"]
    assert len(outputs.calls_of("away")) == 1
    assert inner.calls == []
    assert not connected_to([a for a in connections if a[1] == inner.port], "127.0.0.1")


async def test_outputs_by_name_are_pinned_and_rebinding_refused(
    make_settings: SettingsFactory, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """An output host name on the default allowlist is resolved once and dialled at that
    address (here the fake, via a stub resolver); a name that also resolves to a private
    address (DNS rebinding) is refused."""
    answers: dict[str, list[str]] = {"v3.fal.media": ["127.0.0.1"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    fal.output_url_base = f"http://v3.fal.media:{fal.port}/files"
    file_id = telegram.add_file(make_image(64, 48))
    settings = make_settings(
        media={"allowed_hosts": DEFAULT_HOSTS, "allowed_private_networks": ["127.0.0.1/32"]}
    )
    async with running(settings, resolver) as app:
        telegram.push_update(photo_upd(file_id, "/edit first"))
        await photos(telegram, 1)
        answers["v3.fal.media"] = ["127.0.0.1", "10.0.0.1"]
        telegram.push_update(photo_upd(file_id, "/edit second"))
        done = await finished(app, 2)
    assert [(r["status"], r["error_code"]) for r in done] == [
        ("succeeded", None),
        ("failed", "blocked_address"),
    ]
    assert "non-public address 10.0.0.1" in done[1]["error_message"]
    (download,) = fal.calls_of("file")
    assert download.headers["Host"] == f"v3.fal.media:{fal.port}"


@pytest.mark.parametrize("base", ["http://169.254.169.254/x", "http://10.0.0.1/x"])
async def test_replicate_outputs_go_through_the_same_guard(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, connections: list[Any], base: str
) -> None:
    """Replicate outputs naming private addresses are refused the same way, without a connect."""
    replicate.output_url_base = base
    media = {"allowed_hosts": ["169.254.169.254", "10.0.0.1"], "allowed_private_networks": []}
    async with bot(media=media) as app:
        telegram.push_update(updates.command("/generate a red fox"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "non-public address" in row["error_message"]
    assert replicate.calls_of("file") == []
    assert {a[0] for a in connections} == {"127.0.0.1"}


async def test_replicate_redirect_to_loopback_is_refused(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, connections: list[Any]
) -> None:
    """A Replicate output host redirecting to 127.0.0.1 is refused at the hop."""
    async with Origin("127.0.0.2") as outputs, Origin("127.0.0.1") as inner:
        outputs.redirect_to = f"{inner.url}/img.png"
        replicate.output_url_base = f"{outputs.url}/away?to="
        media = {
            "allowed_hosts": ["127.0.0.2", "127.0.0.1"],
            "allowed_private_networks": ["127.0.0.2/32"],
        }
        async with bot(media=media) as app:
            telegram.push_update(updates.command("/generate a red fox"))
            (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "blocked_address")
    assert "non-public address 127.0.0.1" in row["error_message"]
    assert len(outputs.calls_of("away")) == 1 and inner.calls == []


# -- the fal queue protocol as the bot uses it ----------------------------------------------


async def test_failed_fal_request_fails_the_job(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """A content-policy refusal from fal fails the job with the safety message."""
    fal.outcome = "failed"
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
        await told(telegram, "job 1 failed")
    assert (row["status"], row["error_code"]) == ("failed", "safety")
    assert len(fal.submits) == 1
    assert any("safety filter" in t for t in telegram.texts(CHAT))


@pytest.mark.parametrize(("status", "submits"), [(500, 1), (502, 2), (503, 2)])
async def test_submit_error_is_resent_only_when_nothing_was_queued(
    bot, telegram: FakeTelegram, fal: FakeFal, status: int, submits: int
) -> None:
    """A 502/503 naming no fal request came from the ingress: sent again and delivered; a 500
    naming none may have queued a paid request that cannot be looked up: never sent again."""
    fal.fail_next("submit", status, {"detail": "upstream trouble"})
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert row["status"] == ("failed" if submits == 1 else "succeeded")
    assert len(fal.submits) == submits and len(fal.requests) == submits - 1


async def test_submit_without_answer_is_not_resent(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A submit that times out may exist at fal: it fails as submit_unknown, sent only once."""
    fal.delay_next("submit", 1.5)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot(fal={"request_timeout_s": 0.3}) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "submit_unknown")
    assert len(fal.submits) == 1


async def test_rate_limited_submit_is_retried(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """A 429 means fal did not take the request, so it is sent again and succeeds."""
    fal.fail_next("submit", 429, {"detail": "Too many requests"}, {"Retry-After": "0"})
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded"
    assert len(fal.submits) == 2 and len(fal.requests) == 1


async def test_resumed_edit_fetches_its_request_instead_of_resubmitting(
    make_settings: SettingsFactory, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """Stopped while fal works, the bot on restart polls the saved request id and delivers it:
    one submit, one photo."""
    fal.latency_s = 1.5
    settings = make_settings()
    file_id = telegram.add_file(make_image(64, 48))
    async with running(settings) as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        await wait_until(lambda: bool(jobs(app) and jobs(app)[0]["provider_request_id"]), 5)
    (row,) = jobs(app)
    assert row["status"] == "running" and row["phase"] == "submitted"
    async with running(settings) as app:
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded"
    assert len(fal.submits) == 1
    assert row["provider_request_id"] == fal.last_request.id
    assert len(telegram.photos(CHAT)) == 1


async def test_cancel_reaches_fal(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """/cancel during an edit cancels the fal request (with the key, on the configured host)."""
    fal.latency_s = 5
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        await wait_until(lambda: bool(jobs(app) and jobs(app)[0]["provider_request_id"]), 5)
        telegram.push_update(updates.command("/cancel"))
        (row,) = await finished(app)
        await wait_until(lambda: len(fal.cancels) == 1, 3)
    assert row["status"] == "canceled"
    (cancel,) = fal.cancels
    assert cancel.path == f"/fal-ai/nano-banana/requests/{row['provider_request_id']}/cancel"
    assert cancel.headers["Authorization"] == f"Key {FAL_KEY}"


async def test_token_never_leaves_across_flows(
    bot, telegram: FakeTelegram, fal: FakeFal, tmp_path: Path, log_output: io.StringIO
) -> None:
    """Across caption, reply, conversation and a failed edit, the bot token appears nowhere in
    what fal received, the database files, the ops API or the logs."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    junk_id = telegram.add_file(b"not an image at all")
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit one"))
        original = photo_upd(file_id)
        telegram.push_update(original)
        telegram.push_update(updates.command("/edit two", reply_to=original["message"]))
        await photos(telegram, 2)
        telegram.push_update(updates.command("/edit three"))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO)
        telegram.push_update(photo_upd(file_id))
        await photos(telegram, 3)
        telegram.push_update(
            updates.document_message(junk_id, "image/png", "x.png", 19, caption="/edit four")
        )
        done = await finished(app, 4)
        await assert_token_stayed_home(app, fal)
    assert [r["status"] for r in done] == ["succeeded"] * 3 + ["failed"]
    assert len(fal.submits) == 3
    for n in range(3):
        assert sent_image(fal, n) == ("image/png", png)
    target = db_path(app)
    if is_pg(target):  # the server's files are not ours to read: every row, as a dump has
        assert "jobs: (" in dump(target)
        no_token_in(dump(target), "the database")
        files_without_token(tmp_path)
    else:
        assert "imagebot.db" in files_without_token(tmp_path)
    assert '"job_failed"' in log_output.getvalue()  # the logs really were captured
    no_token_in(log_output.getvalue(), "the logs")


async def test_instruction_is_asked_when_missing(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A photo captioned just /edit, or a bare /edit replying to a photo, asks what to change."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit"))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION)
        telegram.push_update(updates.text_message("make it blue"))
        await photos(telegram, 1)
        original = photo_upd(file_id)
        telegram.push_update(original)
        telegram.push_update(updates.command("/edit", reply_to=original["message"]))
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION, times=2)
        telegram.push_update(updates.text_message("make it green"))
        await photos(telegram, 2)
        done = await finished(app, 2)
    assert [(r["prompt"], r["status"]) for r in done] == [
        ("make it blue", "succeeded"),
        ("make it green", "succeeded"),
    ]
    assert all(r["input_file_id"] == file_id for r in done)


async def test_group_conversation_uses_forced_replies(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """In a group the questions are forced replies (privacy mode lets the answers through), and
    the conversation ends in an edit there."""
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(updates.command("/edit@imagebot_test_bot", chat_id=GROUP))
        await texts_seen(telegram, texts.EDIT_ASK_PHOTO, chat=GROUP)
        ask_photo = telegram.messages(GROUP)[-1]
        telegram.push_update(
            photo_upd(file_id, chat_id=GROUP, reply_to=updates.bot_message_dict(ask_photo))
        )
        await texts_seen(telegram, texts.EDIT_ASK_INSTRUCTION, chat=GROUP)
        ask_text = telegram.messages(GROUP)[-1]
        telegram.push_update(
            updates.text_message(
                "make it blue", chat_id=GROUP, reply_to=updates.bot_message_dict(ask_text)
            )
        )
        await photos(telegram, 1, chat=GROUP)
        (row,) = await finished(app)
    assert (row["chat_id"], row["prompt"], row["status"]) == (GROUP, "make it blue", "succeeded")
    for question in (ask_photo, ask_text):
        assert question.reply_markup is not None
        assert question.reply_markup.get("force_reply") is True


async def test_telegram_download_blip_is_retried(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A 502 while downloading the photo from Telegram is retried and the edit succeeds."""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    telegram.fail_next("fileDownload", 502, b"Bad Gateway")
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        await photos(telegram, 1)
        (row,) = await finished(app)
    assert row["status"] == "succeeded"
    assert len(telegram.calls_of("fileDownload")) == 2
    assert sent_image(fal)[1] == png


async def test_photo_telegram_no_longer_serves_fails_clearly(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A photo Telegram answers 404 for fails as input_unavailable at once, with a clear reply."""
    file_id = telegram.add_file(make_image(64, 48))
    telegram.fail_next("fileDownload", 404, {"ok": False, "error_code": 404, "description": "x"})
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
        await told(telegram, "job 1 failed")
    assert (row["status"], row["error_code"]) == ("failed", "input_unavailable")
    assert len(telegram.calls_of("fileDownload")) == 1
    assert any("Telegram no longer has that photo" in t for t in telegram.texts(CHAT))
    assert fal.submits == []


async def test_stray_non_image_file_gets_a_hint(bot, telegram: FakeTelegram) -> None:
    """A PDF sent on its own is told what can be edited; a stray photo gets the /edit hint."""
    async with bot() as app:
        pdf = updates.document_message("pdf-1", "application/pdf", "a.pdf", 100)
        telegram.push_update(pdf)
        await texts_seen(telegram, texts.EDIT_NOT_IMAGE_FILE)
        await settle(app, pdf)
        assert jobs(app) == []


async def test_unusable_request_id_from_fal_fails_without_resubmitting(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A submit answer whose request_id is not an id (it would be pasted into our URLs) fails
    the job as a bad response; it is not sent again."""
    fal.fail_next("submit", 200, {"request_id": "../../storage/auth/token"})
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", "bad_response")
    assert len(fal.submits) == 1
    assert [c.op for c in fal.calls] == ["submit"]


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (422, {"detail": [{"type": "content_policy_violation", "msg": "nsfw"}]}, "safety"),
        (422, {"detail": [{"type": "value_error", "msg": "image too small"}]}, "model_error"),
        (404, {"detail": "Request not found"}, "model_error"),
        (200, b"<html>not json</html>", "model_error"),
    ],
)
async def test_fal_refusing_the_result_fails_the_job_once(
    bot, telegram: FakeTelegram, fal: FakeFal, status: int, body: Any, code: str
) -> None:
    """A completed request whose result fal refuses (or answers unreadably) fails the job with
    a fitting code after one result call; the user is told."""
    fal.fail_next("result", status, body, times=10)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
        await wait_until(lambda: any("job 1 failed" in t for t in telegram.texts(CHAT)))
    assert (row["status"], row["error_code"]) == ("failed", code)
    assert len(fal.calls_of("result")) == 1 and len(fal.submits) == 1


async def test_fal_result_answering_503_is_asked_again(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """A 503 to the result call is worth another try: the result is fetched again and sent."""
    fal.fail_next("result", 503, {"detail": "busy"})
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert row["status"] == "succeeded"
    assert len(fal.calls_of("result")) == 2 and len(fal.submits) == 1


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"status": "FAILED", "error": "runner crashed"}, "model_error"),
        ({"status": "FAILED", "error": "flagged by the safety checker"}, "safety"),
        ({"status": "SOMETHING_NEW"}, "bad_response"),
    ],
)
async def test_unexpected_fal_statuses_fail_the_job(
    bot, telegram: FakeTelegram, fal: FakeFal, answer: dict[str, Any], code: str
) -> None:
    """A status fal's docs don't list ends the job as failed with a fitting code, not a hang."""
    fal.fail_next("status", 200, answer, times=10)
    file_id = telegram.add_file(make_image(64, 48))
    async with bot() as app:
        telegram.push_update(photo_upd(file_id, "/edit x"))
        (row,) = await finished(app)
    assert (row["status"], row["error_code"]) == ("failed", code)
    assert len(fal.submits) == 1 and fal.calls_of("result") == []
