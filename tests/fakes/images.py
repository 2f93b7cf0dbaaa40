"""Small real images for the fakes and tests, drawn with Pillow."""

from __future__ import annotations

import io
import random

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


def noisy_image(width: int = 300, height: int = 200, fmt: str = "JPEG", seed: int = 1) -> bytes:
    """A photo-like image (random pixels, the same for a seed): most of its bytes are pixel data,
    so cutting or damaging the file hits the pixels, not only the header."""
    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, format=fmt)
    return buf.getvalue()


def damaged(data: bytes, how: str, seed: int = 2) -> bytes:
    """`data` cut or damaged: "half" (first half only), "tail" (last 10 bytes gone), "garbage"
    (64 random bytes over the middle) or "inserted" (500 random bytes put in the middle)."""
    middle = len(data) // 2
    noise = random.Random(seed).randbytes(500)
    if how == "half":
        return data[:middle]
    if how == "tail":
        return data[:-10]
    if how == "garbage":
        return data[:middle] + noise[:64] + data[middle + 64 :]
    if how == "inserted":
        return data[:middle] + noise + data[middle:]
    raise ValueError(how)
