"""A truncated or corrupt photo sent for /edit is refused before any provider is paid: the user
is told the file is damaged, fal hears nothing, and the edit does not count against the day."""

from __future__ import annotations

import pytest

from tests import updates
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import damaged, noisy_image
from tests.fakes.telegram_api import FakeTelegram
from tests.support import CHAT, finished, photo_upd, told

DAMAGED = "Sorry, job 1 failed: that image file is damaged or incomplete. Please send it again."


@pytest.mark.parametrize(
    ("fmt", "how", "as_document"),
    [
        ("JPEG", "half", False),
        ("JPEG", "tail", True),
        ("JPEG", "garbage", False),
        ("PNG", "half", False),
        ("PNG", "tail", True),
    ],
    ids=[
        "jpeg-half-photo",
        "jpeg-tail-file",
        "jpeg-garbage-photo",
        "png-half-photo",
        "png-tail-file",
    ],
)
async def test_edit_of_a_broken_image_is_refused_before_fal(
    bot, telegram: FakeTelegram, fal: FakeFal, fmt: str, how: str, as_document: bool
) -> None:
    """/edit on a JPEG or PNG cut short or damaged: the chat is told the file is damaged, fal
    receives no request at all, and /usage still shows no edit used today."""
    data = damaged(noisy_image(fmt=fmt), how)
    file_id = telegram.add_file(data)
    if as_document:
        mime, name = ("image/jpeg", "a.jpg") if fmt == "JPEG" else ("image/png", "a.png")
        update = updates.document_message(file_id, mime, name, len(data), caption="/edit x")
    else:
        update = photo_upd(file_id, "/edit make it blue")
    async with bot(edit={"daily_cap": 3}) as app:
        telegram.push_update(update)
        (row,) = await finished(app)
        failure = await told(telegram, "job 1 failed")
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
    assert (row["status"], row["error_code"]) == ("failed", "broken_image")
    assert failure.startswith(DAMAGED)
    assert fal.calls == []
    assert telegram.photos(CHAT) == []
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Edit: 0 of 3 used, 3 left" in usage
