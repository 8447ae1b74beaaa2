"""CIE Lab helpers: the gray input of colorization, the luminance merge that keeps the input's
lightness exactly, chroma error, and the nearest-luminance colour transfer baseline.

Lightness is OpenCV's 8-bit ``L`` (``cv2.COLOR_RGB2LAB`` on uint8: ``L* * 255 / 100``), the same
measure the ``recolor_luminance`` annotator gives, so "keeps L" is checked in the units users see.
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.image import HWC3


def lightness(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 OpenCV Lab lightness of an RGB (or gray) uint8 image."""
    return cv2.cvtColor(HWC3(image), cv2.COLOR_RGB2LAB)[:, :, 0]


def to_gray(image: np.ndarray) -> np.ndarray:
    """The colorizers' gray input: Lab lightness as a 3-channel gray uint8 image (H, W, 3)."""
    return np.repeat(lightness(image)[:, :, None], 3, axis=2)


# sRGB (D65) <-> XYZ, the matrix and white point OpenCV uses, so our L matches its 8-bit L.
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]], np.float64)
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_WHITE = np.array([0.950456, 1.0, 1.088754])
_EPS = 0.008856


def _lab_float(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float Lab (H, W, 3): L in 0..100, a/b about -128..127."""
    c = HWC3(image).astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _RGB2XYZ.T / _WHITE
    f = np.where(xyz > _EPS, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    L = np.where(xyz[..., 1] > _EPS, 116.0 * f[..., 1] - 16.0, 903.3 * xyz[..., 1])
    return np.stack([L, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _rgb_float(lab: np.ndarray) -> np.ndarray:
    """float Lab -> float sRGB in [0, 1] where in gamut; unclipped (out-of-gamut leaves [0, 1])."""
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (L + 16.0) / 116.0
    fx, fz = fy + a / 500.0, fy - b / 200.0

    def finv(t):
        return np.where(t**3 > _EPS, t**3, (t - 16.0 / 116.0) / 7.787)

    y = np.where(L > 903.3 * _EPS, fy**3, L / 903.3)
    xyz = np.stack([finv(fx), y, finv(fz)], axis=-1) * _WHITE
    lin = xyz @ _XYZ2RGB.T
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.abs(lin) ** (1 / 2.4) * np.sign(lin) - 0.055)


def merge_luminance(colored: np.ndarray, source: np.ndarray, iterations: int = 12) -> np.ndarray:
    """RGB uint8 with the chroma (a, b) of ``colored`` and the lightness L of ``source``.

    ``colored`` is resized to ``source``'s size. Where the combination leaves the RGB gamut, the
    chroma is scaled down (bisection per pixel) instead of clipping RGB, which would shift L; a
    last pass nudges pixels whose 8-bit L still differs after rounding (by a gray offset of one
    level at a time), so ``lightness(result)`` is within one level of ``lightness(source)``.
    """
    src = HWC3(source)
    h, w = src.shape[:2]
    col = HWC3(colored)
    if col.shape[:2] != (h, w):
        col = cv2.resize(col, (w, h), interpolation=cv2.INTER_CUBIC)
    return _compose(_lab_float(src)[:, :, :1], _lab_float(col)[:, :, 1:], lightness(src), iterations)


def _compose(L: np.ndarray, ab: np.ndarray, target_l: np.ndarray, iterations: int = 12) -> np.ndarray:
    """uint8 RGB from float L (H, W, 1) and ab (H, W, 2), chroma scaled into the gamut."""
    h, w = L.shape[:2]

    def rgb_at(scale: np.ndarray) -> np.ndarray:
        return _rgb_float(np.concatenate([L, ab * scale[:, :, None]], axis=2))

    def in_gamut(rgb: np.ndarray) -> np.ndarray:
        return np.all((rgb >= -1e-4) & (rgb <= 1 + 1e-4), axis=2)

    lo = np.zeros((h, w), np.float32)  # chroma scale known to be in gamut (gray always is)
    hi = np.ones((h, w), np.float32)
    lo[in_gamut(rgb_at(hi))] = 1.0
    for _ in range(iterations):
        todo = lo < hi
        if not todo.any():
            break
        mid = (lo + hi) / 2
        good = in_gamut(rgb_at(mid))
        lo = np.where(todo & good, mid, lo)
        hi = np.where(todo & ~good, mid, hi)
    out = np.clip(np.round(rgb_at(lo) * 255.0), 0, 255).astype(np.uint8)
    return _fix_rounding(out, target_l)


def _fix_rounding(rgb: np.ndarray, target_l: np.ndarray, max_rounds: int = 4) -> np.ndarray:
    """Move pixels whose 8-bit L misses ``target_l`` by more than one level toward it."""
    out = rgb.astype(np.int16)
    for _ in range(max_rounds):
        diff = lightness(out.clip(0, 255).astype(np.uint8)).astype(np.int16) - target_l.astype(np.int16)
        bad = np.abs(diff) > 1
        if not bad.any():
            break
        out[bad] -= np.sign(diff[bad])[:, None]
    return out.clip(0, 255).astype(np.uint8)


def chroma_error(image: np.ndarray, truth: np.ndarray) -> float:
    """Mean Euclidean (a, b) distance in CIE Lab units between two RGB uint8 images of one size."""
    a, b = _lab_float(image)[:, :, 1:], _lab_float(truth)[:, :, 1:]
    return float(np.sqrt(((a - b) ** 2).sum(axis=2)).mean())


def transfer_by_luminance(gray: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Naive baseline: each pixel takes the mean (a, b) of the reference pixels with the nearest
    8-bit lightness (an L -> ab table, empty levels filled from the nearest filled one); L kept."""
    ref = HWC3(reference)
    ref_lab = _lab_float(ref)
    ref_l = lightness(ref).ravel()
    counts = np.bincount(ref_l, minlength=256).astype(np.float64)
    table = np.zeros((256, 2), np.float64)
    for c in range(2):
        table[:, c] = np.bincount(ref_l, weights=ref_lab[:, :, 1 + c].ravel(), minlength=256)
    filled = np.flatnonzero(counts)
    table[filled] /= counts[filled, None]
    levels = np.arange(256)
    nearest = filled[np.abs(levels[:, None] - filled[None, :]).argmin(axis=1)]
    table = table[nearest]
    src = HWC3(gray)
    ab = table[lightness(src)].astype(np.float32)  # (H, W, 2)
    return _compose(_lab_float(src)[:, :, :1], ab, lightness(src))
