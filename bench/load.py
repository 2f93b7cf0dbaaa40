"""Open-loop webhook load generator, run as its own process: `python -m bench.load --spec JSON`.

It POSTs `count` Telegram updates to a webhook at a fixed `rate` (each request fires at its
scheduled time whether or not earlier ones were answered), the way Telegram does: JSON body,
the secret-token header, at most `connections` connections at once, and one update at a time
per chat. Latency is measured from each request's *scheduled* time to its response, so a
server (or client) falling behind shows up instead of being hidden (no coordinated omission);
the client's own lag (scheduled → actually sent) is reported too. Bounded: `count` requests,
each with a timeout, and the whole run within count/rate + `grace_s`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tests import updates

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name


@dataclass(frozen=True)
class Spec:
    """What to send: where, how fast, how many, and which updates."""

    url: str
    secret: str
    rate: float
    count: int
    kind: str = "generate"  # "generate" or "edit"
    tag: str = "run"
    chat_base: int = 10_000_000
    chats: int = 0  # 0: a new chat (and user) for every update
    update_base: int = 1_000_000
    file_id: str = ""  # the photo an edit works on (registered in the fake Telegram)
    connections: int = 40  # Telegram's default webhook max_connections
    timeout_s: float = 10.0
    grace_s: float = 15.0
    extra: dict[str, Any] = field(default_factory=dict)
    # several processes: request i goes to urls[i % len(urls)] (a round-robin balancer's
    # view); empty: every request goes to `url`
    urls: list[str] = field(default_factory=list)


def check_loopback(url: str) -> None:
    """Refuse any target but 127.0.0.0/8 or ::1."""
    host = urlsplit(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the benchmark only talks to loopback, not {host!r}")


def prompt_for(spec: Spec, i: int) -> str:
    """A prompt that names its request, so the fakes' records can be matched back to it."""
    return f"bench {spec.tag} {i} a red fox in the snow"


def build_update(spec: Spec, i: int) -> dict[str, Any]:
    """The i-th update of the run: /generate, or a photo captioned /edit."""
    chat = spec.chat_base + (i % spec.chats if spec.chats else i)
    update_id = spec.update_base + i
    if spec.kind == "generate":
        return updates.command(
            f"/generate {prompt_for(spec, i)}", chat_id=chat, user_id=chat, update_id=update_id
        )
    if spec.kind == "edit":
        return updates.photo_message(
            spec.file_id,
            width=64,
            height=64,
            file_size=300,
            caption=f"/edit {prompt_for(spec, i)}",
            chat_id=chat,
            user_id=chat,
            update_id=update_id,
        )
    raise ValueError(f"unknown kind {spec.kind!r}")


async def run(spec: Spec) -> dict[str, Any]:
    """Send the whole run; return per-request records and a summary."""
    for url in (spec.url, *spec.urls):
        check_loopback(url)
    if spec.count <= 0 or spec.rate <= 0:
        raise ValueError("count and rate must be positive")
    bodies = [
        (json.dumps(u).encode(), u) for u in (build_update(spec, i) for i in range(spec.count))
    ]
    headers = {"Content-Type": "application/json", SECRET_HEADER: spec.secret}
    connector = aiohttp.TCPConnector(limit=spec.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    chat_locks: dict[int, asyncio.Lock] = {}
    records: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()

    async def send(session: aiohttp.ClientSession, i: int, due: float) -> None:
        body, update = bodies[i]
        chat = update["message"]["chat"]["id"]
        lock = chat_locks.setdefault(chat, asyncio.Lock())
        async with lock:
            started = loop.time()
            wall = time.time()
            status = 0
            try:
                target = spec.urls[i % len(spec.urls)] if spec.urls else spec.url
                async with session.post(target, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            done = loop.time()
        records.append(
            {
                "i": i,
                "chat_id": chat,
                "update_id": update["update_id"],
                "status": status,
                "wall_sent": wall,
                "lag_s": started - due,
                "latency_s": done - due,
                "service_s": done - started,
            }
        )

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = loop.time()
        wall0 = time.time()
        tasks: list[asyncio.Task[None]] = []
        for i in range(spec.count):
            due = t0 + i / spec.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, i, due)))
        sent_s = loop.time() - t0
        budget = spec.count / spec.rate + spec.grace_s
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, budget - (loop.time() - t0)))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = loop.time() - t0
    records.sort(key=lambda r: r["i"])
    return {
        "spec": {k: v for k, v in spec.__dict__.items() if k != "secret"},
        "wall_start": wall0,
        "send_window_s": sent_s,
        "elapsed_s": elapsed,
        "unfinished": len(pending),
        "cpu_s": round(time.process_time() - cpu0, 3),
        "records": records,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one load as described by --spec (JSON) and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON object with the Spec fields")
    args = parser.parse_args(argv)
    spec = Spec(**json.loads(args.spec))
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
