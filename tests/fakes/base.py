"""Shared machinery of the vendor fakes: a real aiohttp server on 127.0.0.1, a call log, faults.

Every fake is a real HTTP server that the production code reaches through its real client
(PTB's Bot, the replicate client, our fal client). Tests script it with `fail_next` and
`delay_next` and read back what it received from `calls`.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import ClientTimeout, web

from imagebot.config import is_loopback_host

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One request the fake received."""

    op: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    params: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


@dataclass
class Fault:
    """A scripted answer for the next `times` calls of one operation."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


class FakeServer:
    """Base of the fakes: start/stop on an OS-picked loopback port, record calls, inject faults."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.calls: list[Call] = []
        self._faults: dict[str, list[Fault]] = {}
        self._delays: dict[str, list[float]] = {}
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        # completion callbacks the fake made (the vendors' webhooks): (url, HTTP status or 0)
        self.callbacks: list[tuple[str, int]] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.callbacks_enabled = True
        # serve https with this context when set (before start); `url` says https then
        self.ssl_context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self, port: int = 0) -> FakeServer:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for task in list(self._callback_tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def call_back_when(
        self, url: str, done_at: Callable[[], float], body: Callable[[], dict[str, Any]]
    ) -> None:
        """POST `body()` to `url` once the wall clock passes `done_at()`, as the vendors call
        a request's webhook. Loopback only."""
        if not self.callbacks_enabled:
            return
        host = urlsplit(url).hostname or ""
        if not is_loopback_host(host):
            raise ValueError(f"the fakes only call back loopback URLs, not {host!r}")

        async def call() -> None:
            await asyncio.sleep(max(0.0, done_at() - time.time()))
            status = 0
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(url, json=body(), timeout=ClientTimeout(5)) as resp,
                ):
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.callbacks.append((url, status))

        task = asyncio.get_running_loop().create_task(call())
        self._callback_tasks.add(task)
        task.add_done_callback(self._callback_tasks.discard)

    # -- scripting -----------------------------------------------------------------------

    def fail_next(
        self,
        op: str,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `op` with `status` and `body` (JSON if not bytes)."""
        self._faults.setdefault(op, []).append(Fault(status, body, dict(headers or {}), times))

    def clear_faults(self, op: str | None = None) -> None:
        """Drop the scripted faults of `op` (of every operation when None): the vendor is back."""
        if op is None:
            self._faults.clear()
        else:
            self._faults.pop(op, None)

    def delay_next(self, op: str, seconds: float, times: int = 1) -> None:
        """Hold the next `times` calls of `op` for `seconds` before answering."""
        self._delays.setdefault(op, []).extend([seconds] * times)

    def take_fault(self, op: str) -> Fault | None:
        queue = self._faults.get(op)
        if not queue:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        return fault

    async def apply_delay(self, op: str) -> None:
        queue = self._delays.get(op)
        if queue:
            await asyncio.sleep(queue.pop(0))

    @staticmethod
    def fault_response(fault: Fault) -> web.Response:
        if isinstance(fault.body, bytes):
            return web.Response(status=fault.status, body=fault.body, headers=fault.headers)
        if fault.body is None:
            return web.Response(status=fault.status, headers=fault.headers)
        return web.json_response(fault.body, status=fault.status, headers=fault.headers)

    def record(self, op: str, request: web.Request, body: bytes, **params: Any) -> Call:
        call = Call(op, request.method, request.path_qs, dict(request.headers), body, params)
        self.calls.append(call)
        return call

    def calls_of(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]

    async def wait_for(
        self, predicate: Callable[[], bool], within: float = 10.0, interval: float = 0.02
    ) -> None:
        """Wait until `predicate()` holds; fail with a clear message after `within` seconds."""
        await wait_until(predicate, within, interval)


async def wait_until(
    predicate: Callable[[], bool], within: float = 10.0, interval: float = 0.02
) -> None:
    """Bounded poll until `predicate()` holds (never a fixed sleep)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def serve_until_signalled(
    start: Callable[[], Awaitable[str]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Standalone fakes: start, print the line `start` returns (where to reach them), serve
    until SIGINT or SIGTERM, stop."""
    sys.stdout.write(await start() + "\n")
    sys.stdout.flush()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        await stop()
