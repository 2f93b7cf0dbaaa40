"""An offline provider that draws placeholder images with Pillow, to try the bot without keys.

It keeps its results in memory: after a restart an unfinished local request reads as expired,
which is also how a real vendor behaves once its outputs are gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import textwrap
import uuid

from PIL import Image, ImageDraw, ImageOps

from imagebot.errors import MediaExpired, ProviderError
from imagebot.models import ImageFile, JobKind, PollResult, PollState, ProviderRequest

NAME = "local"
_SCHEME = "local:"


def _colour(text: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0], digest[1], digest[2]


def _caption(img: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(img)
    lines = textwrap.wrap(text, width=max(10, img.width // 12))[:8]
    draw.rectangle((0, img.height - 16 * len(lines) - 16, img.width, img.height), fill=(0, 0, 0))
    for n, line in enumerate(lines):
        draw.text((8, img.height - 16 * (len(lines) - n) - 8), line, fill=(255, 255, 255))


def draw(request: ProviderRequest, index: int) -> ImageFile:
    """A placeholder: a gradient for a prompt, the inverted photo for an edit, with the text;
    an upscale is the image at twice the size (no text)."""
    if request.kind is JobKind.UPSCALE and request.image:
        with Image.open(io.BytesIO(request.image)) as src:
            big = src.convert("RGB").resize((src.width * 2, src.height * 2))
        out = io.BytesIO()
        big.save(out, format="PNG")
        return ImageFile(out.getvalue(), "image/png", big.width, big.height)
    if request.kind is JobKind.EDIT and request.image:
        with Image.open(io.BytesIO(request.image)) as src:
            img = ImageOps.invert(src.convert("RGB"))
    else:
        size = 512
        start, end = _colour(request.prompt), _colour(f"{request.prompt}{index}")
        img = Image.new("RGB", (size, size))
        pixels = ImageDraw.Draw(img)
        for y in range(size):
            mix = y / size
            row = tuple(int(a + (b - a) * mix) for a, b in zip(start, end, strict=True))
            pixels.line((0, y, size, y), fill=row)
    _caption(img, request.prompt)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ImageFile(buf.getvalue(), "image/png", img.width, img.height)


class LocalProvider:
    """Draws images in-process after a short pretend wait."""

    name = NAME

    def __init__(self, delay_s: float = 0.5, poll_interval_s: float = 0.1) -> None:
        self.delay_s = delay_s
        self.poll_interval_s = poll_interval_s
        self._results: dict[str, list[ImageFile]] = {}
        self._ready: dict[str, asyncio.Event] = {}

    async def submit(self, request: ProviderRequest) -> str:
        request_id = f"local-{uuid.uuid4().hex[:12]}"
        count = int(request.params.get("num_outputs", request.params.get("num_images", 1)))
        images = [draw(request, n) for n in range(max(1, min(count, 4)))]
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._ready[request_id] = event
        loop.call_later(self.delay_s, event.set)
        self._results[request_id] = images
        return request_id

    async def poll(self, request_id: str) -> PollResult:
        event = self._ready.get(request_id)
        if event is None:
            return PollResult(PollState.FAILED, error="expired", error_code="results_expired")
        if not event.is_set():
            return PollResult(PollState.PENDING)
        count = len(self._results[request_id])
        return PollResult(
            PollState.SUCCEEDED,
            output_urls=tuple(f"{_SCHEME}{request_id}/{n}" for n in range(count)),
        )

    async def cancel(self, request_id: str) -> None:
        self._ready.pop(request_id, None)
        self._results.pop(request_id, None)

    async def fetch_output(self, url: str) -> ImageFile:
        if not url.startswith(_SCHEME):
            raise ProviderError(NAME, "not a local result", code="bad_response")
        request_id, _, index = url.removeprefix(_SCHEME).partition("/")
        images = self._results.get(request_id)
        if images is None:
            raise MediaExpired("local result is gone (the process restarted)")
        return images[int(index)]

    def share_rate(self, processes: int) -> None:
        """Draws in-process: no account to share."""

    async def aclose(self) -> None:
        self._results.clear()
