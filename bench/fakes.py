"""The three vendor fakes in one separate process, plus control routes the benchmark reads.

`python -m bench.fakes` starts FakeTelegram, FakeReplicate and FakeFal from tests/fakes on
127.0.0.1 (OS-picked ports) and a small control server, prints one JSON line with the four
URLs, and serves until SIGTERM/SIGINT. The control routes expose what the fakes record with
their own wall-clock stamps (time.time(), one clock for all three):

- POST /reset                  forget calls, messages, predictions, files; flood limits off
- POST /configure              {"replicate_latency_s", "fal_latency_s", "latency_jitter_s",
                                "flood", "image_size"}
- POST /telegram/file          body = image bytes; answers {"file_id"} (a user's photo)
- GET  /telegram/sent          every message the bot sent: chat, method, kind, text, sent_at
- GET  /telegram/calls         every Bot API call: method, when, chat
- GET  /replicate/predictions  every prediction: prompt, created, completed_at_ts, polls, and
                               seen_done_at (the first poll that saw it finished)
- GET  /fal/requests           every edit request: the same fields
- GET  /state                  call counts per fake and operation, Telegram's 429s and why
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

from aiohttp import web

from tests.fakes.base import serve_until_signalled
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, MethodHandler, TelegramApiError

HOST = "127.0.0.1"


def _jittered(behaviour: dict[str, Any], jitter_s: float) -> dict[str, Any]:
    """A fake's next behaviour with a uniform random extra on its latency."""
    behaviour["latency_s"] = float(behaviour["latency_s"]) + random.uniform(0, jitter_s)
    return behaviour


class BenchReplicate(FakeReplicate):
    """FakeReplicate whose predictions take latency_s plus a uniform random extra, and which
    notes when a poll first saw each prediction finished (`seen_done`)."""

    latency_jitter_s = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_done: dict[str, float] = {}

    def _take_behaviour(self) -> dict[str, Any]:
        return _jittered(super()._take_behaviour(), self.latency_jitter_s)

    async def _get(self, request: web.Request) -> web.Response:
        response = await super()._get(request)
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is not None and prediction.is_final:
            self.seen_done.setdefault(prediction.id, time.time())
        return response


class BenchFal(FakeFal):
    """FakeFal whose requests take latency_s plus a uniform random extra, and which notes
    when a status poll first saw each request completed (`seen_done`)."""

    latency_jitter_s = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen_done: dict[str, float] = {}

    def _take_behaviour(self) -> dict[str, Any]:
        return _jittered(super()._take_behaviour(), self.latency_jitter_s)

    async def _status(self, request: web.Request) -> web.Response:
        response = await super()._status(request)
        job = self._lookup(request)
        now = time.time()
        if job is not None and job.status_at(now) == "COMPLETED":
            self.seen_done.setdefault(job.id, now)
        return response


class BenchTelegram(FakeTelegram):
    """FakeTelegram that also notes why each flood 429 was given (overall or per chat)."""

    def __init__(self, token: str) -> None:
        super().__init__(token=token)
        self.flood_log: list[dict[str, Any]] = []

    async def _run(self, name: str, handler: MethodHandler, params: dict[str, Any]) -> Any:
        flood = self._flood
        chat = params.get("chat_id")
        now = time.monotonic()
        last = flood.last_in_chat.get(chat) if flood and isinstance(chat, int) else None
        in_window = sum(1 for t in flood.overall if now - t < 1.0) if flood else 0
        try:
            return await super()._run(name, handler, params)
        except TelegramApiError as exc:
            if exc.code == 429:
                self.flood_log.append(
                    {
                        "method": name,
                        "chat_id": chat,
                        "sent_in_last_s": in_window,
                        "since_last_in_chat_s": None if last is None else round(now - last, 3),
                    }
                )
            raise


