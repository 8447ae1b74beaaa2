"""Straight line segments with M-LSD (Gu et al. 2021), the large MobileNetV2 model used by ControlNet.

Weights: ``mlsd_large_512_fp32.pth`` from lllyasviel/Annotators (keys ``backbone.features.N.*`` and
``block15`` .. ``block23``). The network predicts, at half resolution, a line-centre heat map and the
displacements to both ends; segments are the local maxima above ``thr_v`` longer than ``thr_d``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.annotators.weights import load_model
from ctrlnet.image import HWC3

WEIGHTS = "mlsd_large_512_fp32.pth"
STRIDE = 16  # total downsampling of the backbone: input sides must be multiples of this


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BN + ReLU6; stride 2 pads right/bottom only, like the TFLite original."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        pad = 0 if stride == 2 else (k - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t = 1), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.residual = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, k=1)] if t != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The first 14 MobileNetV2 layers on a 4-channel input; returns the five pyramid levels."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]  # t, c, n, s
    TAPS = (1, 3, 6, 10, 13)

    def __init__(self):
        super().__init__()
        layers, c = [ConvBNReLU(4, 32, stride=2)], 32
        for t, cout, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                taps.append(x)
        return taps  # strides 2, 4, 8, 16, 16; channels 16, 24, 32, 64, 96


def _cbr(cin: int, cout: int, k: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU()
    )


class BlockTypeA(nn.Module):
    """Fuse a lateral feature (``conv2``) with the upsampled deeper feature (``conv1``)."""

    def __init__(self, c_lateral: int, c_deep: int, out_lateral: int, out_deep: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _cbr(c_deep, out_deep, 1)
        self.conv2 = _cbr(c_lateral, out_lateral, 1)
        self.upscale = upscale

    def forward(self, lateral: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep = self.conv1(deep)
        if self.upscale:
            deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((self.conv2(lateral), deep), dim=1)


class BlockTypeB(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3, padding=1)
        self.conv2 = _cbr(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3, padding=5, dilation=5)
        self.conv2 = _cbr(cin, cin, 3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """MobileV2_MLSD_Large: returns (B, 9, H/2, W/2): centre logit, 4 displacements, 4 unused maps."""

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Features()
        self.block15 = BlockTypeA(64, 96, 64, 64, upscale=False)
        self.block16 = BlockTypeB(128, 64)
        self.block17 = BlockTypeA(32, 64, 64, 64)
        self.block18 = BlockTypeB(128, 64)
        self.block19 = BlockTypeA(24, 64, 64, 64)
        self.block20 = BlockTypeB(128, 64)
        self.block21 = BlockTypeA(16, 64, 64, 64)
        self.block22 = BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block23(self.block22(self.block21(c1, x)))
        return x[:, 7:]


def decode_lines(tp: torch.Tensor, thr_v: float, thr_d: float, topk: int = 200, ksize: int = 3) -> np.ndarray:
    """(1, 9, h, w) prediction -> (N, 4) segments ``x0, y0, x1, y1`` in prediction-grid units."""
    _, _, h, w = tp.shape
    heat = torch.sigmoid(tp[:, 0])  # (1, h, w)
    peak = F.max_pool2d(heat, ksize, stride=1, padding=(ksize - 1) // 2) == heat
    heat = (heat * peak).reshape(-1)
    scores, idx = torch.topk(heat, min(topk, heat.numel()))
    ys, xs = (idx // w).cpu().numpy(), (idx % w).cpu().numpy()
    scores = scores.float().cpu().numpy()
    disp = tp[0, 1:5].float().permute(1, 2, 0).cpu().numpy()  # (h, w, 4): start dx, dy, end dx, dy
    length = np.sqrt(((disp[..., :2] - disp[..., 2:]) ** 2).sum(-1))
    keep = (scores > thr_v) & (length[ys, xs] > thr_d)
    ys, xs = ys[keep], xs[keep]
    d = disp[ys, xs]
    return np.stack([xs + d[:, 0], ys + d[:, 1], xs + d[:, 2], ys + d[:, 3]], axis=1).reshape(-1, 4)


@torch.no_grad()
def mlsd(
    image: np.ndarray,
    *,
    thr_v: float = 0.1,
    thr_d: float = 0.1,
    weights_dir=None,
    device="cpu",
    dtype=torch.float32,
) -> np.ndarray:
    """White 1-pixel line segments on black, (H, W, 3) uint8 (value / distance thresholds as the app)."""
    image = HWC3(image)
    H, W = image.shape[:2]
    model = load_model(WEIGHTS, MLSDLarge, weights_dir=weights_dir, device=device, dtype=dtype)
    p = next(model.parameters())
    # The original runs at the image's own size (a multiple of 64 in the apps); other sizes are
    # resized to the nearest multiple of 16 so the feature pyramid lines up.
    h_in = max(STRIDE, int(round(H / STRIDE)) * STRIDE)
    w_in = max(STRIDE, int(round(W / STRIDE)) * STRIDE)
    resized = (
        image if (h_in, w_in) == (H, W) else cv2.resize(image, (w_in, h_in), interpolation=cv2.INTER_AREA)
    )
    x = np.concatenate([resized.astype(np.float32), np.ones((h_in, w_in, 1), np.float32)], axis=2)
    x = torch.from_numpy(x / 127.5 - 1.0).to(p.device, p.dtype).permute(2, 0, 1)[None]  # (1, 4, h, w)
    lines = decode_lines(model(x), thr_v, thr_d) * 2.0  # prediction grid is half the input size
    lines[:, [0, 2]] *= W / w_in
    lines[:, [1, 3]] *= H / h_in
    out = np.zeros((H, W), np.uint8)
    for x0, y0, x1, y1 in lines:
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return HWC3(out)


ANNOTATORS = {"mlsd": mlsd}
