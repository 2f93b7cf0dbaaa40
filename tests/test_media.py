"""GuardedFetcher against real loopback servers, and the checks an edit input goes through."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image
from PIL import ImageFile as PILImageFile

from imagebot.errors import BlockedAddress, MediaError, MediaExpired, MediaTooLarge, NotAnImage
from imagebot.media import GuardedFetcher, decode_fully, inspect_image, prepare_edit_input
from imagebot.models import ImageFile
from imagebot.netguard import AddressGuard
from tests.fakes.images import damaged, make_image, noisy_image
from tests.fakes.origin import PNG, STREAM_CHUNKS, Origin
from tests.support import connected_to, png_claiming

MAX_PIXELS = 40_000_000


# -- a connect guard for the whole module: loopback or nothing ------------------------------


# -- test images ----------------------------------------------------------------------------


def jpeg_with_gps(width: int, height: int, orientation: int = 1) -> bytes:
    """A JPEG carrying EXIF with a camera make, an orientation and a GPS position."""
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0112] = orientation
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 40, 200)[: len(mode)] if mode != "P" else 3).save(buf, fmt)
    return buf.getvalue()


# -- a scriptable origin server -------------------------------------------------------------


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as server:
        yield server  # type: ignore[misc]


def fetcher(
    *,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    networks: tuple[str, ...] = ("127.0.0.1/32",),
    max_bytes: int = 100_000,
    timeout_s: float = 2.0,
    max_redirects: int = 3,
    resolver: Any = None,
) -> GuardedFetcher:
    guard = AddressGuard(hosts, networks, resolver) if resolver else AddressGuard(hosts, networks)
    return GuardedFetcher(
        guard,
        max_bytes=max_bytes,
        max_pixels=MAX_PIXELS,
        timeout_s=timeout_s,
        max_redirects=max_redirects,
    )


@contextlib.asynccontextmanager
async def using(f: GuardedFetcher) -> AsyncIterator[GuardedFetcher]:
    try:
        yield f
    finally:
        await f.aclose()


# -- GuardedFetcher -------------------------------------------------------------------------


async def test_fetch_image_from_allowed_loopback(origin: Origin, connections: list[Any]) -> None:
    """An allowed host gives back the checked image, and the request carries no credentials."""
    async with using(fetcher()) as f:
        image = await f.fetch_image(f"{origin.url}/img.png")
    assert (image.data, image.mime, image.width, image.height) == (PNG, "image/png", 64, 48)
    (call,) = origin.calls_of("img")
    assert "Authorization" not in call.headers and "Cookie" not in call.headers
    assert call.headers["Accept-Encoding"] == "identity"


async def test_hostname_is_dialled_at_the_vetted_address(
    origin: Origin, connections: list[Any]
) -> None:
    """A name is resolved once by the guard and the connection goes to that address, with the
    name in the Host header: the system resolver is never asked (the name doesn't exist)."""
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    async with using(fetcher(hosts=("*.fal.test",), resolver=resolver)) as f:
        data = await f.fetch(f"http://out.fal.test:{origin.port}/img.png")
    assert data == PNG
    assert asked == ["out.fal.test"]
    assert origin.calls_of("img")[0].headers["Host"] == f"out.fal.test:{origin.port}"


async def test_content_length_over_cap_is_refused(origin: Origin, connections: list[Any]) -> None:
    """A declared Content-Length over the cap is refused before the body is read."""
    async with using(fetcher(max_bytes=4096)) as f:
        with pytest.raises(MediaTooLarge):
            await f.fetch(f"{origin.url}/big")


async def test_streamed_body_over_cap_is_cut(origin: Origin, connections: list[Any]) -> None:
    """Without a Content-Length, the download stops as soon as the cap is passed."""
    async with using(fetcher(max_bytes=8192)) as f:
        with pytest.raises(MediaTooLarge):
            await f.fetch(f"{origin.url}/stream")
    assert origin.chunks_sent < STREAM_CHUNKS  # the server never got to send all 32 MB


async def test_compressed_body_is_refused(origin: Origin, connections: list[Any]) -> None:
    """A gzip body (which could inflate past the cap in memory) is refused, not decoded."""
    async with using(fetcher()) as f:
        with pytest.raises(MediaError) as caught:
            await f.fetch(f"{origin.url}/gzip")
    assert caught.value.code == "download_failed"


@pytest.mark.parametrize("path", ["/stall", "/stall-body"])
async def test_stalling_server_times_out(
    origin: Origin, connections: list[Any], path: str
) -> None:
    """A server that stalls (before or during the body, until the test ends) ends as a
    retryable download_timeout instead of a hang."""
    async with using(fetcher(timeout_s=0.3)) as f:
        with pytest.raises(MediaError) as caught:
            await f.fetch(f"{origin.url}{path}")
    assert caught.value.code == "download_timeout"
    assert caught.value.is_retryable


@pytest.mark.parametrize("path", ["/gone", "/gone410"])
async def test_gone_output_is_media_expired(
    origin: Origin, connections: list[Any], path: str
) -> None:
    """404 and 410 mean the output has expired; that is final, not retried."""
    async with using(fetcher()) as f:
        with pytest.raises(MediaExpired) as caught:
            await f.fetch(f"{origin.url}{path}")
    assert caught.value.code == "results_expired" and not caught.value.is_retryable


async def test_server_error_is_retryable(origin: Origin, connections: list[Any]) -> None:
    """A 5xx from the output host may pass: the error says it can be retried."""
    async with using(fetcher()) as f:
        with pytest.raises(MediaError) as caught:
            await f.fetch(f"{origin.url}/broken")
    assert caught.value.is_retryable


async def test_redirects_within_the_limit_are_followed(
    origin: Origin, connections: list[Any]
) -> None:
    """Three redirects (relative and absolute) with max_redirects=3 end at the image."""
    async with using(fetcher(max_redirects=3)) as f:
        assert await f.fetch(f"{origin.url}/r/3") == PNG
    assert [c.params["n"] for c in origin.calls_of("hop")] == [3, 2, 1, 0]


async def test_redirects_over_the_limit_are_refused(
    origin: Origin, connections: list[Any]
) -> None:
    """One redirect more than max_redirects is refused and the last hop is never requested."""
    async with using(fetcher(max_redirects=2)) as f:
        with pytest.raises(BlockedAddress) as caught:
            await f.fetch(f"{origin.url}/r/3")
    assert caught.value.code == "too_many_redirects"
    assert [c.params["n"] for c in origin.calls_of("hop")] == [3, 2, 1]


async def test_redirect_without_location_fails(origin: Origin, connections: list[Any]) -> None:
    """A 302 with no Location is an error, not a loop or a crash."""
    async with using(fetcher()) as f:
        with pytest.raises(MediaError, match="location"):
            await f.fetch(f"{origin.url}/no-location")


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x",
        "http://[fd00::1]/x",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1/img.png",
    ],
)
async def test_redirect_is_rechecked(
    origin: Origin, connections: list[Any], location: str
) -> None:
    """Each redirect hop goes through the guard again; a hop it refuses is never dialled."""
    origin.redirect_to = location
    hosts = ("127.0.0.1", "169.254.169.254", "10.0.0.1", "fd00::1")
    async with using(fetcher(hosts=hosts)) as f:
        with pytest.raises(BlockedAddress):
            await f.fetch(f"{origin.url}/away")
    assert len(origin.calls_of("away")) == 1
    assert {a[0] for a in connections} == {"127.0.0.1"}


