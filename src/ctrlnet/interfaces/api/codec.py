"""Images in and out of HTTP bodies, for every router: base64 (plain or ``data:`` URL) -> bytes,
uploaded bytes -> a checked uint8 array, arrays -> base64 PNG.

Limits are checked from the image header before decoding (a small PNG can claim 50,000 x 50,000
pixels): over ``Limits.max_pixels`` -> 413, not an image -> 400, not base64 -> 400.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from fastapi import HTTPException

from ctrlnet.image import ImageError, load_image
from ctrlnet.interfaces.limits import Limits
from ctrlnet.interfaces.outputs import png_bytes


def b64(data: bytes) -> str:
    """Bytes as standard base64 text (no data-URL prefix, as A1111 returns images)."""
    return base64.b64encode(data).decode("ascii")


def png_b64(image: np.ndarray, chunks: dict[str, str] | None = None) -> str:
    """(H, W, C) uint8 -> base64 PNG, with optional text chunks (``parameters``, ``ctrlnet``)."""
    return b64(png_bytes(image, chunks))


def decode_b64(s, where: str) -> bytes:
    """Base64 text (a ``data:image/...;base64,`` prefix is accepted, as A1111 does) -> bytes.
    422 when not a non-empty string, 400 when not base64."""
    if not isinstance(s, str) or not s:
        raise HTTPException(422, f"{where} must be a base64 string")
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    s = "".join(s.split())  # line-wrapped base64 (e.g. from `base64` without -w0)
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"{where} is not valid base64") from None


def decode_image(data: bytes, where: str, limits: Limits, keep_alpha: bool = False) -> np.ndarray:
    """Uploaded bytes -> uint8 array (H, W, 3), or (H, W, 4) with ``keep_alpha`` (control images,
    see :func:`ctrlnet.image.load_image`), upright per EXIF. 413 over ``limits.max_pixels`` (read
    from the header, before decoding), 400 when not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:
        raise HTTPException(400, f"{where} is not a readable image (PNG, JPEG or WebP expected)") from None
    if w * h > limits.max_pixels:
        raise HTTPException(413, f"{where} is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
    try:
        return load_image(data, max_pixels=limits.max_pixels, keep_alpha=keep_alpha)
    except ImageError as e:
        raise HTTPException(400, f"{where}: {e}") from None


def image_from_b64(s, where: str, limits: Limits, keep_alpha: bool = False) -> np.ndarray:
    """:func:`decode_b64` then :func:`decode_image`."""
    return decode_image(decode_b64(s, where), where, limits, keep_alpha)
