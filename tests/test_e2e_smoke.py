"""Smoke: /generate through polling reaches a photo in the chat."""

from __future__ import annotations

from tests import updates
from tests.fakes.base import wait_until


async def test_generate_polling(bot, telegram, replicate) -> None:
    """A /generate update from getUpdates ends as a photo in the same chat."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(1001)) == 1, within=10)
        job = (await app.services.store.by_status(*__import__("imagebot.models").models.JobStatus))[0]
        print(job)
        print(telegram.texts(1001))
