"""Live previews: a sampling step's x0 estimate as a rough picture without running the VAE.

A1111's "Approx cheap" live preview (``modules/sd_vae_approx.py``, ``cheap_approximation``): each
RGB channel is a fixed linear mix of the four SD1.x/SD2.x latent channels, then ``(x + 1) / 2``.
The picture is at latent resolution (1/8 of the image side); it costs microseconds, so a server
can answer progress polls with it at any step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# rows: latent channels 0..3, columns: R, G, B (A1111's published factors for the SD1/SD2 VAE)
_CHEAP = torch.tensor([[0.298, 0.207, 0.208],
                       [0.187, 0.286, 0.173],
                       [-0.158, 0.189, 0.264],
                       [-0.184, -0.271, -0.473]])


def cheap_preview(latents: torch.Tensor) -> np.ndarray:
    """``latents``: (B, 4, h, w) in the UNet's scale (any float dtype, any device) -> one picture,
    (rows*h, cols*w, 3) uint8: the batch as a grid, ``cols = ceil(sqrt(B))`` (A1111 shows a batch's
    previews as a grid). Raises ValueError for latents that are not 4-channel (no factors for them).
    """
    if latents.ndim != 4 or latents.shape[1] != _CHEAP.shape[0]:
        raise ValueError(f"a cheap preview needs (B, 4, h, w) latents, got {tuple(latents.shape)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), _CHEAP)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()  # (B, h, w, 3)
    b, h, w, _ = rgb.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k in range(b):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = rgb[k]
    return grid
