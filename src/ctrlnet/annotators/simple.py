"""Pixel-level preprocessors of ControlNet 1.1 that need no detector: invert, content shuffle,
tile, inpaint, recolor and identity.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ctrlnet.image import HWC3, ImageError, to_uint8


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def invert(image: np.ndarray) -> np.ndarray:
    """255 - x: black-on-white line art becomes the white-on-black lines ControlNet expects."""
    return 255 - HWC3(image)


def identity(image: np.ndarray) -> np.ndarray:
    """The image itself (a copy), for models fed the raw picture (ip2p, tile at full size)."""
    return HWC3(image).copy()


def smooth_noise(height: int, width: int, cell: int, rng: np.random.RandomState) -> np.ndarray:
    """Smooth random field (height, width) in [0, 1]: a coarse uniform grid upsampled bicubically.

    The grid has one sample per ``cell`` pixels plus a margin cell on each side, so the crop
    shows no border effects; the result is min-max normalised. (ControlNet 1.1's noise disk.)
    """
    coarse = rng.uniform(0.0, 1.0, size=(height // cell + 2, width // cell + 2))
    big = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = big[cell : cell + height, cell : cell + width]
    field = field - field.min()
    return field / max(float(field.max()), 1e-12)


def shuffle(
    image: np.ndarray,
    seed: int | None = None,
    noise_cell: int = 256,
    height: int | None = None,
    width: int | None = None,
) -> np.ndarray:
    """ControlNet 1.1 content shuffle: resample the image through a smooth random flow field.

    Each output pixel reads the input (bilinearly) at ``(fx * (W - 1), fy * (H - 1))`` where
    ``fx``, ``fy`` are two independent :func:`smooth_noise` fields of cell size ``noise_cell``, so
    content is moved around in smooth swirls while colours stay those of the input. ``seed``
    makes it reproducible (the draws equal ``np.random.seed(seed)`` in the original app);
    ``None`` draws fresh entropy. Output is (height, width) when given, else the input size;
    the original app passes the generation size here.
    """
    img = HWC3(image)
    H, W = img.shape[:2]
    out_h = H if height is None else int(height)
    out_w = W if width is None else int(width)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"shuffle output size must be positive, got {out_w}x{out_h}")
    cell = int(noise_cell)
    if cell < 1:
        raise ValueError(f"shuffle noise_cell must be >= 1, got {noise_cell!r}")
    rng = np.random.RandomState(seed)
    fx = smooth_noise(out_h, out_w, cell, rng) * float(W - 1)  # x first, as the original draws
    fy = smooth_noise(out_h, out_w, cell, rng) * float(H - 1)
    return cv2.remap(img, fx.astype(np.float32), fy.astype(np.float32), cv2.INTER_LINEAR)


def tile(image: np.ndarray, down_sampling_rate: float = 1.0) -> np.ndarray:
    """ControlNet 1.1 tile preprocessing: shrink by ``down_sampling_rate`` with area averaging.

    Returns an image of ``int(H / rate) x int(W / rate)`` (a documented resize: the pipeline
    scales hints to the generation size); rates below 1.1 return the image unchanged, as the
    sd-webui-controlnet ``tile_resample`` preprocessor does.
    """
    rate = _positive("tile down_sampling_rate", down_sampling_rate)
    img = HWC3(image)
    if rate < 1.1:
        return img.copy()
    H, W = img.shape[:2]
    new_h, new_w = max(1, int(H / rate)), max(1, int(W / rate))
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)


def _masked_pixels(mask, h: int, w: int, mask_blur: float) -> np.ndarray:
    """Boolean (h, w) mask: resized to the image, optionally blurred, thresholded at half."""
    if mask is None:
        raise TypeError("inpaint needs mask=<(H, W) array, non-zero/True where the image is to be repainted>")
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        m = m.astype(np.float32)
    else:
        m = to_uint8(m).astype(np.float32) / 255.0
    if m.ndim == 3:
        m = m.max(axis=2)  # any channel set marks the pixel
    if m.ndim != 2:
        raise ImageError(f"inpaint mask must be (H, W) or (H, W, C), got shape {np.asarray(mask).shape}")
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    if mask_blur < 0 or not math.isfinite(mask_blur):
        raise ValueError(f"inpaint mask_blur must be a finite number >= 0, got {mask_blur!r}")
    if mask_blur > 0:
        m = cv2.GaussianBlur(m, (0, 0), float(mask_blur))
    return m > 0.5


def inpaint_hint(image: np.ndarray, mask, mask_blur: float = 0.0) -> np.ndarray:
    """The ControlNet 1.1 inpaint hint: (H, W, 3) float32, pixels / 255 in [0, 1], masked = -1.

    This, not the uint8 ``inpaint`` map, is what the inpaint ControlNet must be fed: -1 tells
    it which pixels to invent. ``mask`` is (H, W) (or (H, W, C), any channel counts), bool or
    numeric (> half of full scale = masked), resized bilinearly to the image if needed;
    ``mask_blur`` > 0 blurs it first (the v1.1 app used 5.0) to round its outline.
    """
    img = HWC3(image)
    masked = _masked_pixels(mask, img.shape[0], img.shape[1], mask_blur)
    hint = img.astype(np.float32) / 255.0
    hint[masked] = -1.0
    return hint


def inpaint(image: np.ndarray, mask=None, mask_blur: float = 0.0) -> np.ndarray:
    """Viewable inpaint map: the image with masked pixels set to black, (H, W, 3) uint8.

    It equals ``inpaint_hint`` clipped to [0, 1]; a uint8 map cannot carry the -1 marker, so
    generation must use :func:`inpaint_hint` with the same mask.
    """
    hint = inpaint_hint(image, mask, mask_blur)
    return (np.clip(hint, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _gamma_gray(channel: np.ndarray, gamma: float) -> np.ndarray:
    """(H, W) uint8 channel -> round(255 * (x / 255) ** gamma) as a gray (H, W, 3) uint8 image."""
    if gamma != 1.0:
        lut = np.round((np.arange(256) / 255.0) ** gamma * 255.0).clip(0, 255).astype(np.uint8)
        channel = lut[channel]
    return np.repeat(channel[:, :, None], 3, axis=2)


def recolor_luminance(image: np.ndarray, gamma_correction: float = 1.0) -> np.ndarray:
    """Lightness L of CIE Lab (OpenCV's 8-bit scaling, 0..255) with a gamma, as a gray image.

    Note: sd-webui-controlnet converts its RGB input with ``COLOR_BGR2LAB``, swapping the red
    and blue weights; we use the correct ``COLOR_RGB2LAB``.
    """
    gamma = _positive("recolor gamma_correction", gamma_correction)
    lab = cv2.cvtColor(HWC3(image), cv2.COLOR_RGB2LAB)
    return _gamma_gray(lab[:, :, 0], gamma)


def recolor_intensity(image: np.ndarray, gamma_correction: float = 1.0) -> np.ndarray:
    """Value V of HSV (max of R, G, B) with a gamma, as a gray image."""
    gamma = _positive("recolor gamma_correction", gamma_correction)
    img = HWC3(image)
    return _gamma_gray(np.maximum(np.maximum(img[:, :, 0], img[:, :, 1]), img[:, :, 2]), gamma)


ANNOTATORS = {
    "invert": invert,
    "shuffle": shuffle,
    "tile": tile,
    "inpaint": inpaint,
    "recolor_luminance": recolor_luminance,
    "recolor_intensity": recolor_intensity,
    "none": identity,
}
