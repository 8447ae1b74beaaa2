"""Image I/O and the two shape helpers every part shares (HWC3, resize_image).

All images inside ctrlnet are ``uint8`` numpy arrays laid out ``(H, W, C)`` in RGB order.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np

from ctrlnet.atomic import atomic_path

# Bigger inputs are refused before decoding finishes (a 20000x20000 RGB image is 1.2 GB).
MAX_PIXELS = 64_000_000
MIN_SIDE = 8


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Bring bool, 16-bit, float in [0, 1] or other integer images to uint8."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if x.dtype == np.uint16:
        return (x.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ImageError("image contains NaN or infinite values")
        return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        return np.clip(x, 0, 255).astype(np.uint8)
    raise ImageError(f"unsupported image dtype {x.dtype}")


def HWC3(x: np.ndarray, background: int = 255) -> np.ndarray:
    """Return an (H, W, 3) uint8 image: gray is repeated, an alpha channel (gray+alpha or RGBA)
    is composited on a gray level ``background``: 255 (white, as the original apps' HWC3) for
    pictures, 0 for ready-made control maps (white strokes on transparent stay white on black)."""
    x = to_uint8(np.asarray(x))
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"expected an image of shape (H, W), (H, W, 1|3|4), got {x.shape}")
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :1].repeat(3, axis=2) if c == 2 else x[:, :, :3]
    alpha = x[:, :, c - 1 : c].astype(np.float32) / 255.0
    y = color.astype(np.float32) * alpha + float(background) * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def check_size(h: int, w: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse images too small to resize or too large to process safely."""
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image is {w}x{h} pixels; each side must be at least {MIN_SIDE}")
    if h * w > max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {h * w} pixels, more than the limit of {max_pixels}; downscale it first"
        )


def resize_image(x: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is ``resolution``, then round H and W to multiples of 64.

    Lanczos when enlarging, area averaging when shrinking (as the original apps).
    """
    h, w = x.shape[:2]
    check_size(h, w)
    k = float(resolution) / min(h, w)
    new_h = max(64, int(np.round(h * k / 64.0)) * 64)
    new_w = max(64, int(np.round(w * k / 64.0)) * 64)
    interp = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(x, (new_w, new_h), interpolation=interp)


def _int_range(im) -> float:
    """The largest value of a mode-"I" image's samples: a 32-bit TIFF says signed or unsigned in
    its tags; everything else that Pillow opens as "I" (16-bit PGM, 16-bit PNG in old Pillow)
    holds 16-bit samples."""
    tags = getattr(im, "tag_v2", None)
    first = lambda tag, default: int(np.atleast_1d(tags.get(tag, default))[0])  # noqa: E731 (per-sample tuples)
    if tags is not None and first(258, 16) == 32:  # BitsPerSample
        return 2.0**31 - 1 if first(339, 1) == 2 else 2.0**32 - 1  # SampleFormat 2: signed
    return 65535.0


def _pixels(im, keep_alpha: bool) -> np.ndarray:
    """Decoded pixels as uint8, scaled by the sample type's range: float images (mode F) from
    [0, 1], 16-bit (I;16*) by 1/257, 32-bit integers (I) by their range. An alpha channel (RGBA,
    LA, PA, or a palette/colour-key transparency) is kept as a 4th channel with ``keep_alpha``,
    otherwise composited on white."""
    mode = im.mode
    if mode == "F":
        return HWC3(to_uint8(np.asarray(im, dtype=np.float32)))
    if mode.startswith("I"):
        arr = np.asarray(im)
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
            return HWC3(to_uint8(arr.astype(np.uint16)))
        top = 32767.0 if arr.dtype.itemsize == 2 else _int_range(im)  # I;16S, or I
        return HWC3(to_uint8(np.clip(arr.astype(np.float64) / top, 0.0, 1.0)))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        return rgba if keep_alpha else HWC3(rgba)
    return np.asarray(im.convert("RGB"))


def load_image(source, max_pixels: int = MAX_PIXELS, keep_alpha: bool = False) -> np.ndarray:
    """Read a path, bytes or file object into an (H, W, 3) RGB uint8 array; with
    ``keep_alpha``, an image with transparency gives (H, W, 4) RGBA instead (control images: the
    pipeline composites a ready-made map on black and an annotator's input on white, see
    :func:`HWC3`).

    The EXIF orientation is applied (phone photos come out upright, as in browsers). Sample
    values are scaled by their type's range: float images (mode F, e.g. float TIFF) map [0, 1]
    to 0..255, 16-bit images (PNG, TIFF, PGM) are divided by 257. The header is checked before
    the pixels are decoded, so a huge image fails fast. Raises :class:`ImageError` naming the
    source: missing, not an image, too small or too large, NaN/infinite float pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no image file at {path}")
        name = str(path)
        fh = open(path, "rb")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, fh = "<bytes>", io.BytesIO(bytes(source))
    else:
        name, fh = getattr(source, "name", "<stream>"), source
    try:
        with Image.open(fh) as im:
            w, h = im.size
            check_size(h, w, max_pixels)
            im.load()
            try:
                ImageOps.exif_transpose(im, in_place=True)
            except Exception:  # a damaged EXIF block leaves the pixels usable as stored
                pass
            arr = _pixels(im, keep_alpha)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its own limit before we see the size
        raise ImageError(f"{name}: image is too large ({e}); the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}: {e})") from None
    finally:
        if isinstance(source, (str, os.PathLike)):
            fh.close()
    return arr


def save_image(x: np.ndarray, path, pnginfo: dict[str, str] | None = None) -> Path:
    """Write an image atomically (temp file + rename, :mod:`ctrlnet.atomic`); PNG text chunks from ``pnginfo``."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    kwargs = {}
    if fmt == "PNG" and pnginfo:
        info = PngImagePlugin.PngInfo()
        for k, v in pnginfo.items():
            info.add_text(k, v)
        kwargs["pnginfo"] = info
    # no fsync: data sets write thousands of these, and a lost image is redone on resume
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(HWC3(x)).save(tmp, format=fmt, **kwargs)
    return path