async def test_redirect_to_loopback_from_allowed_private_host(connections: list[Any]) -> None:
    """Outputs on an allowed 127.0.0.2 redirecting to 127.0.0.1 are refused; it sees nothing."""
    async with Origin("127.0.0.2") as outputs, Origin("127.0.0.1") as inner:
        outputs.redirect_to = f"{inner.url}/img.png"
        f = fetcher(hosts=("127.0.0.2", "127.0.0.1"), networks=("127.0.0.2/32",))
        async with using(f):
            assert await f.fetch(f"{outputs.url}/img.png") == PNG
            with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1"):
                await f.fetch(f"{outputs.url}/away")
    assert inner.calls == []
    assert not connected_to(connections, "127.0.0.1")


async def test_refused_urls_never_open_a_socket(connections: list[Any]) -> None:
    """Metadata, private and mapped-loopback URLs are refused by the address filter: no connect
    is even attempted (the connect guard saw none)."""
    hosts = ("169.254.169.254", "10.0.0.1", "::ffff:127.0.0.1", "127.0.0.1")
    async with using(fetcher(hosts=hosts, networks=())) as f:
        for url in (
            "http://169.254.169.254/latest/meta-data/iam/",
            "https://10.0.0.1/out.png",
            "http://[::ffff:127.0.0.1]:9/out.png",
            "http://127.0.0.1:9/out.png",
        ):
            with pytest.raises(BlockedAddress):
                await f.fetch(url)
    assert connections == []


