"""Non-maximum suppression that thins a soft edge map into one-pixel lines.

This is the thinning step of ControlNet 1.0's fake-scribble preprocessing: blur the map, keep a
pixel when it is a local maximum along at least one of four directions (horizontal, vertical and
the two diagonals), then threshold what is kept.
"""

from __future__ import annotations

import cv2
import numpy as np

# (dy, dx) of one neighbour per direction; the opposite neighbour is (-dy, -dx).
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def nms(edge: np.ndarray, threshold: float = 127, sigma: float = 3.0) -> np.ndarray:
    """Thin ``edge`` ((H, W) or (H, W, C), any numeric dtype) into a {0, 255} uint8 map.

    A pixel survives when, after a Gaussian blur of ``sigma``, it is >= both its neighbours along
    some direction and its blurred value exceeds ``threshold``. Pixels outside the image count as
    -inf, so border pixels compare only against neighbours that exist.
    """
    x = np.asarray(edge, dtype=np.float32)
    if x.ndim not in (2, 3):
        raise ValueError(f"nms expects an (H, W) or (H, W, C) map, got shape {x.shape}")
    if not sigma > 0:
        raise ValueError(f"nms sigma must be > 0, got {sigma}")
    x = cv2.GaussianBlur(x, (0, 0), float(sigma))
    h, w = x.shape[:2]
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, mode="constant", constant_values=-np.inf)
    keep = np.zeros(x.shape, dtype=bool)
    for dy, dx in _DIRECTIONS:
        ahead = p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = p[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (x >= ahead) & (x >= behind)
    # Suppressed pixels read as 0 before thresholding (matters only for a negative threshold).
    kept = np.where(keep, x, np.float32(0.0))
    return np.where(kept > threshold, np.uint8(255), np.uint8(0))
