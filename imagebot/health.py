"""Liveness from the event loop itself: a heartbeat that measures loop lag and, under systemd,
sends READY/WATCHDOG/STOPPING datagrams to $NOTIFY_SOCKET (no compiled dependency needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from imagebot.logs import get_logger

log = get_logger(__name__)

_BEAT_S = 1.0


def sd_notify(message: str) -> bool:
    """Send one sd_notify message; False when not running under systemd's notify protocol."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec, if the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class Heartbeat:
    """Beats every second on the loop; `lag_s` is how late the last beat ran."""

    def __init__(self) -> None:
        self.last_beat = time.monotonic()
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._watchdog = watchdog_interval_s()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def is_responsive(self, max_lag_s: float = 5.0) -> bool:
        return time.monotonic() - self.last_beat < max_lag_s + _BEAT_S and self.lag_s < max_lag_s

    async def _run(self) -> None:
        last_watchdog = 0.0
        while True:
            expected = time.monotonic() + _BEAT_S
            await asyncio.sleep(_BEAT_S)
            now = time.monotonic()
            self.lag_s = max(0.0, now - expected)
            self.last_beat = now
            if self._watchdog and now - last_watchdog >= self._watchdog:
                sd_notify("WATCHDOG=1")
                last_watchdog = now
