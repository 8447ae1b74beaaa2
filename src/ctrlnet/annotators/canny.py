"""Canny edges (ControlNet's ``canny`` preprocessor): white edges on black."""

from __future__ import annotations

import math

import cv2
import numpy as np

from ctrlnet.image import HWC3


def canny(image: np.ndarray, low_threshold: float = 100, high_threshold: float = 200) -> np.ndarray:
    """Canny edge map of an RGB image as (H, W, 3) uint8 in {0, 255}.

    Defaults are the original apps' (100, 200). OpenCV runs Canny on all three channels and keeps
    the strongest gradient, as the original did by passing the RGB image straight in.
    """
    for name, v in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"canny {name} must be a finite number >= 0, got {v!r}")
    if low_threshold > high_threshold:
        raise ValueError(f"canny low_threshold ({low_threshold}) is above high_threshold ({high_threshold})")
    img = HWC3(image)
    edges = cv2.Canny(img, float(low_threshold), float(high_threshold))  # (H, W)
    return np.repeat(edges[:, :, None], 3, axis=2)


ANNOTATORS = {"canny": canny}
