"""Small real images for the fakes and tests, drawn with Pillow."""

from __future__ import annotations

import io

from PIL import Image, ImageOps


def make_image(
    width: int = 64,
    height: int = 48,
    color: tuple[int, int, int] = (200, 60, 30),
    fmt: str = "PNG",
) -> bytes:
    """Return encoded image bytes of one flat colour."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def inverted(data: bytes, fmt: str = "PNG") -> bytes:
    """The image with its colours inverted: what the fake editor 'does' to a photo."""
    with Image.open(io.BytesIO(data)) as img:
        out = ImageOps.invert(img.convert("RGB"))
    buf = io.BytesIO()
    out.save(buf, format=fmt)
    return buf.getvalue()
