"""Line art with the "informative drawings" generator (Chan et al. 2022) as ControlNet v1.1 uses it.

Weights: ``sk_model.pth`` (lineart) and ``sk_model2.pth`` (lineart_coarse) from lllyasviel/Annotators;
a ResNet generator with 3 residual blocks and parameter-free instance norm (keys ``model0.1``,
``model1.{0,3}``, ``model2.N.conv_block.{1,5}``, ``model3.{0,3}``, ``model4.1``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.annotators.weights import load_model
from ctrlnet.image import HWC3

WEIGHTS = {"lineart": "sk_model.pth", "lineart_coarse": "sk_model2.pth"}


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(c, c, 3),
            nn.InstanceNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """7x7 stem, two stride-2 downsamples, residual blocks, two transposed-conv upsamples, sigmoid."""

    def __init__(self, cin: int = 3, cout: int = 1, n_blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(cin, 64, 7), nn.InstanceNorm2d(64), nn.ReLU()
        )
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, stride=2, padding=1),
            nn.InstanceNorm2d(256),
            nn.ReLU(),
        )
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(n_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(64),
            nn.ReLU(),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, cout, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def _run(name: str, image: np.ndarray, weights_dir, device, dtype) -> np.ndarray:
    image = HWC3(image)
    H, W = image.shape[:2]
    model = load_model(WEIGHTS[name], LineartGenerator, weights_dir=weights_dir, device=device, dtype=dtype)
    p = next(model.parameters())
    x = torch.from_numpy(image).to(p.device, p.dtype).permute(2, 0, 1)[None] / 255.0  # (1, 3, H, W) RGB
    # Two stride-2 stages: pad (reflect) to a multiple of 4 so the output matches the input exactly;
    # the original apps always feed multiples of 64, where this is a no-op.
    ph, pw = -H % 4, -W % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(H, W) > 4 else "replicate")
    line = model(x)[0, 0, :H, :W].float().cpu().numpy()  # 1 = paper, 0 = ink
    raw = (line * 255.0).clip(0, 255).astype(np.uint8)
    # The v1.1 lineart ControlNet is fed 1 - raw / 255: white lines on black.
    return HWC3(255 - raw)


@torch.no_grad()
def lineart(image: np.ndarray, *, weights_dir=None, device="cpu", dtype=torch.float32) -> np.ndarray:
    """Fine line art (H, W, 3) uint8, white lines on black (``sk_model.pth``)."""
    return _run("lineart", image, weights_dir, device, dtype)


@torch.no_grad()
def lineart_coarse(image: np.ndarray, *, weights_dir=None, device="cpu", dtype=torch.float32) -> np.ndarray:
    """Coarse line art (H, W, 3) uint8, white lines on black (``sk_model2.pth``)."""
    return _run("lineart_coarse", image, weights_dir, device, dtype)


ANNOTATORS = {"lineart": lineart, "lineart_coarse": lineart_coarse}
