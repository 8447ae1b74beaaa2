"""Soft edges with PiDiNet (Su et al. 2021, "table5" model: carv4 layout, CDCM dilation 24, CSAM).

Weights: ``table5_pidinet.pth`` from lllyasviel/Annotators: ``{'state_dict': {'module.<key>': ...}}``.
The pixel-difference convolutions keep their trained 3x3 weights (the file's shapes); each forward
turns them into the equivalent vanilla kernel (3x3 for cd/ad, 5x5 for rd), the same conversion the
PiDiNet authors use to deploy the model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.annotators.hed import safe_step
from ctrlnet.annotators.weights import load_model
from ctrlnet.image import HWC3

WEIGHTS = "table5_pidinet.pth"

# carv4: the 16 layers (init block + 15 PDC blocks) cycle central, angular, radial, vanilla.
CARV4 = ("cd", "ad", "rd", "cv") * 4

# ad: each tap minus its clockwise neighbour (flattened 3x3 indices).
_AD_NEIGHBOUR = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# rd: the 8 outer taps go to the 5x5 ring, their negatives to the inner 3x3 ring.
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


def pdc_kernel(weight: torch.Tensor, op: str) -> torch.Tensor:
    """The vanilla convolution kernel equal to pixel-difference conv ``op`` with 3x3 ``weight``."""
    o, i = weight.shape[:2]
    if op == "cv":
        return weight
    flat = weight.reshape(o, i, 9)
    if op == "cd":  # sum_k w_k (x_k - x_center)
        k = flat.clone()
        k[:, :, 4] = k[:, :, 4] - flat.sum(dim=2)
        return k.reshape(o, i, 3, 3)
    if op == "ad":
        return (flat - flat[:, :, _AD_NEIGHBOUR]).reshape(o, i, 3, 3)
    if op == "rd":
        k = weight.new_zeros(o, i, 25)
        k[:, :, _RD_OUTER] = flat[:, :, 1:]
        k[:, :, _RD_INNER] = -flat[:, :, 1:]
        return k.reshape(o, i, 5, 5)
    raise ValueError(f"unknown pixel-difference op {op!r}")


class PDCConv(nn.Module):
    """A bias-free pixel-difference convolution storing the trained 3x3 weight."""

    def __init__(self, op: str, cin: int, cout: int, groups: int = 1):
        super().__init__()
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default, for untrained use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = pdc_kernel(self.weight, self.op)
        return F.conv2d(x, k, None, 1, k.shape[-1] // 2, 1, self.groups)


class PDCBlock(nn.Module):
    """Depthwise PDC -> ReLU -> 1x1 conv, residual; ``stride=2`` max-pools first and projects the skip."""

    def __init__(self, op: str, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        self.conv1 = PDCConv(op, cin, cin, groups=cin)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation module: 1x1 reduce, then four dilated 3x3 convs summed."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1)
        for name, d in (("conv2_1", 5), ("conv2_2", 7), ("conv2_3", 9), ("conv2_4", 11)):
            setattr(self, name, nn.Conv2d(cout, cout, 3, padding=d, dilation=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: a one-channel sigmoid gate."""

    def __init__(self, channels: int, mid: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, 1)
        self.conv2 = nn.Conv2d(mid, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with CSAM + CDCM side branches; returns four side maps and their fusion (sigmoid)."""

    def __init__(self, width: int = 60, ops: tuple[str, ...] = CARV4, dil: int = 24):
        super().__init__()
        C = width
        self.init_block = PDCConv(ops[0], 3, C)
        # (name, in, out, stride); names match the official keys
        # fmt: off
        plan = [("block1_1", C, C, 1), ("block1_2", C, C, 1), ("block1_3", C, C, 1),
                ("block2_1", C, 2 * C, 2), ("block2_2", 2 * C, 2 * C, 1),
                ("block2_3", 2 * C, 2 * C, 1), ("block2_4", 2 * C, 2 * C, 1),
                ("block3_1", 2 * C, 4 * C, 2), ("block3_2", 4 * C, 4 * C, 1),
                ("block3_3", 4 * C, 4 * C, 1), ("block3_4", 4 * C, 4 * C, 1),
                ("block4_1", 4 * C, 4 * C, 2), ("block4_2", 4 * C, 4 * C, 1),
                ("block4_3", 4 * C, 4 * C, 1), ("block4_4", 4 * C, 4 * C, 1)]
        # fmt: on
        self.stages = [[], [], [], []]  # block names per resolution; plain list, not registered
        for layer, (name, cin, cout, stride) in enumerate(plan, start=1):
            setattr(self, name, PDCBlock(ops[layer], cin, cout, stride))
            self.stages[int(name[5]) - 1].append(name)
        fuse = [C, 2 * C, 4 * C, 4 * C]
        self.conv_reduces = nn.ModuleList(MapReduce(dil) for _ in range(4))
        self.attentions = nn.ModuleList(CSAM(dil) for _ in range(4))
        self.dilations = nn.ModuleList(CDCM(c, dil) for c in fuse)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: (B, 3, H, W) BGR in [0, 1]
        H, W = x.shape[-2:]
        h = self.init_block(x)
        sides = []
        for i, names in enumerate(self.stages):
            for name in names:
                h = getattr(self, name)(h)
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))
            sides.append(F.interpolate(e, (H, W), mode="bilinear", align_corners=False))
        fused = self.classifier(torch.cat(sides, dim=1))
        return [torch.sigmoid(s) for s in sides + [fused]]


@torch.no_grad()
def softedge_pidinet(
    image: np.ndarray, *, safe: bool = False, weights_dir=None, device="cpu", dtype=torch.float32
) -> np.ndarray:
    """Soft edge map (H, W, 3) uint8, white edges on black (v1.1 SoftEdge_PIDI)."""
    image = HWC3(image)
    model = load_model(WEIGHTS, PiDiNet, weights_dir=weights_dir, device=device, dtype=dtype)
    p = next(model.parameters())
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # the network was trained on BGR
    x = torch.from_numpy(bgr).to(p.device, p.dtype).permute(2, 0, 1)[None] / 255.0  # (1, 3, H, W)
    edge = model(x)[-1][0, 0].float().cpu().numpy()
    if safe:
        edge = safe_step(edge)
    return HWC3((edge * 255.0).clip(0, 255).astype(np.uint8))


ANNOTATORS = {"softedge_pidinet": softedge_pidinet}