# -- inspect_image --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_accepted_formats(fmt: str, mime: str) -> None:
    """JPEG, PNG and WebP are accepted with their MIME type and size read from the bytes."""
    image = inspect_image(encoded(fmt, (40, 30)), MAX_PIXELS)
    assert (image.mime, image.width, image.height) == (mime, 40, 30)


@pytest.mark.parametrize(
    "data",
    [
        encoded("GIF"),
        encoded("BMP"),
        encoded("TIFF"),
        b"hello",
        b"",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    ],
    ids=["gif", "bmp", "tiff", "text", "empty", "pdf"],
)
def test_not_an_image(data: bytes) -> None:
    """Anything but an intact JPEG/PNG/WebP is NotAnImage, whatever it claims to be."""
    with pytest.raises(NotAnImage) as caught:
        inspect_image(data, MAX_PIXELS)
    assert caught.value.code == "not_an_image"


def test_decompression_bomb_header_is_refused() -> None:
    """A few hundred bytes claiming 30000x30000 pixels are refused before any decoding."""
    bomb = png_claiming(30_000, 30_000)
    assert len(bomb) < 200
    with pytest.raises(MediaTooLarge) as caught:
        inspect_image(bomb, MAX_PIXELS)
    assert caught.value.code == "too_many_pixels"


def test_pixel_limit_is_the_configured_one() -> None:
    """An image over media.max_pixels is refused even when Pillow itself would open it."""
    with pytest.raises(MediaTooLarge) as caught:
        inspect_image(make_image(200, 100), 10_000)
    assert caught.value.code == "too_many_pixels"
    assert inspect_image(make_image(100, 100), 10_000).width == 100


# -- prepare_edit_input ---------------------------------------------------------------------


def test_small_png_is_sent_untouched() -> None:
    """A small PNG without metadata goes to the model byte for byte."""
    image = inspect_image(PNG, MAX_PIXELS)
    assert prepare_edit_input(image, 2048) is image


def test_large_image_is_downscaled() -> None:
    """A photo over edit.max_input_side_px is shrunk to that longest side, aspect kept."""
    image = inspect_image(make_image(3000, 1500), MAX_PIXELS)
    out = prepare_edit_input(image, 1024)
    assert (out.width, out.height) == (1024, 512)
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.size == (1024, 512)
        assert out.mime == Image.MIME[img.format or ""]


def test_exif_gps_is_stripped_and_rotation_applied() -> None:
    """A phone JPEG loses its EXIF (GPS, camera) before it leaves, upright per its orientation."""
    image = inspect_image(jpeg_with_gps(300, 200, orientation=6), MAX_PIXELS)
    with Image.open(io.BytesIO(image.data)) as original:
        assert original.getexif().get_ifd(0x8825)  # the input really has a GPS position
    out = prepare_edit_input(image, 2048)
    assert out.mime == "image/jpeg"
    assert (out.width, out.height) == (200, 300)  # orientation 6 = rotated 90°
    with Image.open(io.BytesIO(out.data)) as img:
        assert not img.getexif()
        assert "exif" not in img.info
    assert b"PhoneMaker" not in out.data


