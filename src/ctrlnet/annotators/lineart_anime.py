"""Anime line art with the Anime2Sketch U-Net (Xiang et al. 2021) as ControlNet v1.1 uses it.

Weights: ``netG.pth`` from lllyasviel/Annotators: a pix2pix U-Net with 8 downsamplings, 64 base
filters and parameter-free instance norm; keys nest as ``model.model.1.model.3.model.3...``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from ctrlnet.annotators.weights import load_model
from ctrlnet.image import HWC3

WEIGHTS = "netG.pth"
MULTIPLE = 256  # 2**8: every downsampling must see an even size


def _norm(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c, affine=False, track_running_stats=False)


class UnetSkipBlock(nn.Module):
    """One U-Net level: down (LeakyReLU, 4x4/2 conv, norm), the inner level, up (ReLU, 4x4/2 deconv, norm).

    Indices inside ``model`` follow the original so the keys match. In the original the leading
    LeakyReLU runs in place, so the skip branch carries the activated input; we keep that.
    """

    def __init__(
        self,
        outer: int,
        inner: int,
        cin: int | None = None,
        sub: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        cin = outer if cin is None else cin
        down = nn.Conv2d(cin, inner, 4, stride=2, padding=1)
        if outermost:
            layers = [
                down,
                sub,
                nn.ReLU(),
                nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1),
                nn.Tanh(),
            ]
        elif innermost:
            layers = [
                nn.LeakyReLU(0.2),
                down,
                nn.ReLU(),
                nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1),
                _norm(outer),
            ]
        else:
            layers = [
                nn.LeakyReLU(0.2),
                down,
                _norm(inner),
                sub,
                nn.ReLU(),
                nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1),
                _norm(outer),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        h = self.model[0](x)  # activated input, shared by the skip and the down path
        y = h
        for layer in self.model[1:]:
            y = layer(y)
        return torch.cat([h, y], dim=1)


class UnetGenerator(nn.Module):
    """U-Net with ``num_downs`` levels: 64-128-256-512 filters, then 512 down to the 1x1 bottleneck."""

    def __init__(self, cin: int = 3, cout: int = 1, num_downs: int = 8, ngf: int = 64):
        super().__init__()
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, sub=block)
        block = UnetSkipBlock(ngf * 4, ngf * 8, sub=block)
        block = UnetSkipBlock(ngf * 2, ngf * 4, sub=block)
        block = UnetSkipBlock(ngf, ngf * 2, sub=block)
        self.model = UnetSkipBlock(cout, ngf, cin=cin, sub=block, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@torch.no_grad()
def lineart_anime(image: np.ndarray, *, weights_dir=None, device="cpu", dtype=torch.float32) -> np.ndarray:
    """Anime line art (H, W, 3) uint8, white lines on black (the v1.1 app feeds ``1 - map``)."""
    image = HWC3(image)
    H, W = image.shape[:2]
    model = load_model(WEIGHTS, UnetGenerator, weights_dir=weights_dir, device=device, dtype=dtype)
    p = next(model.parameters())
    Hn, Wn = MULTIPLE * int(np.ceil(H / MULTIPLE)), MULTIPLE * int(np.ceil(W / MULTIPLE))
    img = cv2.resize(image, (Wn, Hn), interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(img).to(p.device, p.dtype).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, Hn, Wn)
    line = (model(x)[0, 0] * 127.5 + 127.5).float().cpu().numpy()  # 255 = paper
    line = cv2.resize(line, (W, H), interpolation=cv2.INTER_CUBIC)
    raw = line.clip(0, 255).astype(np.uint8)
    return HWC3(255 - raw)


ANNOTATORS = {"lineart_anime": lineart_anime}
