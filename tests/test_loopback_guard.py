"""The test suite's own safety net: nothing but loopback can be resolved or dialled."""

from __future__ import annotations

import socket

import httpx
import pytest


async def test_non_loopback_is_refused_before_any_packet() -> None:
    """DNS names and addresses off this machine are refused by conftest's guard, so a
    misconfigured test fails instead of sending traffic out."""
    with pytest.raises(OSError, match="loopback-only"):
        socket.getaddrinfo("api.telegram.org", 443)
    sock = socket.socket()
    try:
        with pytest.raises(OSError, match="loopback-only"):
            sock.connect(("10.0.0.1", 80))
    finally:
        sock.close()
    async with httpx.AsyncClient() as client:
        for url in ("https://api.telegram.org/", "http://169.254.169.254/", "http://[fd00::1]/"):
            with pytest.raises(httpx.ConnectError):
                await client.get(url)


def test_loopback_still_works() -> None:
    """Loopback names and addresses resolve as usual."""
    assert socket.getaddrinfo("127.0.0.1", 80)
    assert socket.getaddrinfo("localhost", 80)
