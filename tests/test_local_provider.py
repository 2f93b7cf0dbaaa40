"""The offline `local` provider: the whole Telegram side works without vendor keys."""

from __future__ import annotations

from tests import updates
from tests.conftest import running
from tests.fakes.base import wait_until
from tests.fakes.images import image_size, make_image
from tests.fakes.telegram_api import FakeTelegram
from tests.support import db_path, rows

CHAT = updates.DEFAULT_CHAT_ID


async def test_local_provider_generates_and_edits(make_settings, telegram: FakeTelegram) -> None:
    """With generate/edit provider = local and no vendor keys, /generate and /edit both end as
    real images in the chat, and no vendor is contacted."""
    settings = make_settings(
        generate={"provider": "local"},
        edit={"provider": "local"},
        REPLICATE_API_TOKEN=None,
        FAL_KEY=None,
    )
    assert settings.replicate_api_token is None and settings.fal_key is None
    photo_id = telegram.add_file(make_image(80, 60))
    async with running(settings) as app:
        telegram.push_update(updates.command("/generate a calm lake"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(
            updates.photo_message(photo_id, width=80, height=60, caption="/edit invert it")
        )
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
    generated, edited = telegram.photos(CHAT)
    assert image_size(generated.file_bytes or b"") == (512, 512)
    assert image_size(edited.file_bytes or b"") == (80, 60)
    assert [(r["kind"], r["provider"], r["status"]) for r in rows(db_path(app))] == [
        ("generate", "local", "succeeded"),
        ("edit", "local", "succeeded"),
    ]
