"""Line-art colorization: artists' black-on-white drawings coloured by a line-art ControlNet.

The v1.1 line-art models (``control_v11p_sd15_lineart``, ``control_v11p_sd15s2_lineart_anime``)
were trained on white lines on black, so the drawing is inverted first. The anime model was
trained with CLIP skip 2 and prompts of three 75-token windows; :func:`lineart_request` applies
those settings when ``anime`` is set. With no prompt, guess mode lets the control lead.
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.image import HWC3
from ctrlnet.pipeline import ControlSpec, GenerationRequest, GenerationResult, Models, generate


def is_dark_on_light(image: np.ndarray) -> bool:
    """True when most pixels are light (a drawing on paper): the median gray is above mid-level."""
    return float(np.median(cv2.cvtColor(HWC3(image), cv2.COLOR_RGB2GRAY))) > 127.5


def prepare_lineart(image: np.ndarray, invert: bool | None = None, binarize: int | str | None = None,
                    min_area: int = 0) -> np.ndarray:
    """A line-art control map (H, W, 3) uint8: white lines on black.

    ``invert``: True inverts (black-on-white input), False keeps, None decides by the median
    brightness. ``binarize``: a threshold 1..254 or ``"otsu"``; lines become 255, the rest 0.
    ``min_area``: connected line pieces smaller than this many pixels (specks, scanner dust) are
    erased; it looks at pixels above the threshold (or above 127 when not binarising).
    """
    gray = cv2.cvtColor(HWC3(image), cv2.COLOR_RGB2GRAY)
    if invert is None:
        invert = is_dark_on_light(image)
    lines = 255 - gray if invert else gray.copy()  # (H, W): white lines on black
    thr = 127
    if binarize is not None:
        if binarize == "otsu":
            thr, lines = cv2.threshold(lines, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            if isinstance(binarize, bool) or not 1 <= int(binarize) <= 254:
                raise ValueError(f"binarize must be a threshold in 1..254 or 'otsu', got {binarize!r}")
            thr = int(binarize)
            lines = np.where(lines > thr, 255, 0).astype(np.uint8)
    if min_area > 0:
        mask = (lines > thr).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
        small = small[small != 0]  # label 0 is the background
        if small.size:
            lines = lines.copy()
            lines[np.isin(labels, small)] = 0
    return np.repeat(lines[:, :, None], 3, axis=2)


def is_anime_model(name: str) -> bool:
    """Whether a ControlNet name/path is the anime line-art model (or one trained like it)."""
    return "anime" in name.lower()


def lineart_request(control_map: np.ndarray, prompt: str = "", anime: bool = True, model: str | None = None,
                    guess_mode: bool | None = None, strength: float = 1.0, **request_args) -> GenerationRequest:
    """The request for a prepared map: anime settings (CLIP skip 2, three 75-token windows) when
    ``anime``; guess mode when there is no prompt (unless ``guess_mode`` says otherwise)."""
    if guess_mode is None:
        guess_mode = not prompt.strip()
    settings = {"clip_skip": 2, "prompt_chunks": 3} if anime else {}
    settings.update(request_args)
    return GenerationRequest(prompt=prompt, controls=[ControlSpec(image=control_map, model=model, strength=strength)],
                             guess_mode=guess_mode, **settings)


def colorize_lineart(models: Models, image: np.ndarray, prompt: str = "", model: str | None = None,
                     invert: bool | None = None, binarize: int | str | None = None, min_area: int = 0,
                     anime: bool | None = None, progress=None, **request_args) -> GenerationResult:
    """Colour a drawing with the loaded line-art ControlNet ``model`` (default: the first).

    ``anime=None`` uses the anime settings when the ControlNet's name says so.
    """
    name = model or next(iter(models.controlnets), "")
    if anime is None:
        anime = is_anime_model(name)
    cmap = prepare_lineart(image, invert=invert, binarize=binarize, min_area=min_area)
    req = lineart_request(cmap, prompt, anime=anime, model=model, **request_args)
    return generate(models, req, progress=progress)
