"""Serve an aiohttp application from its own thread and event loop.

The webhook listener runs here so that Telegram's acknowledgement (commit the update, answer
200) never waits in the main loop's queue behind job work: under load the main loop is busy
talking to providers and Telegram, and every step of a request handled there would wait for
all of that. The handler may only touch thread-safe things (the writer thread of the store,
prometheus counters, `loop.call_soon_threadsafe` towards the main loop).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading

from aiohttp import web

from imagebot.errors import StartupError
from imagebot.logs import get_logger

log = get_logger(__name__)

_WHY = {
    errno.EADDRINUSE: "the address is already in use (another program, or another imagebot)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "that address does not belong to this machine",
}


class ListenError(Exception):
    """A listening socket could not be opened on host:port; `why` says so in words."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        self.host = host
        self.port = port
        unresolved = isinstance(exc, socket.gaierror)
        self.why = (
            "the host name does not resolve"
            if unresolved
            else _WHY.get(exc.errno or 0, exc.strerror or str(exc))
        )
        # Which setting to change: the address when it is not one of ours, else the port.
        self.setting = "listen" if unresolved or exc.errno == errno.EADDRNOTAVAIL else "port"
        super().__init__(f"cannot listen on {host}:{port}: {self.why}")

    def for_section(self, section: str) -> StartupError:
        """The start-up error naming `<section>.port` (or `.listen`) and the address."""
        return StartupError(f"{section}.{self.setting}", str(self))


async def start_site(site: web.TCPSite, host: str, port: int) -> int:
    """Start listening; returns the port (the OS's pick when 0 was asked), or ListenError."""
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(host, port, exc) from exc
    sockets = getattr(site._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port


class ThreadedSite:
    """One aiohttp application on host:port, served by a dedicated thread."""

    def __init__(self, app: web.Application, host: str, port: int, name: str) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        """Start serving; returns once the socket listens (raises what stopped it: ListenError
        when the address cannot be had)."""
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"{self.name} did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # reported to start() on the caller's thread
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()

    async def _listen(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        self.port = await start_site(site, self.host, self.port)

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop accepting, finish open requests, and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("thread_did_not_stop", thread=self.name)
