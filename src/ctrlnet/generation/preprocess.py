"""Images in, maps out: control maps fitted to the output size (resize modes, pixel perfect), the
inpaint mask, and the init image, each at a given size.

Arrays are numpy: images (H, W, 3) uint8; control maps (H, W, C) float32 in [0, 1] (the v1.1
inpaint hint also holds -1 where pixels are masked); masks (H, W) float32 in [0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.generation.request import ControlSpec, ResizeMode
from ctrlnet.image import HWC3, ImageError, check_size, resize_image

# Label-like maps keep their exact values when resized (nearest neighbour), as the original apps.
NEAREST_ANNOTATORS = frozenset({"seg", "openpose", "openpose_hand", "mlsd"})


def legacy_size(image: np.ndarray, resolution: int) -> tuple[int, int]:
    """(H, W) the original apps generate at for ``image``: short side ``resolution``, sides rounded
    to 64 (``annotator.util.resize_image``)."""
    h, w = image.shape[:2]
    check_size(h, w)
    k = float(resolution) / min(h, w)
    return max(64, int(np.round(h * k / 64.0)) * 64), max(64, int(np.round(w * k / 64.0)) * 64)


def pixel_perfect_resolution(image_hw: tuple[int, int], size: tuple[int, int], mode: ResizeMode) -> int:
    """The annotator resolution that maps the image 1:1 onto the output (sd-webui-controlnet's
    ``pixel_perfect_resolution``): the image's short side times the scale the resize mode applies
    (the larger of the two axis scales when cropping or stretching, the smaller when filling)."""
    (ih, iw), (h, w) = image_hw, size
    k0, k1 = h / ih, w / iw
    k = min(k0, k1) if mode is ResizeMode.RESIZE_AND_FILL else max(k0, k1)
    return int(round(k * min(ih, iw)))


def _resize(x: np.ndarray, w: int, h: int, nearest: bool) -> np.ndarray:
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if w * h < x.shape[0] * x.shape[1] else cv2.INTER_LINEAR
    y = cv2.resize(x, (w, h), interpolation=interp)
    return y[:, :, None] if y.ndim == 2 else y


def fit_map(cmap: np.ndarray, size: tuple[int, int], mode: ResizeMode | str, nearest: bool = False) -> np.ndarray:
    """Fit a map (H, W, C) to ``size`` = (h, w) with a resize mode (sd-webui-controlnet's
    ``detectmap_proc``): stretch; scale to cover and crop the centre; or scale to fit and pad with
    the median colour of the map's border. Area averaging when shrinking, linear when enlarging,
    nearest for label maps. The dtype is kept."""
    mode = ResizeMode(mode)
    h, w = size
    if cmap.ndim == 2:
        cmap = cmap[:, :, None]
    oh, ow = cmap.shape[:2]
    if (oh, ow) == (h, w):
        return cmap
    if mode is ResizeMode.JUST_RESIZE:
        return _resize(cmap, w, h, nearest)
    k0, k1 = h / oh, w / ow
    if mode is ResizeMode.CROP_AND_RESIZE:
        k = max(k0, k1)
        nh, nw = max(h, int(round(oh * k))), max(w, int(round(ow * k)))
        big = _resize(cmap, nw, nh, nearest)
        y0, x0 = (nh - h) // 2, (nw - w) // 2
        return big[y0:y0 + h, x0:x0 + w]
    k = min(k0, k1)
    nh, nw = min(h, max(1, int(round(oh * k)))), min(w, max(1, int(round(ow * k))))
    small = _resize(cmap, nw, nh, nearest)
    border = np.concatenate([cmap[0], cmap[-1], cmap[:, 0], cmap[:, -1]], axis=0)  # (2W+2H, C)
    fill = np.median(border, axis=0).astype(cmap.dtype)
    out = np.empty((h, w, cmap.shape[2]), dtype=cmap.dtype)
    out[:] = fill
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def annotate(spec: ControlSpec, image: np.ndarray, size: tuple[int, int],
             legacy_resolution: int | None = None) -> np.ndarray:
    """The unit's control map (H', W', C) uint8 before fitting: the annotator's output, or the image.

    With ``legacy_resolution`` (no width/height in the request) the image is first scaled as the
    original apps do (short side = it, sides rounded to 64) and the annotator runs on that, or on
    the image scaled to ``detect_resolution``: outputs of the original apps do not change.
    Otherwise a ready map is used as it is, and the annotator sees the image scaled to its
    resolution: ``detect_resolution``, else pixel perfect, else the output's short side.
    """
    ready_map = not spec.annotator or spec.annotator == "none"
    img = HWC3(np.asarray(image), background=0 if ready_map else 255)  # strokes on transparent: on black
    check_size(*img.shape[:2])
    if legacy_resolution is not None:
        img = resize_image(img, legacy_resolution)
    if not spec.annotator or spec.annotator == "none":
        return img
    from ctrlnet.annotators import run_annotator

    if spec.detect_resolution:
        src = resize_image(img, spec.detect_resolution)
    elif legacy_resolution is not None:
        src = img
    elif spec.pixel_perfect:
        src = resize_image(img, pixel_perfect_resolution(img.shape[:2], size, spec.resize_mode))
    else:
        src = resize_image(img, min(size))
    cmap = run_annotator(spec.annotator, src, **spec.annotator_params)
    return cmap[:, :, None] if cmap.ndim == 2 else cmap


def control_map(spec: ControlSpec, raw: np.ndarray, size: tuple[int, int],
                mode: ResizeMode | None = None) -> np.ndarray:
    """An annotated map (uint8) fitted to ``size`` with ``mode`` (default: the unit's resize mode)
    -> float32 in [0, 1]."""
    nearest = spec.annotator in NEAREST_ANNOTATORS
    return fit_map(raw, size, mode or spec.resize_mode, nearest).astype(np.float32) / 255.0


def inpaint_hint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The v1.1 inpaint ControlNet's hint (ControlNet-v1-1-nightly ``gradio_inpaint.py``): the image
    in [0, 1] with pixels whose (blurred) mask is above 0.5 set to -1. (H, W, 3) float32."""
    hint = image.astype(np.float32) / 255.0
    hint[mask > 0.5] = -1.0
    return hint


def prepare_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A user mask (H, W[, C]) uint8/bool/float, white = repaint -> (h, w) float32 in [0, 1] at
    ``size``, resized linearly (as ``gradio_inpaint.py``). An RGBA mask uses its alpha where the
    colour is flat (a mask painted on a transparent layer)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        if m.shape[2] == 4 and m[:, :, :3].std() == 0:
            m = m[:, :, 3]
        else:
            m = m[:, :, :3].max(axis=2) if m.shape[2] >= 3 else m[:, :, 0]
    if m.dtype == np.bool_:
        m = m.astype(np.float32)
    elif np.issubdtype(m.dtype, np.integer):
        m = m.astype(np.float32) / (65535.0 if m.max() > 255 else 255.0)
    else:
        m = np.clip(m.astype(np.float32), 0.0, 1.0)
    if m.ndim != 2:
        raise ImageError(f"mask must be (H, W) or (H, W, C), got shape {np.asarray(mask).shape}")
    check_size(*m.shape)
    h, w = size
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) if m.shape != (h, w) else m


def blur_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (h, w) float mask with ``sigma`` pixels (0 = none), as ``gradio_inpaint.py``."""
    return cv2.GaussianBlur(mask, (0, 0), sigma) if sigma > 0 else mask


def fit_image(image: np.ndarray, size: tuple[int, int], mode: ResizeMode | str = ResizeMode.JUST_RESIZE) -> np.ndarray:
    """An image (any shape HWC3 accepts) fitted to ``size`` = (h, w) as (h, w, 3) uint8 (Lanczos up,
    area down; A1111 resizes its img2img input the same way)."""
    img = HWC3(np.asarray(image))
    check_size(*img.shape[:2])
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    mode = ResizeMode(mode)
    if mode is ResizeMode.JUST_RESIZE:
        interp = cv2.INTER_LANCZOS4 if h * w > img.shape[0] * img.shape[1] else cv2.INTER_AREA
        return cv2.resize(img, (w, h), interpolation=interp)
    return fit_map(img, size, mode)


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's "fill" masked content: the masked area painted from its surroundings (OpenCV Telea)."""
    m = (mask > 0.5).astype(np.uint8) * 255
    return cv2.inpaint(image, m, 8, cv2.INPAINT_TELEA) if m.any() else image
