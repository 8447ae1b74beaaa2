"""Pixels <-> latents, and the seeded noise of each image.

Latents are *scaled* VAE latents ``(B, C, h, w)`` float32 (what the UNet sees); images are
``(H, W, 3)`` uint8. Seeds follow A1111: image k of a batch draws all of its noise (initial noise,
re-noising, ancestral steps) from its own generator seeded ``seed + k``, so it can be made again
alone with ``num_images=1, seed=seed+k``.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrlnet.generation.bundle import Models
from ctrlnet.runtime.device import offload


class ImageNoise:
    """Per-image Gaussian noise: ``noise(like)`` draws row k of a ``(B, ...)`` tensor from generator k.

    Samplers take it as their ``generator`` (a callable noise source), so ancestral and SDE steps
    stay per image too.
    """

    def __init__(self, seeds: list[int], device: str = "cpu"):
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]}, but {len(self.generators)} seeds")
        rows = [torch.randn(like.shape[1:], generator=g, device=self.device, dtype=torch.float32)
                for g in self.generators]
        return torch.stack(rows).to(like.device, like.dtype)


def _vae_tile(models: Models, tile_px: int | None) -> int | None:
    return None if tile_px is None else max(1, tile_px // models.base.vae.downscale)


def encode_images(models: Models, images: list[np.ndarray], tile_px: int | None = None) -> torch.Tensor:
    """uint8 images (H, W, 3), all one size -> scaled latents (B, C, H/f, W/f), posterior mean (as the
    original v1.1 apps and ComfyUI's VAE encode). ``tile_px`` encodes in tiles of that many pixels."""
    vae = models.base.vae
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)  # (B, 3, H, W)
    with offload([vae], models.device, models.low_vram), torch.no_grad():
        z = vae.encode_latents(x.to(models.device, next(vae.parameters()).dtype), tile=_vae_tile(models, tile_px))
    return z.float()


def encode_image(models: Models, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 image -> scaled latents (1, C, H/f, W/f) of it resized to ``size`` = (H, W)."""
    from ctrlnet.generation.preprocess import fit_image

    return encode_images(models, [fit_image(image, size)])


def decode_images(models: Models, latents: torch.Tensor, tile_px: int | None = None,
                  as_float: bool = False) -> list[np.ndarray]:
    """Scaled latents -> uint8 images, truncating as the original apps do (``as_float``: float32
    ``x * 127.5 + 127.5``, not clipped, for a composite that clips once, as ``gradio_inpaint.py``).
    One image at a time, so a batch costs the memory of one decode."""
    vae = models.base.vae
    dev = models.device
    out = []
    with offload([vae], dev, models.low_vram), torch.no_grad():
        for z in latents.split(1):
            x = vae.decode(z.to(dev, next(vae.parameters()).dtype), tile=_vae_tile(models, tile_px)).float()
            y = (x[0].permute(1, 2, 0) * 127.5 + 127.5).cpu().numpy()
            out.append(y if as_float else y.clip(0, 255).astype(np.uint8))
    return out
