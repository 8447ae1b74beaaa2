"""The OpenPose body and hand networks (CMU's 6-stage CPMs), each conv registered under its bare
Caffe layer name so ``body_pose_model.pth`` / ``hand_pose_model.pth`` load without renaming."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---- networks ----------------------------------------------------------------------------------

POOL = "pool"
# (name, in, out, kernel); a POOL entry is a 2x2/2 max-pool. Every conv is followed by ReLU unless
# its name is listed in the network's ``no_relu`` set.
# fmt: off
BODY_VGG = [
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), POOL,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), POOL,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    POOL,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
]
HAND_VGG = BODY_VGG[:-2] + [
    ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
    ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3),
]
# fmt: on


def _stage1_body(branch: str, cout: int) -> list:
    return [
        (f"conv5_1_CPM_{branch}", 128, 128, 3),
        (f"conv5_2_CPM_{branch}", 128, 128, 3),
        (f"conv5_3_CPM_{branch}", 128, 128, 3),
        (f"conv5_4_CPM_{branch}", 128, 512, 1),
        (f"conv5_5_CPM_{branch}", 512, cout, 1),
    ]


def _refine(suffix: str, cin: int, cout: int) -> list:
    """Stages 2-6: five 7x7 convs, a 1x1, and the 1x1 output layer ``Mconv7``."""
    return [(f"Mconv{i}_{suffix}", cin if i == 1 else 128, 128, 7) for i in range(1, 6)] + [
        (f"Mconv6_{suffix}", 128, 128, 1),
        (f"Mconv7_{suffix}", 128, cout, 1),
    ]


class CaffeChainNet(nn.Module):
    """Convs registered under their Caffe names, run as named chains (lists of layer specs)."""

    def __init__(self, chains: dict[str, list], no_relu: set[str]):
        super().__init__()
        self.chains = {k: [s if s == POOL else s[0] for s in v] for k, v in chains.items()}
        self.no_relu = no_relu
        for chain in chains.values():
            for spec in chain:
                if spec != POOL:
                    name, cin, cout, k = spec
                    self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))

    def run(self, chain: str, x: torch.Tensor) -> torch.Tensor:
        for name in self.chains[chain]:
            if name == POOL:
                x = F.max_pool2d(x, 2, 2)
            else:
                x = getattr(self, name)(x)
                if name not in self.no_relu:
                    x = F.relu(x)
        return x


class BodyPoseNet(CaffeChainNet):
    """CMU body CPM: VGG trunk, 6 stages of two branches (L1: 38 PAF maps, L2: 19 heat maps)."""

    def __init__(self):
        chains = {"trunk": BODY_VGG, "s1_L1": _stage1_body("L1", 38), "s1_L2": _stage1_body("L2", 19)}
        for s in range(2, 7):
            chains[f"s{s}_L1"] = _refine(f"stage{s}_L1", 185, 38)
            chains[f"s{s}_L2"] = _refine(f"stage{s}_L2", 185, 19)
        # The original's no-ReLU list names Mconv7_stage6_L1 twice and omits Mconv7_stage6_L2, so the
        # final heat maps pass through a ReLU; kept for identical outputs.
        no_relu = {"conv5_5_CPM_L1", "conv5_5_CPM_L2"} | {f"Mconv7_stage{s}_L1" for s in range(2, 7)}
        no_relu |= {f"Mconv7_stage{s}_L2" for s in range(2, 6)}
        super().__init__(chains, no_relu)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.run("trunk", x)  # (B, 128, H/8, W/8)
        paf, heat = self.run("s1_L1", feat), self.run("s1_L2", feat)
        for s in range(2, 7):
            h = torch.cat([paf, heat, feat], dim=1)  # (B, 185, H/8, W/8)
            paf, heat = self.run(f"s{s}_L1", h), self.run(f"s{s}_L2", h)
        return paf, heat  # (B, 38, H/8, W/8), (B, 19, H/8, W/8)


class HandPoseNet(CaffeChainNet):
    """CMU hand CPM: VGG trunk and 6 stages producing 22 heat maps (21 keypoints + background)."""

    def __init__(self):
        chains = {"trunk": HAND_VGG, "s1": [("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 22, 1)]}
        for s in range(2, 7):
            chains[f"s{s}"] = _refine(f"stage{s}", 150, 22)
        super().__init__(chains, {"conv6_2_CPM"} | {f"Mconv7_stage{s}" for s in range(2, 7)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.run("trunk", x)  # (B, 128, H/8, W/8)
        out = self.run("s1", feat)
        for s in range(2, 7):
            out = self.run(f"s{s}", torch.cat([out, feat], dim=1))  # (B, 150, H/8, W/8) in
        return out  # (B, 22, H/8, W/8)
