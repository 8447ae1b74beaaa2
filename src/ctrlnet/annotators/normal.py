"""Normal map from a depth map, as ControlNet 1.0's MiDaS "normal" annotator computes it.

The depth is MiDaS-style relative inverse depth (larger = nearer). Its Sobel derivatives give the
x and y components, a constant ``a`` the z component, and pixels whose min-max normalised depth is
below ``bg_th`` are treated as flat background. ControlNet 1.0's normal model was fed this map with
its channels reversed (``detected_map[:, :, ::-1]`` in gradio_normal2image.py; sd-webui-controlnet
reverses it in the annotator), so :func:`normal` returns channels in the order (z, y, x): the
array is the hint the model wants, not a conventional (x, y, z)-as-RGB normal picture.
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.image import HWC3, ImageError

DEFAULT_A = np.pi * 2.0
DEFAULT_BG_TH = 0.4  # the app's default; the detector's own default was 0.1


def normal_from_depth(depth: np.ndarray, a: float = DEFAULT_A, bg_th: float = DEFAULT_BG_TH) -> np.ndarray:
    """Unit normals (H, W, 3) float32 in component order (x, y, z) from an (H, W) depth array.

    ``depth`` is used in its own units: Sobel derivatives of raw depth are compared against
    ``a``, so a smaller ``a`` (or a depth of larger range) gives more tilted normals. The original
    applied this to raw MiDaS output; a uint8 depth image works in 0..255 units.
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"normal_from_depth expects an (H, W) depth array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("depth contains NaN or infinite values")
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f"normal a must be a finite number > 0, got {a!r}")
    span = float(d.max() - d.min())
    # A constant depth has no foreground: all of it is flat background.
    rel = (d - d.min()) / span if span > 0 else np.zeros_like(d)
    nx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    ny = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    background = rel < bg_th
    nx[background] = 0
    ny[background] = 0
    n = np.stack([nx, ny, np.full_like(nx, a)], axis=2)  # (H, W, 3)
    n /= np.sqrt(np.sum(n**2, axis=2, keepdims=True))
    return n


def _depth_from(image: np.ndarray, depth) -> np.ndarray:
    """The (H, W) depth to use: ``depth`` when given (resized to the image), else a gray image."""
    h, w = image.shape[:2]
    if depth is None:
        if not ((image[:, :, :1] == image).all()):
            raise ValueError(
                "normal needs a depth map, got a colour image: run the 'depth' annotator first and "
                "pass its output as the image, or pass the colour image with depth=<(H, W) array>"
            )
        return image[:, :, 0].astype(np.float32)
    d = np.asarray(depth)
    if d.dtype.kind not in "biuf":
        raise ImageError(f"depth must be a numeric array, got dtype {d.dtype}")
    if d.ndim == 3:
        d = d[:, :, 0]  # depth images are gray; their channels are equal
    if d.ndim != 2:
        raise ImageError(f"depth must be (H, W) or (H, W, C), got shape {np.asarray(depth).shape}")
    d = d.astype(np.float32)
    if d.shape != (h, w):
        d = cv2.resize(d, (w, h), interpolation=cv2.INTER_LINEAR)
    return d


def normal(image: np.ndarray, depth=None, a: float = DEFAULT_A, bg_th: float = DEFAULT_BG_TH) -> np.ndarray:
    """ControlNet 1.0 normal hint, (H, W, 3) uint8 with channels (z, y, x) (see module doc).

    The depth comes from ``depth`` when given (raw MiDaS output reproduces the original exactly;
    uint8/float maps are used in their own units) or else from ``image`` itself, which must then
    be a gray depth image. Each component n maps to ``uint8(n * 127.5 + 127.5)``, so flat
    background reads (255, 127, 127).
    """
    img = HWC3(image)
    n = normal_from_depth(_depth_from(img, depth), a, bg_th)
    out = (n * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[:, :, ::-1])


ANNOTATORS = {"normal": normal}