class BenchFakes:
    """The fakes plus the control app that scripts and reads them."""

    def __init__(self, telegram_token: str, replicate_token: str, fal_key: str) -> None:
        self.telegram = BenchTelegram(telegram_token)
        self.replicate = BenchReplicate(token=replicate_token)
        self.fal = BenchFal(key=fal_key)
        self.control = web.Application(client_max_size=64 * 1024 * 1024)
        self._runner: web.AppRunner | None = None
        self.control_url = ""
        r = self.control.router
        r.add_post("/reset", self._reset)
        r.add_post("/configure", self._configure)
        r.add_post("/telegram/file", self._add_file)
        r.add_get("/telegram/sent", self._sent)
        r.add_get("/telegram/calls", self._calls)
        r.add_get("/replicate/predictions", self._predictions)
        r.add_get("/fal/requests", self._fal_requests)
        r.add_get("/state", self._state)

    async def start(self) -> None:
        await self.telegram.start()
        await self.replicate.start()
        await self.fal.start()
        self._runner = web.AppRunner(self.control, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.control_url = f"http://{HOST}:{sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.fal.stop()
        await self.replicate.stop()
        await self.telegram.stop()

    def urls(self) -> dict[str, str]:
        """Where each fake listens."""
        return {
            "telegram": self.telegram.url,
            "replicate": self.replicate.url,
            "fal": self.fal.url,
            "control": self.control_url,
        }

    # -- control routes --------------------------------------------------------------------

    async def _reset(self, request: web.Request) -> web.Response:
        tg = self.telegram
        tg.calls.clear()
        tg.chats.clear()
        tg.files.clear()
        tg._files_by_path.clear()
        tg._by_id.clear()
        tg._bot_message_ids.clear()
        tg._chat_actions.clear()
        tg._chat_info.clear()
        tg._user_messages.clear()
        tg.flood_429s = 0
        tg.flood_log.clear()
        tg.disable_flood()
        for fake in (self.replicate, self.fal):
            fake.calls.clear()
            fake.files.clear()
        self.replicate.predictions.clear()
        self.fal.requests.clear()
        self.replicate.seen_done.clear()
        self.fal.seen_done.clear()
        return web.json_response({"ok": True})

    async def _configure(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if "replicate_latency_s" in body:
            self.replicate.latency_s = float(body["replicate_latency_s"])
            self.replicate.startup_s = min(self.replicate.startup_s, self.replicate.latency_s)
        if "fal_latency_s" in body:
            self.fal.latency_s = float(body["fal_latency_s"])
            self.fal.queue_s = min(self.fal.queue_s, self.fal.latency_s)
        if "latency_jitter_s" in body:
            self.replicate.latency_jitter_s = float(body["latency_jitter_s"])
            self.fal.latency_jitter_s = float(body["latency_jitter_s"])
        if "image_size" in body:
            size = tuple(int(v) for v in body["image_size"])
            self.replicate.image_size = (size[0], size[1])
            self.fal.image_size = (size[0], size[1])
        flood = body.get("flood")
        if flood:
            self.telegram.enforce_flood(
                overall_per_s=float(flood.get("overall_per_s", 30)),
                per_chat_per_s=float(flood.get("per_chat_per_s", 1)),
            )
        elif flood is not None:
            self.telegram.disable_flood()
        return web.json_response({"ok": True})

    async def _add_file(self, request: web.Request) -> web.Response:
        return web.json_response({"file_id": self.telegram.add_file(await request.read())})

    async def _sent(self, request: web.Request) -> web.Response:
        out = [
            {
                "chat_id": m.chat_id,
                "message_id": m.message_id,
                "method": m.method,
                "kind": m.kind,
                "text": m.text,
                "caption": m.caption,
                "sent_at": m.sent_at,
                "deleted": m.deleted,
                "edits": len(m.edits),
            }
            for msgs in self.telegram.chats.values()
            for m in msgs
        ]
        return web.json_response(out)

    async def _calls(self, request: web.Request) -> web.Response:
        out = [
            {"op": c.op, "at": c.at, "chat_id": c.params.get("chat_id")}
            for c in self.telegram.calls
        ]
        return web.json_response(out)

    async def _predictions(self, request: web.Request) -> web.Response:
        out = [
            {
                "id": p.id,
                "prompt": str(p.input.get("prompt", "")),
                "created": p.created,
                "completed_at_ts": p.completed_at_ts,
                "seen_done_at": self.replicate.seen_done.get(p.id),
                "polls": p.polls,
            }
            for p in self.replicate.predictions.values()
        ]
        return web.json_response(out)

    async def _fal_requests(self, request: web.Request) -> web.Response:
        out = [
            {
                "id": r.id,
                "prompt": str(r.input.get("prompt", "")),
                "created": r.created,
                "completed_at_ts": r.completed_at_ts,
                "seen_done_at": self.fal.seen_done.get(r.id),
                "polls": r.polls,
            }
            for r in self.fal.requests.values()
        ]
        return web.json_response(out)

    async def _state(self, request: web.Request) -> web.Response:
        def ops(calls: list[Any]) -> dict[str, int]:
            return dict(Counter(call.op for call in calls))

        return web.json_response(
            {
                "telegram": ops(self.telegram.calls),
                "replicate": ops(self.replicate.calls),
                "fal": ops(self.fal.calls),
                "flood_429s": self.telegram.flood_429s,
                "flood_log": self.telegram.flood_log[:50],
            }
        )


async def _serve(args: argparse.Namespace) -> None:
    fakes = BenchFakes(args.telegram_token, args.replicate_token, args.fal_key)

    async def start() -> str:
        await fakes.start()
        return json.dumps(fakes.urls())

    await serve_until_signalled(start, fakes.stop)


def main(argv: list[str] | None = None) -> None:
    """Serve the fakes until killed; print their URLs as one JSON line once listening."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--telegram-token", required=True)
    parser.add_argument("--replicate-token", required=True)
    parser.add_argument("--fal-key", required=True)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
