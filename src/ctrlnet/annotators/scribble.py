"""Scribble maps: a user's drawing binarised, or a "fake" scribble thinned from a soft-edge map.

The scribble ControlNet was trained on white strokes on black, so both annotators return that.
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.annotators.nms import nms
from ctrlnet.image import HWC3

POLARITIES = ("auto", "black_on_white", "white_on_black")


def detect_polarity(image: np.ndarray) -> str:
    """Guess how a drawing is inked: the background is whatever most pixels are.

    Returns ``"black_on_white"`` when at least half the pixels are brighter than mid-grey
    (channel mean >= 127.5), else ``"white_on_black"``.
    """
    img = HWC3(image)
    bright = img.sum(axis=2, dtype=np.uint16) >= 383  # mean of the three channels >= 127.5
    return "black_on_white" if 2 * int(np.count_nonzero(bright)) >= bright.size else "white_on_black"


def scribble(image: np.ndarray, threshold: float = 127, polarity: str = "auto") -> np.ndarray:
    """Binarise a drawing into white strokes on black, (H, W, 3) uint8 in {0, 255}.

    ``polarity``: ``"black_on_white"`` marks a pixel whose darkest channel is below ``threshold``
    (as the original scribble app: coloured ink on paper counts); ``"white_on_black"`` marks a
    pixel whose brightest channel is above it (as the original interactive canvas); ``"auto"``
    picks one with :func:`detect_polarity`.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"scribble polarity must be one of {POLARITIES}, got {polarity!r}")
    if not 0 <= threshold <= 255:
        raise ValueError(f"scribble threshold must be in [0, 255], got {threshold!r}")
    img = HWC3(image)
    if polarity == "auto":
        polarity = detect_polarity(img)
    r, g, b = img[:, :, 0], img[:, :, 1], img[:, :, 2]
    if polarity == "black_on_white":
        stroke = np.minimum(np.minimum(r, g), b) < threshold
    else:
        stroke = np.maximum(np.maximum(r, g), b) > threshold
    out = np.where(stroke, np.uint8(255), np.uint8(0))
    return np.repeat(out[:, :, None], 3, axis=2)


def fake_scribble(
    image: np.ndarray,
    soft_edge: np.ndarray | None = None,
    weights_dir=None,
    nms_threshold: float = 127,
    sigma: float = 3.0,
    **hed_params,
) -> np.ndarray:
    """Scribble-like strokes from an image's soft edges, (H, W, 3) uint8 in {0, 255}.

    The soft-edge map is ``soft_edge`` when given (any size; resized to the image bilinearly), else
    the registry's ``"hed"`` annotator run on ``image`` with ``weights_dir`` and ``hed_params``
    (``device``, ``dtype``, ...); a missing weights file raises FileNotFoundError saying both ways.
    Then, as ControlNet 1.0's fake-scribble app: NMS thinning (threshold ``nms_threshold``, blur
    ``sigma``), a second Gaussian blur of ``sigma`` to thicken strokes, and every pixel above 4
    set to 255, the rest to 0. A colour soft-edge map is reduced to its channel mean.
    """
    img = HWC3(image)
    h, w = img.shape[:2]
    if soft_edge is None:
        from ctrlnet.annotators import registry

        try:
            soft_edge = registry.get_annotator("hed")(img, weights_dir=weights_dir, **hed_params)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                "fake_scribble needs a soft-edge map: pass soft_edge=<HED/PiDiNet output>, or make "
                f"the HED weights available (weights_dir=<folder>). HED said: {e}"
            ) from e
    elif hed_params:
        raise TypeError(f"fake_scribble got unexpected parameters {sorted(hed_params)} with soft_edge")
    edge = HWC3(soft_edge)
    if (edge[:, :, :1] == edge).all():
        edge = edge[:, :, 0]  # (h', w') gray map, as HED returns
    else:
        edge = np.round(edge.astype(np.float32).mean(axis=2)).astype(np.uint8)
    if edge.shape != (h, w):
        # Resized as uint8, as the original app does, before thinning.
        edge = cv2.resize(edge, (w, h), interpolation=cv2.INTER_LINEAR)
    thin = nms(edge, nms_threshold, sigma)
    thick = cv2.GaussianBlur(thin, (0, 0), float(sigma))
    out = np.where(thick > 4, np.uint8(255), np.uint8(0))
    return np.repeat(out[:, :, None], 3, axis=2)


ANNOTATORS = {"scribble": scribble, "fake_scribble": fake_scribble}
