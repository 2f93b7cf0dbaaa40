"""A loopback output host with the misbehaviours a vendor's file host could have (slow,
huge, endless, redirecting, gone, gzip-bombed): what GuardedFetcher is tested against."""

from __future__ import annotations

import asyncio
import contextlib
import gzip

from aiohttp import web

from tests.fakes.base import FakeServer
from tests.fakes.images import make_image

PNG = make_image(64, 48)
STREAM_CHUNKS = 512


class Origin(FakeServer):
    """A loopback HTTP server with the misbehaviours an output host could have."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.release = asyncio.Event()
        self.redirect_to: str = ""
        self.chunks_sent = 0
        r = self.app.router
        r.add_get("/img.png", self._img)
        r.add_get("/big", self._big)
        r.add_get("/stream", self._stream)
        r.add_get("/stall", self._stall)
        r.add_get("/stall-body", self._stall_body)
        r.add_get("/gone", self._status)
        r.add_get("/gone410", self._status)
        r.add_get("/broken", self._status)
        r.add_get("/r/{n}", self._hop)
        r.add_get("/away", self._away)
        r.add_get("/no-location", self._status)
        r.add_get("/gzip", self._gzip)

    async def stop(self) -> None:
        self.release.set()  # let stalled handlers end so shutdown doesn't wait on them
        await super().stop()

    async def _img(self, request: web.Request) -> web.Response:
        self.record("img", request, b"")
        return web.Response(body=PNG, content_type="image/png")

    async def _big(self, request: web.Request) -> web.Response:
        self.record("big", request, b"")
        return web.Response(body=b"\0" * 5000, content_type="image/png")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """No Content-Length: 64 KB chunks until the client hangs up (at most 32 MB)."""
        self.record("stream", request, b"")
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(STREAM_CHUNKS):
                await resp.write(b"\0" * 65536)
                self.chunks_sent += 1
        return resp

    async def _stall(self, request: web.Request) -> web.Response:
        self.record("stall", request, b"")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), 5)
        return web.Response(body=PNG, content_type="image/png")

    async def _stall_body(self, request: web.Request) -> web.StreamResponse:
        self.record("stall-body", request, b"")
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = len(PNG)
        await resp.prepare(request)
        await resp.write(PNG[:10])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), 5)
        return resp

    async def _status(self, request: web.Request) -> web.Response:
        status = {"/gone": 404, "/gone410": 410, "/broken": 500, "/no-location": 302}[request.path]
        self.record(f"status-{status}", request, b"")
        return web.Response(status=status, text="nope")

    async def _hop(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        self.record("hop", request, b"", n=n)
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        location = f"/r/{n - 1}" if n % 2 else f"{self.url}/r/{n - 1}"  # relative and absolute
        return web.Response(status=302, headers={"Location": location})

    async def _away(self, request: web.Request) -> web.Response:
        self.record("away", request, b"")
        return web.Response(status=302, headers={"Location": self.redirect_to})

    async def _gzip(self, request: web.Request) -> web.Response:
        self.record("gzip", request, b"")
        body = gzip.compress(b"\0" * 200_000)
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})
