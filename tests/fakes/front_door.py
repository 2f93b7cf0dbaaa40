"""The bot's public address: a reverse proxy on 127.0.0.1, as nginx would stand in front of it.

A bot in webhook mode gives Telegram and the vendors one URL (`webhook.url`) that must be known
before the bot starts, while the bot itself listens on whatever port the OS gives it (port 0)
and gets a new one at every restart. `FrontDoor` holds its listening socket from construction
on (so its URL is known and nobody else can take its port), and forwards every request to the
port `upstream()` names at that moment; while that is None (the bot is down or not listening
yet) it answers 502, as a reverse proxy does, and Telegram's fake retries later.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import aiohttp
from aiohttp import web

# headers that belong to one hop and are not forwarded (RFC 9110 section 7.6.1)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}
)


class FrontDoor:
    """Forwards every request on its own loopback port to 127.0.0.1:`upstream()`."""

    def __init__(self, upstream: Callable[[], int | None]) -> None:
        self.upstream = upstream
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FrontDoor:
        if self._runner is None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, self._sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._sock.close()

    async def __aenter__(self) -> FrontDoor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        port = self.upstream()
        if port is None or self._session is None:
            return web.Response(status=502)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            async with self._session.request(
                request.method,
                f"http://127.0.0.1:{port}{request.path_qs}",
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                kept = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
                }  # (the body was read decoded)
                return web.Response(status=resp.status, body=body, headers=kept)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return web.Response(status=502)
