"""A job taken over from stopped processes too often (`cluster.max_rescues`): failed at its
vendor and told, unless its images are made, which are delivered (issue 16). The rows are
written as a process that died would leave them: running, without an owner, its rescues
counted; this bot adopts them at its next claim."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import aiohttp

from imagebot.clock import iso, utcnow
from imagebot.results import image_of
from tests import updates
from tests.conftest import REPLICATE_TOKEN
from tests.crash_harness import write
from tests.fakes.base import wait_until
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import query

CHAT = updates.DEFAULT_CHAT_ID
MAX_RESCUES = 2
SETTINGS: dict[str, Any] = {"cluster": {"max_rescues": MAX_RESCUES}}


def job_row(app: Any) -> Any:
    (row,) = query(str(app.services.settings.storage.database), "SELECT * FROM jobs")
    return row


async def left_by_a_dead_process(app: Any, phase: str, **columns: Any) -> int:
    """A running `generate` job in `phase`, ownerless, taken over one time too many."""
    now = iso(utcnow())
    values: dict[str, Any] = {
        "kind": "generate",
        "status": "running",
        "phase": phase,
        "update_id": updates.next_update_id(),
        "chat_id": CHAT,
        "user_id": CHAT,
        "chat_type": "private",
        "command_message_id": 7,
        "prompt": "a lighthouse",
        "provider": "replicate",
        "params": json.dumps({"num_outputs": 1}),
        "attempts": 1,
        "rescues": MAX_RESCUES + 1,
        "created_at": now,
        "started_at": now,
        "submitted_at": now,
        "deadline_at": iso(utcnow() + timedelta(days=1)),  # far off: no sweep ends it
        "updated_at": now,
        **columns,
    }
    sql = (
        f"INSERT INTO jobs ({', '.join(values)})"  # noqa: S608 - the test's own column names
        f" VALUES ({', '.join('?' for _ in values)})"
    )
    db = str(app.services.settings.storage.database)
    (job_id,) = await asyncio.to_thread(write, db, [(sql, tuple(values.values()))])
    return int(job_id)


async def test_a_job_rescued_too_often_is_failed_at_its_vendor_and_told(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Submitted and taken over once more than allowed: its prediction is canceled, the job
    ends failed (rescued_too_often), the user is told once, and nothing is created again."""
    replicate.next_behaviours.append({"latency_s": 600})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{replicate.url}/v1/models/black-forest-labs/flux-schnell/predictions",
            json={"input": {"prompt": "a lighthouse"}},
            headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"},
        ) as resp,
    ):
        prediction_id = str((await resp.json())["id"])
    async with bot(**SETTINGS) as app:
        job_id = await left_by_a_dead_process(app, "submitted", provider_request_id=prediction_id)
        await wait_until(lambda: job_row(app)["status"] == "failed", within=15)
        told = f"Sorry, job {job_id} failed"
        await wait_until(lambda: any(t.startswith(told) for t in telegram.texts(CHAT)))
        row = job_row(app)
    assert row["error_code"] == "rescued_too_often"
    assert replicate.predictions[prediction_id].canceled
    assert len(replicate.creates) == 1  # the test's own
    assert len([t for t in telegram.texts(CHAT) if t.startswith(told)]) == 1
    assert telegram.photos(CHAT) == []


async def test_a_job_with_made_images_is_delivered_however_often_it_was_rescued(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Its images made (and maybe sent once already, by the process that died): the result is
    delivered, the job succeeds, and no failure is told (a user holding the photo was told
    'failed' before)."""
    async with bot(**SETTINGS) as app:
        # saved under the id the job row gets next (the first of a fresh database)
        names = await app.services.results.save(1, [image_of(make_image(64, 64))])
        job_id = await left_by_a_dead_process(
            app,
            "delivering",
            provider_request_id="p-made",
            result_paths=json.dumps(names),
            delivery_attempts=0,
        )
        assert job_id == 1
        await wait_until(lambda: job_row(app)["status"] == "succeeded", within=15)
        row = job_row(app)
    assert row["phase"] == "done"
    photos = telegram.photos(CHAT)
    assert len(photos) == 1 and photos[0].caption == "a lighthouse"
    assert not any(t.startswith(f"Sorry, job {job_id} failed") for t in telegram.texts(CHAT))
    assert replicate.creates == [] and replicate.cancels == []
