"""The file host both fake vendors share: outputs (and fal's uploads) served at /files/{name},
downloads counted, files expirable, faults and delays injectable as op "file"."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from tests.fakes.base import FakeServer


@dataclass
class StoredFile:
    """A file the fake serves at /files/{name}."""

    data: bytes
    content_type: str
    expired: bool = False
    downloads: int = 0


class FileHost(FakeServer):
    """A FakeServer that also serves stored files at /files/{name}."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.files: dict[str, StoredFile] = {}
        self.app.router.add_get("/files/{name}", self._file)

    @property
    def downloads(self) -> dict[str, int]:
        """Download count per served file name."""
        return {name: f.downloads for name, f in self.files.items()}

    def expire_outputs(self) -> None:
        """Make every file served so far answer 404 from now on (Replicate's outputs expire
        after an hour)."""
        for f in self.files.values():
            f.expired = True

    def store_file(self, name: str, data: bytes, content_type: str, base: str | None) -> str:
        """Keep a file and return its URL (under `base` when a test moves outputs elsewhere)."""
        self.files[name] = StoredFile(data, content_type)
        return f"{base.rstrip('/')}/{name}" if base else f"{self.url}/files/{name}"

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.record("file", request, await request.read(), name=name)
        await self.apply_delay("file")
        if fault := self.take_fault("file"):
            return self.fault_response(fault)
        stored = self.files.get(name)
        if stored is None or stored.expired:
            return web.Response(status=404, text="Not found")
        stored.downloads += 1
        return web.Response(body=stored.data, content_type=stored.content_type)
