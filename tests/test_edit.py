"""End to end /edit through the real app: photo in via Telegram, bytes to fake fal, photo out."""

from __future__ import annotations

from tests import updates
from tests.conftest import BOT_TOKEN
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.telegram_api import FakeTelegram
from tests.test_e2e import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID


async def test_caption_probe(bot, telegram: FakeTelegram, fal: FakeFal) -> None:
    """probe"""
    png = make_image(64, 48)
    file_id = telegram.add_file(png)
    async with bot() as app:
        telegram.push_update(updates.photo_message(file_id, caption="/edit make it blue", width=64, height=48))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1, within=5)
    print([ (m.kind, m.text) for m in telegram.messages(CHAT, True)])
    print([dict(r) for r in rows(db_path(app))])
    print(fal.last_request.input.keys(), fal.last_request.received_images[0] == png)
    assert BOT_TOKEN.encode() not in fal.everything_received()
