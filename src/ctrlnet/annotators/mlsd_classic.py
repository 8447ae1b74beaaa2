"""Straight line segments without a network: a fallback for the M-LSD annotator.

Segments come from OpenCV's LSD (``cv2.createLineSegmentDetector``) when the installed build has
it, else the FLD of ``cv2.ximgproc`` (opencv-contrib), else probabilistic Hough on Canny edges.
They are drawn as M-LSD's output is: white, 1 px wide, on black.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ctrlnet.image import HWC3

METHODS = ("auto", "lsd", "fld", "hough")
# M-LSD keeps at most its 200 best centre points; we keep the 200 longest segments.
MAX_LINES = 200
# Side offset (px) at which the two sides of a segment are sampled to measure its contrast.
_SIDE_OFFSET = 2.0
_SAMPLES = 16


def available_method() -> str:
    """The detector ``method="auto"`` picks in this OpenCV build."""
    if hasattr(cv2, "createLineSegmentDetector"):
        return "lsd"
    if hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "createFastLineDetector"):
        return "fld"
    return "hough"


def _detect(gray: np.ndarray, method: str, min_length: float) -> np.ndarray:
    """Raw segments (N, 4) float32 as x0, y0, x1, y1."""
    if method == "lsd":
        found = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD).detect(gray)[0]
    elif method == "fld":
        fld = cv2.ximgproc.createFastLineDetector(length_threshold=max(1, int(min_length)), do_merge=False)
        found = fld.detect(gray)
    else:
        edges = cv2.Canny(gray, 50, 150)
        # Hough needs some votes even when the caller accepts tiny segments.
        votes = max(10, int(min_length / 2))
        found = cv2.HoughLinesP(
            edges, 1, np.pi / 180, votes, minLineLength=max(2.0, min_length), maxLineGap=3
        )
    if found is None:
        return np.zeros((0, 4), np.float32)
    return np.asarray(found, np.float32).reshape(-1, 4)  # OpenCV 4 gives (N, 1, 4), 5 gives (N, 4)


def _contrast(gray: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Mean |left - right| intensity across each segment, in [0, 1]; seg is (N, 4)."""
    p0, p1 = seg[:, None, :2], seg[:, None, 2:]
    t = np.linspace(0.1, 0.9, _SAMPLES, dtype=np.float32)[None, :, None]
    pts = p0 + (p1 - p0) * t  # (N, S, 2)
    d = (p1 - p0)[:, 0]
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
    off = normal[:, None, :] * _SIDE_OFFSET
    f = gray.astype(np.float32)

    def sample(q):  # q (N, S, 2) -> (N, S) bilinear samples, edges replicated
        return cv2.remap(f, q[..., 0].astype(np.float32), q[..., 1].astype(np.float32), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    return np.abs(sample(pts + off) - sample(pts - off)).mean(axis=1) / 255.0


def detect_segments(
    image: np.ndarray,
    thr_v: float = 0.1,
    thr_d: float = 0.1,
    min_length: float = 0.0,
    max_lines: int = MAX_LINES,
    method: str = "auto",
) -> np.ndarray:
    """Line segments of an RGB image, (N, 4) float32 rows x0, y0, x1, y1, longest first.

    ``thr_v`` (M-LSD's value threshold, default 0.1) is the least mean contrast across a segment,
    as a fraction of full scale; ``thr_d`` (M-LSD's distance threshold, default 0.1, measured on
    M-LSD's half-resolution map) keeps segments longer than ``2 * thr_d`` px; ``min_length``
    (px) raises that floor. At most ``max_lines`` segments are kept.
    """
    if method not in METHODS:
        raise ValueError(f"mlsd_classic method must be one of {METHODS}, got {method!r}")
    for name, v in (("thr_v", thr_v), ("thr_d", thr_d), ("min_length", min_length)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"mlsd_classic {name} must be a finite number >= 0, got {v!r}")
    if int(max_lines) < 0:
        raise ValueError(f"mlsd_classic max_lines must be >= 0, got {max_lines!r}")
    if method == "auto":
        method = available_method()
    elif method == "fld" and not hasattr(getattr(cv2, "ximgproc", None), "createFastLineDetector"):
        raise ValueError("mlsd_classic method='fld' needs opencv-contrib (cv2.ximgproc), which is not installed")
    elif method == "lsd" and not hasattr(cv2, "createLineSegmentDetector"):
        raise ValueError("mlsd_classic method='lsd' needs cv2.createLineSegmentDetector, missing in this OpenCV")
    gray = cv2.cvtColor(HWC3(image), cv2.COLOR_RGB2GRAY)
    floor = max(float(min_length), 2.0 * float(thr_d))
    seg = _detect(gray, method, floor)
    length = np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1])
    keep = length > floor
    seg, length = seg[keep], length[keep]
    if len(seg):
        keep = _contrast(gray, seg) >= thr_v
        seg, length = seg[keep], length[keep]
    order = np.argsort(-length, kind="stable")[: int(max_lines)]
    return seg[order]


def mlsd_classic(
    image: np.ndarray,
    thr_v: float = 0.1,
    thr_d: float = 0.1,
    min_length: float = 0.0,
    max_lines: int = MAX_LINES,
    method: str = "auto",
) -> np.ndarray:
    """White 1-px segments from :func:`detect_segments` on black, (H, W, 3) uint8."""
    img = HWC3(image)
    seg = detect_segments(img, thr_v, thr_d, min_length, max_lines, method)
    out = np.zeros_like(img)
    for x0, y0, x1, y1 in seg:
        # Truncating coordinates, as the original M-LSD drawing does.
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 255), 1)
    return out


ANNOTATORS = {"mlsd_classic": mlsd_classic}
