"""A real proxy on 127.0.0.1 (HTTP CONNECT and SOCKS5 on one port) and a CDN stand-in.

`FakeProxy` records every target it is asked for (`targets`, "host:port" as the client named
it) and relays bytes only to loopback targets: anything else is refused without connecting
(and listed in `refused`). With `username`/`password` set it demands them (SOCKS5
username/password auth, or `Proxy-Authorization: Basic` on CONNECT) and records what it got.

`FakeCdn` serves the output files of the vendor fakes from its own port, so a test can tell
an output download from an API call by the target the proxy saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import struct
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer

_READ_TIMEOUT_S = 10.0
_HEAD_LIMIT = 16 * 1024


def _loopback_address(host: str, names: dict[str, str]) -> str | None:
    """The address to dial for a loopback target; None for anything else."""
    if host.lower() in names:
        return _loopback_address(names[host.lower()], {})
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return str(ip) if ip.is_loopback else None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FakeProxy:
    """HTTP CONNECT + SOCKS5 proxy on an OS-picked loopback port."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        names: dict[str, str] | None = None,
    ) -> None:
        self.username = username
        self.password = password
        # host names only this proxy can resolve (to loopback addresses): a client that
        # named such a host reached it through the proxy, or not at all
        self.names = {k.lower(): v for k, v in (names or {}).items()}
        self.port = 0
        self.targets: list[str] = []  # every target asked for, refused ones included
        self.refused: list[str] = []
        self.protocols: list[str] = []  # "connect" or "socks5", per tunnel asked for
        self.credentials: list[tuple[str, str] | None] = []  # what each client logged in with
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, scheme: str = "socks5") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def saw(self, target: str) -> bool:
        return target in self.targets

    async def start(self) -> FakeProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one client connection ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            first = await asyncio.wait_for(reader.readexactly(1), _READ_TIMEOUT_S)
            if first == b"\x05":
                await self._socks5(reader, writer)
            else:
                await self._connect(first, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    def _authorised(self, given: tuple[str, str] | None) -> bool:
        self.credentials.append(given)
        if self.username is None and self.password is None:
            return True
        return given == (self.username or "", self.password or "")

    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        wants_auth = self.username is not None or self.password is not None
        method = 0x02 if wants_auth else 0x00
        if method not in methods:
            writer.write(b"\x05\xff")
            await writer.drain()
            return
        writer.write(bytes([5, method]))
        await writer.drain()
        given: tuple[str, str] | None = None
        if method == 0x02:
            await reader.readexactly(1)  # sub-negotiation version 1
            (ulen,) = await reader.readexactly(1)
            user = (await reader.readexactly(ulen)).decode()
            (plen,) = await reader.readexactly(1)
            given = (user, (await reader.readexactly(plen)).decode())
        if not self._authorised(given):
            writer.write(b"\x01\x01")
            await writer.drain()
            return
        if method == 0x02:
            writer.write(b"\x01\x00")
            await writer.drain()
        _ver, cmd, _rsv, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == 3:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode("idna")
        else:
            return
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        target = _join(host, port)
        self.targets.append(target)
        self.protocols.append("socks5")
        address = _loopback_address(host, self.names)
        if cmd != 1 or address is None:
            self.refused.append(target)
            writer.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")  # not allowed by ruleset
            await writer.drain()
            return
        try:
            upstream = await asyncio.open_connection(address, port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")  # connection refused
            await writer.drain()
            return
        writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        await writer.drain()
        await self._relay(reader, writer, *upstream)

    async def _connect(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        if len(head) > _HEAD_LIMIT:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        authority = rest.partition(" ")[0]
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        given: tuple[str, str] | None = None
        scheme, _, token = headers.get("proxy-authorization", "").partition(" ")
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(token).decode().partition(":")
            given = (user, password)
        host, _, port_text = authority.rpartition(":")
        host = host.strip("[]")
        target = _join(host, int(port_text)) if port_text.isdigit() else authority
        self.targets.append(target)
        self.protocols.append("connect")
        if not self._authorised(given):
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()
            return
        address = _loopback_address(host, self.names)
        if address is None or not port_text.isdigit():
            self.refused.append(target)
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        try:
            upstream = await asyncio.open_connection(address, int(port_text))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await self._relay(reader, writer, *upstream)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        self._writers.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()


class FakeCdn(FakeServer):
    """Serves `/files/{name}` from the vendor fakes' stored outputs, on a port of its own."""

    def __init__(self, *sources: Any) -> None:
        super().__init__()
        self.sources = sources
        self.app.router.add_get("/files/{name}", self._file)

    @property
    def downloads(self) -> list[str]:
        return [c.params["name"] for c in self.calls_of("file")]

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.record("file", request, b"", name=name)
        for source in self.sources:
            stored = source.files.get(name)
            if stored is not None and not stored.expired:
                stored.downloads += 1
                return web.Response(body=stored.data, content_type=stored.content_type)
        return web.Response(status=404, text="Not found")