def test_png_text_metadata_is_stripped_and_alpha_kept() -> None:
    """A PNG with text chunks is re-encoded without them, keeping its transparency."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "48.8584 N, 2.2945 E")
    buf = io.BytesIO()
    Image.new("RGBA", (50, 40), (1, 2, 3, 100)).save(buf, "PNG", pnginfo=info)
    out = prepare_edit_input(inspect_image(buf.getvalue(), MAX_PIXELS), 2048)
    assert out.mime == "image/png"
    assert b"48.8584" not in out.data
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.mode == "RGBA" and img.size == (50, 40)


def test_webp_is_reencoded_for_the_model() -> None:
    """WebP input is sent as JPEG (no alpha) so every edit model can read it."""
    out = prepare_edit_input(inspect_image(encoded("WEBP", (60, 40)), MAX_PIXELS), 2048)
    assert (out.mime, out.width, out.height) == ("image/jpeg", 60, 40)


def test_truncated_jpeg_is_not_an_image() -> None:
    """A JPEG cut short passes the header check but fails decoding: NotAnImage, not a crash."""
    data = jpeg_with_gps(400, 300)
    cut = data[: len(data) // 2]
    image = inspect_image(cut, MAX_PIXELS)  # JPEG verify() reads the header only
    with pytest.raises(NotAnImage):
        prepare_edit_input(image, 100)


# -- truncated and corrupt files ------------------------------------------------------------

BROKEN_CASES = {
    # a photo-like JPEG cut in half, missing its last 10 bytes, with 64 random bytes written
    # over the middle, with 500 random bytes put in the middle
    "jpeg-half": damaged(noisy_image(fmt="JPEG"), "half"),
    "jpeg-tail": damaged(noisy_image(fmt="JPEG"), "tail"),
    "jpeg-garbage": damaged(noisy_image(fmt="JPEG"), "garbage"),
    "jpeg-inserted": damaged(noisy_image(fmt="JPEG"), "inserted"),
    # a small flat JPEG without metadata: the kind that used to be sent to the model untouched
    "small-jpeg-tail": damaged(make_image(64, 48, fmt="JPEG"), "tail"),
    "png-half": damaged(noisy_image(fmt="PNG"), "half"),
    "png-tail": damaged(noisy_image(fmt="PNG"), "tail"),  # IEND gone
    "png-garbage": damaged(noisy_image(fmt="PNG"), "garbage"),
    "png-inserted": damaged(noisy_image(fmt="PNG"), "inserted"),
    "small-png-half": damaged(PNG, "half"),
    "small-png-bad-crc": PNG[:-20] + b"\0" * 20,
    "webp-half": damaged(noisy_image(fmt="WEBP"), "half"),
    "webp-tail": damaged(noisy_image(fmt="WEBP"), "tail"),
}


def checked_for_edit(data: bytes) -> object:
    """What happens to an edit input: the header check, then the full decode and re-encode."""
    return prepare_edit_input(inspect_image(data, MAX_PIXELS), 2048)


@pytest.mark.parametrize("data", BROKEN_CASES.values(), ids=BROKEN_CASES.keys())
def test_truncated_or_corrupt_image_is_refused(data: bytes) -> None:
    """A JPEG, PNG or WebP that is cut short or damaged is refused as broken_image before it
    could be sent anywhere, never passed through as it came."""
    with pytest.raises(NotAnImage) as caught:
        checked_for_edit(data)
    assert caught.value.code == "broken_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_intact_photo_like_images_pass(fmt: str) -> None:
    """The undamaged sources of the broken cases pass the same checks."""
    out = checked_for_edit(noisy_image(fmt=fmt))
    assert isinstance(out, ImageFile) and (out.width, out.height) == (300, 200)


def test_truncated_images_flag_is_never_set_and_refused_if_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the whole app imported Pillow still refuses truncated files (LOAD_TRUNCATED_IMAGES
    is off); if anything turned it on, the check refuses to vouch for any image."""
    import imagebot.app  # noqa: F401 - every dependency the bot loads

    assert PILImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(PILImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(io.BytesIO(noisy_image(fmt="JPEG"))) as img, pytest.raises(RuntimeError):
        decode_fully(img)
    with pytest.raises(RuntimeError):
        checked_for_edit(BROKEN_CASES["small-jpeg-tail"])
