"""Shared test helpers: tiny random models of the real layouts."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter (zero-initialised ones too) with seeded noise, so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1 and ("norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight"))):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim else 1
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1.0, fan_in**0.5) * 4)
    return module


def gradient_photo(h: int = 64, w: int = 64) -> np.ndarray:
    """A small test picture, (h, w, 3) uint8: a red/blue gradient with a bright box in the middle
    (edges for annotators, flat areas for img2img)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // w).astype(np.uint8)
    img[..., 2] = (y * 255 // h).astype(np.uint8)
    img[h // 4:3 * h // 4, w // 3:2 * w // 3] = 240
    return img
