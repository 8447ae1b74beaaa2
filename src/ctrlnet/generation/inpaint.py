"""Inpainting: the mask at pixel and latent size, the two ways a model repaints, "only masked"
crops, and the final composite.

- 4-channel UNets (any base + e.g. the v1.1 inpaint ControlNet): ControlNet-v1-1-nightly's
  ``gradio_inpaint.py`` algorithm. Before every step the known latent, re-noised to the step's
  sigma, replaces the sample outside the mask (``ddim_hacked``'s ``x0``/``mask`` blend), and the
  decoded image is composited with the blurred mask. (The app scales pixels by ``/127 - 1`` before
  encoding; we use ``/127.5 - 1`` like every other encode.)
- 9-channel inpainting UNets (sd-v1-5-inpainting): the binarised mask and the masked image's latents
  are concatenated to the UNet input at every step, as diffusers' inpaint pipelines do; the
  composite follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ctrlnet.generation.preprocess import blur_mask, prepare_mask


@dataclass
class MaskSet:
    """A mask at one processing size. ``pixel``: (H, W) float32 in [0, 1], blurred (composite and
    the v1.1 hint); ``binary``: (H, W) float32 {0, 1} of the unblurred mask (9-channel inputs)."""

    pixel: np.ndarray
    binary: np.ndarray

    @classmethod
    def make(cls, mask: np.ndarray, size: tuple[int, int], blur: float) -> "MaskSet":
        m = prepare_mask(mask, size)
        return cls(blur_mask(m, blur), (m >= 0.5).astype(np.float32))

    def latent(self, down: int) -> torch.Tensor:
        """(1, 1, H/down, W/down) of the blurred mask, area-averaged (``gradio_inpaint.py``)."""
        h, w = self.pixel.shape
        m = cv2.resize(self.pixel, (w // down, h // down), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(m)[None, None]

    def latent_binary(self, down: int) -> torch.Tensor:
        """(1, 1, H/down, W/down) binary mask, nearest (diffusers' ``prepare_mask_latents``)."""
        t = torch.from_numpy(self.binary)[None, None]
        return torch.nn.functional.interpolate(t, size=(t.shape[2] // down, t.shape[3] // down))


class LatentBlend:
    """Keeps the known region on the original: before each step, ``x = (x0 + sigma n) * keep +
    x * (1 - keep)`` with fresh per-image noise ``n`` (``ddim_hacked``'s ``q_sample`` blend, in sigma
    space). Call it on the start latent, then as the sampler callback (it edits ``x`` in place, which
    the sampler continues from)."""

    def __init__(self, x0: torch.Tensor, repaint: torch.Tensor, sigmas: torch.Tensor, noise):
        self.x0 = x0  # (B, C, h, w) known latents
        self.keep = 1.0 - repaint.to(x0)  # (1, 1, h, w)
        self.sigmas = sigmas
        self.noise = noise

    def blend(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        known = self.x0 + float(sigma) * self.noise(self.x0)
        return known * self.keep + x * (1.0 - self.keep)

    def __call__(self, info: dict) -> None:
        i = info["i"]
        if i + 1 < len(self.sigmas) - 1:  # no blend after the last step (as the original)
            x = info["x"]
            x.copy_(self.blend(x, float(self.sigmas[i + 1])))


def masked_image(image: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """The image with masked pixels set to mid-gray (0 in [-1, 1]), as diffusers' ``image * (mask < 0.5)``."""
    out = image.astype(np.float32)
    out[binary >= 0.5] = 127.5
    return out


def composite(generated: np.ndarray, original: np.ndarray, pixel_mask: np.ndarray) -> np.ndarray:
    """``generated * m + original * (1 - m)`` in float, then clipped and truncated to uint8
    (``gradio_inpaint.py``); ``generated`` may be the unclipped float decode."""
    m = pixel_mask[:, :, None]
    return (generated.astype(np.float32) * m + original.astype(np.float32) * (1.0 - m)).clip(0, 255).astype(np.uint8)


def crop_box(mask: np.ndarray, padding: int, aspect: float | None = None) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" region: the mask's bounding box grown by ``padding`` px, then grown to
    ``aspect`` (w / h) when given, kept inside the image. (y0, y1, x0, x1), or None for an empty mask."""
    ys, xs = np.nonzero(mask > 0.5 / 255)
    if len(ys) == 0:
        return None
    H, W = mask.shape[:2]
    y0, y1 = max(0, ys.min() - padding), min(H, ys.max() + 1 + padding)
    x0, x1 = max(0, xs.min() - padding), min(W, xs.max() + 1 + padding)
    if aspect:
        h, w = y1 - y0, x1 - x0
        if w / h < aspect:  # too tall: widen
            grow = min(W, int(round(h * aspect))) - w
            x0 = max(0, x0 - grow // 2)
            x1 = min(W, x0 + w + grow)
            x0 = max(0, x1 - (w + grow))
        else:
            grow = min(H, int(round(w / aspect))) - h
            y0 = max(0, y0 - grow // 2)
            y1 = min(H, y0 + h + grow)
            y0 = max(0, y1 - (h + grow))
    return int(y0), int(y1), int(x0), int(x1)


def paste(original: np.ndarray, patch: np.ndarray, box: tuple[int, int, int, int], pixel_mask: np.ndarray) -> np.ndarray:
    """Resize ``patch`` (uint8 or float) into ``box`` of ``original`` and composite it there with the
    full-size blurred ``pixel_mask`` (A1111's inpaint-full-res paste-back)."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    interp = cv2.INTER_LANCZOS4 if h * w > patch.shape[0] * patch.shape[1] else cv2.INTER_AREA
    fitted = cv2.resize(patch.astype(np.float32), (w, h), interpolation=interp)
    out = original.copy()
    out[y0:y1, x0:x1] = composite(fitted, original[y0:y1, x0:x1], pixel_mask[y0:y1, x0:x1])
    return out
