"""Soft edges with the ControlNet v1.1 HED (Apache-2.0 re-training by lllyasviel, RGB input).

Weights: ``ControlNetHED.pth`` from lllyasviel/Annotators. Keys: ``norm`` and ``block{1..5}.convs.N`` /
``block{1..5}.projection`` — five VGG-like stages, each with a 1x1 side projection to one channel.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.annotators.weights import load_model
from ctrlnet.image import HWC3

WEIGHTS = "ControlNetHED.pth"


class HEDStage(nn.Module):
    """``n`` 3x3 conv+ReLU layers (after an optional 2x2 max-pool) and a 1x1 projection to one map."""

    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(n)]
        )
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """Five stages (64, 128, 256, 512, 512 channels); returns the five side maps."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned per-channel mean
        self.block1 = HEDStage(3, 64, 2)
        self.block2 = HEDStage(64, 128, 2)
        self.block3 = HEDStage(128, 256, 3)
        self.block4 = HEDStage(256, 512, 3)
        self.block5 = HEDStage(512, 512, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: (B, 3, H, W) RGB in [0, 255]
        h = x - self.norm
        sides = []
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            h, side = block(h, pool=i > 0)
            sides.append(side)  # (B, 1, H / 2**i, W / 2**i)
        return sides


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Quantise a [0, 1] map to ``step + 1`` levels (v1.1 "safe" mode hides faint, noisy edges)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


@torch.no_grad()
def hed(
    image: np.ndarray, *, safe: bool = False, weights_dir=None, device="cpu", dtype=torch.float32
) -> np.ndarray:
    """Soft edge map (H, W, 3) uint8, white edges on black, as the v1.1 softedge ControlNet expects."""
    image = HWC3(image)
    H, W = image.shape[:2]
    model = load_model(WEIGHTS, ControlNetHED, weights_dir=weights_dir, device=device, dtype=dtype)
    p = next(model.parameters())
    x = torch.from_numpy(image).to(p.device, p.dtype).permute(2, 0, 1)[None]  # (1, 3, H, W)
    sides = [s[0, 0].float().cpu().numpy() for s in model(x)]
    # Each side map is upsampled to full size with OpenCV, as the original does.
    stack = np.stack([cv2.resize(s, (W, H), interpolation=cv2.INTER_LINEAR) for s in sides], axis=2)
    edge = 1.0 / (1.0 + np.exp(-np.mean(stack, axis=2).astype(np.float64)))
    if safe:
        edge = safe_step(edge)
    return HWC3((edge * 255.0).clip(0, 255).astype(np.uint8))


ANNOTATORS = {"hed": hed}
