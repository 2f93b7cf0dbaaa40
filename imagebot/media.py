"""Media in and out: the SSRF-guarded output fetcher, image checks, and Telegram file downloads.

Output images are fetched with an httpx client that carries no credentials, connects only to
addresses the guard vetted (the vetted IP is dialled, with the name kept for Host and TLS SNI,
so a second DNS answer cannot point elsewhere), follows redirects by hand re-checking each hop,
and stops at a byte cap and a deadline. A Telegram file URL contains the bot token, so it is
never returned, logged or stored: only the bytes leave this module.
"""

from __future__ import annotations

import asyncio
import io
import warnings

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import ImageFile as PILImageFile
from telegram import Bot
from telegram.constants import FileSizeLimit
from telegram.error import BadRequest, InvalidToken, NetworkError, TelegramError

from imagebot.errors import BlockedAddress, MediaError, MediaExpired, MediaTooLarge, NotAnImage
from imagebot.models import ImageFile
from imagebot.netguard import AddressGuard

ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Bots may download up to 20 MB; PTB counts that in decimal megabytes, the stricter reading.
TELEGRAM_DOWNLOAD_LIMIT = int(FileSizeLimit.FILESIZE_DOWNLOAD)
_REDIRECTS = {301, 302, 303, 307, 308}
BROKEN = "broken_image"  # an image of an accepted format whose data is cut short or damaged


