"""Sample grids during training (the original ImageLogger): control / target / prediction rows,
generated with the sampling package (DDIM) and decoded by the VAE."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctrlnet.sampling.denoiser import ControlInput, Denoiser
from ctrlnet.sampling.registry import get_sampler
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of (N, H, W, 3) uint8 images into one image with ``pad`` white pixels between."""
    n, h, w = rows[0].shape[:3]
    out = np.full((len(rows) * (h + pad) - pad, n * (w + pad) - pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, im in enumerate(row):
            out[r * (h + pad):r * (h + pad) + h, i * (w + pad):i * (w + pad) + w] = im
    return out


@torch.no_grad()
def generate_latents(unet, text, schedule: DiscreteSchedule, prompts: Sequence[str], latent_shape,
                     controlnet=None, hint: torch.Tensor | None = None, steps: int = 20,
                     guidance_scale: float = 5.0, strength: float = 1.0, only_mid_control: bool = False,
                     seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM from seeded noise; returns scaled latents (B, C, h, w)."""
    device = next(unet.parameters()).device
    cond = text(list(prompts))
    uncond = text([""] * len(prompts))
    controls = []
    if controlnet is not None and hint is not None:
        controls = [ControlInput(controlnet, hint.to(device), strength=strength)]
    sigmas = ddim_sigmas(schedule, steps)
    den = Denoiser(unet, schedule, cond, uncond, guidance_scale, controls, only_mid_control, sigmas=sigmas)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), *latent_shape), generator=g).to(device) * float(sigmas[0])
    x = get_sampler("ddim")(den, x, sigmas)
    return x


@torch.no_grad()
def sample_grid(models, batch: dict, mode: str, steps: int = 20, guidance_scale: float = 5.0,
                only_mid_control: bool = False, seed: int = 0) -> np.ndarray:
    """One uint8 grid for a batch: control / target / prediction (ControlNet runs), target /
    prediction (base runs: the prompts, no control), target / reconstruction (VAE runs)."""
    vae = models.vae
    vdev = next(vae.parameters()).device  # on a GPU run the VAE may sit apart from the batch
    target = batch.get("jpg")
    rows = []
    if mode == "vae":
        x = target.permute(0, 3, 1, 2).float().to(vdev)
        rec = vae.decode(vae.encode_latents(x))
        return grid([to_uint8(x), to_uint8(rec)])
    hint = batch["hint"].permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 1]
    f = vae.downscale
    shape = (vae.embed_dim, hint.shape[-2] // f, hint.shape[-1] // f)
    schedule = DiscreteSchedule(models.config.schedule)
    z = generate_latents(models.unet, models.text, schedule, batch["txt"], shape,
                         models.controlnet if mode == "controlnet" else None, hint, steps, guidance_scale,
                         1.0, only_mid_control, seed)
    pred = to_uint8(vae.decode(z.to(vdev)))
    if mode == "controlnet":
        rows.append(to_uint8(hint[:, :3] * 2 - 1))  # packed hints (reference colorizer) carry more channels
    if target is not None:
        rows.append(to_uint8(target.permute(0, 3, 1, 2).float()))
    elif "latents" in batch:
        mean = batch["latents"][:, : vae.embed_dim]
        rows.append(to_uint8(vae.decode(mean.to(vdev).float() * vae.scale_factor)))
    rows.append(pred)
    return grid(rows)


def write_preview(models, batch: dict, mode: str, steps: int, only_mid_control: bool, seed: int, path):
    """Save :func:`sample_grid` for ``batch`` as a PNG at ``path`` (the modules sample in eval mode
    and get their train/eval state back after). Returns the path written."""
    from ctrlnet.image import save_image

    was = {k: m.training for k, m in models.modules().items()}
    for m in models.modules().values():
        m.eval()
    try:
        img = sample_grid(models, batch, mode, steps, only_mid_control=only_mid_control, seed=seed)
    finally:
        for k, m in models.modules().items():
            m.train(was[k])
    return save_image(img, path)
