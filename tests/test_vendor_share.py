"""A vendor's request cap is the account's, not a process's (issue 16): two bots on one
PostgreSQL database pace their Replicate calls at half of `replicate.max_requests_per_s`
each once they have counted each other, so together they stay under the cap."""

from __future__ import annotations

import io
import json
from typing import Any

from tests import updates
from tests.conftest import SettingsFactory, running
from tests.fakes.base import wait_until
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram

CAP = 4.0  # replicate.max_requests_per_s
JOBS = 24


def shared_by_two(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [
        json.loads(line) for line in log.getvalue().splitlines() if "vendor_rate_shared" in line
    ]
    return [e for e in lines if e["vendor"] == "replicate" and e["processes"] == 2]


async def test_two_processes_together_keep_to_the_vendor_cap(
    make_settings: SettingsFactory,
    pg_url: str,
    telegram: FakeTelegram,
    replicate: FakeReplicate,
    log_output: io.StringIO,
) -> None:
    """24 jobs created at once across two processes: the creates reach the fake no faster
    than the cap allows for the pair (each process's bucket holds `CAP / 2` at the start),
    not at twice the cap. Polls are kept out of the way (a slow poll interval)."""
    sections: dict[str, Any] = {
        "storage": {"database": pg_url},
        "replicate": {"max_requests_per_s": CAP, "poll_interval_s": 30},
        "webhook": {"hint_safety_poll_s": 30},
        "cluster": {"heartbeat_s": 0.3, "lease_s": 6},
    }
    async with running(make_settings(**sections)), running(make_settings(**sections)):
        # each process says so once it has counted the other
        await wait_until(lambda: len(shared_by_two(log_output)) == 2, 10)
        for n in range(JOBS):
            chat = 7_000 + n  # one user each: the per-user rate limit stays out of it
            telegram.push_update(updates.command(f"/generate fox {n}", chat_id=chat, user_id=chat))
        await wait_until(lambda: len(replicate.creates) >= JOBS, 30)
        times = sorted(create.at for create in replicate.creates[:JOBS])
    burst = 2 * (CAP / 2)  # both buckets full at the start
    # shared: (24 - 4) / 4 = 5 s at least; each process at the whole cap would need 2 s
    assert times[-1] - times[0] >= (JOBS - burst) / CAP - 0.3
    assert len({c.params["input"]["prompt"] for c in replicate.creates}) == len(replicate.creates)
    assert {e["max_requests_per_s"] for e in shared_by_two(log_output)} == {CAP / 2}