def inspect_image(data: bytes, max_pixels: int) -> ImageFile:
    """Check that `data` is a JPEG/PNG/WebP of at most `max_pixels`, from its bytes alone.

    This reads the header and the file's structure (PNG checksums), not the pixels: a JPEG cut
    short passes here. `prepare_edit_input` decodes every pixel before an edit input leaves.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                width, height = img.size
                if fmt not in ACCEPTED_FORMATS:
                    raise NotAnImage(f"format {fmt or 'unknown'} is not accepted")
                if width * height > max_pixels:
                    raise MediaTooLarge(
                        f"{width}x{height} is over {max_pixels} pixels", "too_many_pixels"
                    )
                try:
                    img.verify()
                except (SyntaxError, ValueError, EOFError, OSError) as exc:
                    raise NotAnImage(f"broken {fmt} file: {exc}", BROKEN) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge("decompression bomb", "too_many_pixels") from exc
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, OSError) as exc:
        # Starts like a JPEG/PNG/WebP but will not open (a WebP cut short): damaged, not foreign.
        code = BROKEN if _starts_like_accepted(data) else None
        raise NotAnImage(f"not an image: {type(exc).__name__}: {exc}", code) from exc
    return ImageFile(data, ACCEPTED_FORMATS[fmt], width, height)


def _starts_like_accepted(data: bytes) -> bool:
    """The file's signature is a JPEG's, a PNG's or a WebP's."""
    return data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")) or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    )


def decode_fully(img: Image.Image) -> None:
    """Decode every pixel: a truncated or corrupt file raises NotAnImage (code broken_image).

    Pillow only notices a file cut short when it decodes the pixels, and not at all when
    `ImageFile.LOAD_TRUNCATED_IMAGES` is set (it pads the missing part with grey); imagebot never
    sets it, and refuses to vouch for an image while anything else has.
    """
    if PILImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images cannot be detected"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise NotAnImage(f"cannot decode the {img.format} image: {exc}", BROKEN) from exc


def _has_metadata(img: Image.Image) -> bool:
    """EXIF (GPS, camera, orientation), XMP or text chunks: anything that says more than pixels."""
    if img.getexif():
        return True
    if any(key in img.info for key in ("exif", "xmp", "XML:com.adobe.xmp", "comment")):
        return True
    # PNG tEXt/iTXt/zTXt chunks land in info as strings; the colour profile is kept on purpose.
    return any(
        isinstance(value, str | bytes) for key, value in img.info.items() if key != "icc_profile"
    )


def prepare_edit_input(image: ImageFile, max_side: int) -> ImageFile:
    """Shrink to `max_side`, apply EXIF rotation and drop metadata (GPS) before it leaves us.

    Every pixel is decoded first, so a truncated or corrupt file stops here, before any
    provider is paid for it. A small JPEG or PNG that carries no metadata is sent as it came.
    """
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            decode_fully(img)
            if (
                max(img.size) <= max_side
                and img.format in ("JPEG", "PNG")
                and not _has_metadata(img)
            ):
                return image
            out = ImageOps.exif_transpose(img) or img
            out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            keep_alpha = out.mode in ("RGBA", "LA") or (
                out.mode == "P" and "transparency" in out.info
            )
            buf = io.BytesIO()
            # A fresh save writes no EXIF, XMP or text chunks unless asked to; only the colour
            # profile is carried over, so colours stay right.
            extra = {"icc_profile": img.info["icc_profile"]} if "icc_profile" in img.info else {}
            if keep_alpha:
                out.convert("RGBA").save(buf, format="PNG", **extra)
                mime = "image/png"
            else:
                out.convert("RGB").save(buf, format="JPEG", quality=92, **extra)
                mime = "image/jpeg"
            return ImageFile(buf.getvalue(), mime, out.width, out.height)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # decoded, but re-encoding failed: still a file we cannot send
        raise NotAnImage(f"cannot decode the image: {type(exc).__name__}", BROKEN) from exc


class GuardedFetcher:
    """Downloads provider outputs under the SSRF guard, a byte cap and a deadline."""

    def __init__(
        self,
        guard: AddressGuard,
        *,
        max_bytes: int,
        max_pixels: int,
        timeout_s: float,
        max_redirects: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        # No auth, no cookies, no proxies from the environment, no automatic redirects.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            # identity: the byte cap counts what the server sends, so a small gzip body cannot
            # inflate to gigabytes in memory.
            headers={"User-Agent": "imagebot", "Accept-Encoding": "identity"},
        )

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise MediaError("download timed out", "download_timeout", is_retryable=True) from exc
        except httpx.TransportError as exc:
            raise MediaError(
                f"download failed: {type(exc).__name__}", "download_failed", is_retryable=True
            ) from exc

    async def fetch_image(self, url: str) -> ImageFile:
        return inspect_image(await self.fetch(url), self.max_pixels)

    async def _fetch(self, url: str) -> bytes:
        current = httpx.URL(url)
        for _hop in range(self.max_redirects + 1):
            target = await self.guard.vet(current)
            headers = {"Host": current.netloc.decode("ascii")}
            extensions = {"sni_hostname": target.host} if current.scheme == "https" else {}
            request = self._client.build_request(
                "GET", target.url, headers=headers, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError("redirect without a location", "bad_redirect")
                    current = current.join(location)
                    continue
                if response.status_code in (404, 410):
                    raise MediaExpired(f"output is gone (HTTP {response.status_code})")
                if response.status_code >= 400:
                    raise MediaError(
                        f"download failed: HTTP {response.status_code}",
                        "download_failed",
                        is_retryable=response.status_code >= 500 or response.status_code == 429,
                    )
                return await self._read_capped(response)
            finally:
                await response.aclose()
        raise BlockedAddress(f"more than {self.max_redirects} redirects", "too_many_redirects")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise MediaTooLarge(f"output is {declared} bytes, over {self.max_bytes}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaError(f"output sent with content-encoding {encoding}", "download_failed")
        buf = bytearray()
        async for chunk in response.aiter_raw():
            buf += chunk
            if len(buf) > self.max_bytes:
                raise MediaTooLarge(f"output is over {self.max_bytes} bytes")
        return bytes(buf)

    async def aclose(self) -> None:
        await self._client.aclose()


async def download_telegram_file(
    bot: Bot, file_id: str, *, file_base_url: str, local_mode: bool = False
) -> bytes:
    """getFile + download through PTB, only from the configured Telegram file host."""
    try:
        tg_file = await bot.get_file(file_id)
    except BadRequest as exc:
        if "too big" in exc.message.lower():
            raise MediaTooLarge("file is over Telegram's 20 MB download limit") from exc
        raise MediaError("Telegram cannot find that file any more", "input_unavailable") from exc
    except NetworkError as exc:
        raise MediaError(
            "Telegram download failed", "telegram_network", is_retryable=True
        ) from exc
    if tg_file.file_size and tg_file.file_size > TELEGRAM_DOWNLOAD_LIMIT:
        raise MediaTooLarge("file is over Telegram's 20 MB download limit")
    path = tg_file.file_path or ""
    if not local_mode and not path.startswith(f"{file_base_url}"):
        # PTB prefixes the configured file URL; anything else is not ours to fetch.
        raise BlockedAddress("Telegram file is not on the configured file host")
    try:
        data = bytes(await tg_file.download_as_bytearray())
    except (BadRequest, InvalidToken) as exc:
        # PTB raises InvalidToken for a 404: the file path is no longer served.
        raise MediaError("Telegram cannot serve that file any more", "input_unavailable") from exc
    except TelegramError as exc:
        raise MediaError(
            "Telegram download failed", "telegram_network", is_retryable=True
        ) from exc
    if len(data) > TELEGRAM_DOWNLOAD_LIMIT:
        raise MediaTooLarge("file is over Telegram's 20 MB download limit")
    return data
