"""Does a fill50k ControlNet follow its control? IoU of the generated circle with the hint's circle,
and the error of the circle and background colours against the colours the prompt names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ctrlnet.training.colors import COLORS, parse_fill50k_prompt

# Pixels this close to the circle's edge are left out of the colour means (anti-aliasing, blur).
EDGE_MARGIN = 3


@dataclass
class CircleScore:
    iou: float
    circle_error: float  # mean |RGB difference| (0..255) of the mean circle colour
    background_error: float
    shape_iou: float = float("nan")  # IoU whatever the colours (see shape_mask)

    @property
    def color_error(self) -> float:
        return (self.circle_error + self.background_error) / 2


def disk(size: tuple[int, int], cx: int, cy: int, r: int) -> np.ndarray:
    """Pixels at least half covered by the disk, drawn as the fill50k builder draws it."""
    m = np.zeros(size, np.uint8)
    if r > 0:
        cv2.circle(m, (int(cx), int(cy)), int(r), 255, -1, lineType=cv2.LINE_AA)
    return m > 127


def shape_mask(image: np.ndarray) -> np.ndarray:
    """The generated circle without looking at the prompt's colours: the pixels split into two
    colour clusters (2-means in RGB), and the circle is the cluster that covers less of the image
    border (fill50k backgrounds surround the circle). Nothing here looks at the hint."""
    img = image.reshape(-1, 3).astype(np.float32)
    if np.ptp(img, axis=0).max() < 1:
        return np.zeros(image.shape[:2], bool)
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(0)
    _, labels, _ = cv2.kmeans(img, 2, None, crit, 3, cv2.KMEANS_PP_CENTERS)
    labels = labels.reshape(image.shape[:2]).astype(bool)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return ~labels if border.mean() > 0.5 else labels


def circle_score(image: np.ndarray, circle: Sequence[int], circle_rgb, background_rgb) -> CircleScore:
    """Score one generated image (H, W, 3) uint8 against the hint circle ``(cx, cy, r)``.

    The generated circle is the set of pixels nearer (in RGB) to the circle colour than to the
    background colour.
    """
    img = image.astype(np.float32)
    c, b = np.asarray(circle_rgb, np.float32), np.asarray(background_rgb, np.float32)
    pred = np.linalg.norm(img - c, axis=-1) < np.linalg.norm(img - b, axis=-1)
    cx, cy, r = circle
    hw = image.shape[:2]
    truth = disk(hw, cx, cy, r)
    union = np.logical_or(pred, truth).sum()
    iou = float(np.logical_and(pred, truth).sum() / union) if union else 1.0
    inner = disk(hw, cx, cy, r - EDGE_MARGIN)
    outer = ~disk(hw, cx, cy, r + EDGE_MARGIN)
    ce = float(np.abs(img[inner].mean(0) - c).mean()) if inner.any() else float("nan")
    be = float(np.abs(img[outer].mean(0) - b).mean()) if outer.any() else float("nan")
    shape = shape_mask(image)
    union = np.logical_or(shape, truth).sum()
    shape_iou = float(np.logical_and(shape, truth).sum() / union) if union else 1.0
    return CircleScore(iou, ce, be, shape_iou)


def load_pair(base, control, device: str | torch.device = "cpu"):
    """A base file and a ControlNet file written by the demo recipe, in eval mode on ``device``."""
    from ctrlnet.training.models import load_model_file

    models = load_model_file(base)
    models.controlnet = load_model_file(control).controlnet
    for m in models.modules().values():
        m.eval().to(device)
    return models


@torch.no_grad()
def generate_rows(models, rows: Sequence[dict], root, strength: float = 1.0, steps: int = 20,
                  guidance_scale: float = 5.0, seed: int = 0, batch: int = 25) -> list[np.ndarray]:
    """Images for fill50k rows (hint file + prompt) with the Denoiser and DDIM, seeded per row."""
    from pathlib import Path

    from ctrlnet.image import load_image
    from ctrlnet.sampling.schedule import DiscreteSchedule
    from ctrlnet.training.previews import generate_latents, to_uint8

    schedule = DiscreteSchedule(models.config.schedule)
    vae = models.vae
    out: list[np.ndarray] = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        hints = np.stack([load_image(Path(root) / r["source"]) for r in part])  # (B, H, W, 3)
        hint = torch.from_numpy(hints).permute(0, 3, 1, 2).float() / 255.0
        shape = (vae.embed_dim, hint.shape[-2] // vae.downscale, hint.shape[-1] // vae.downscale)
        z = generate_latents(models.unet, models.text, schedule, [r["prompt"] for r in part], shape,
                             models.controlnet, hint, steps, guidance_scale, strength, seed=seed + i)
        p = next(vae.parameters())
        out.extend(to_uint8(vae.decode(z.to(p.device, p.dtype))))
    return out


def evaluate(models, rows: Sequence[dict], root, strength: float = 1.0, **kw) -> dict:
    """Mean IoU and colour errors over ``rows`` (each with ``circle`` and a fill50k prompt)."""
    images = generate_rows(models, rows, root, strength, **kw)
    scores = []
    for img, row in zip(images, rows):
        circle, background = parse_fill50k_prompt(row["prompt"])
        scores.append(circle_score(img, row["circle"], COLORS[circle], COLORS[background]))
    return {
        "n": len(scores), "strength": strength,
        "iou": float(np.mean([s.iou for s in scores])),
        "shape_iou": float(np.mean([s.shape_iou for s in scores])),
        "circle_error": float(np.nanmean([s.circle_error for s in scores])),
        "background_error": float(np.nanmean([s.background_error for s in scores])),
        "color_error": float(np.nanmean([s.color_error for s in scores])),
        "images": images,
    }
