"""What steers the UNet: prompt contexts, and each ControlNet unit as a :class:`ControlInput`.

A control mode is a table, not a branch in the model: (soft scales, conditional half only), see
:class:`~ctrlnet.generation.request.ControlMode`.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrlnet.generation import prompts
from ctrlnet.generation.bundle import Models
from ctrlnet.generation.request import ControlSpec
from ctrlnet.image import HWC3
from ctrlnet.sampling.denoiser import ControlInput


def encode_prompts(models: Models, cond: list[str], uncond: list[str], clip_skip: int = 1,
                   min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts (B, 77*k, D) for the prompts and negative prompts with A1111's emphasis, BREAK and
    75-token windows (:mod:`ctrlnet.generation.prompts`), the same k on both sides."""
    return prompts.encode_prompts(models.base.text_encoder, cond, uncond, clip_skip=clip_skip, min_chunks=min_chunks,
                                  embeddings=models.embeddings or None)


def hint_tensor(cmap: np.ndarray, channels: int) -> torch.Tensor:
    """A control map (H, W, C) float32 (or uint8) -> (1, channels, H, W) float32 for the net."""
    if cmap.dtype == np.uint8:
        cmap = cmap.astype(np.float32) / 255.0
    if cmap.shape[2] != channels:
        if channels == 3 and cmap.shape[2] in (1, 4):
            cmap = np.repeat(cmap[:, :, :1], 3, axis=2) if cmap.shape[2] == 1 else cmap[:, :, :3]
        elif channels == 1:
            cmap = cmap[:, :, :1]
        else:
            raise ValueError(f"control map has {cmap.shape[2]} channels, the ControlNet expects {channels}")
    return torch.from_numpy(np.ascontiguousarray(cmap)).permute(2, 0, 1)[None].float()


def control_input(models: Models, name: str, spec: ControlSpec, cmap: np.ndarray, guess_mode: bool,
                  latent_cond: torch.Tensor | None = None) -> ControlInput:
    """One unit at one size: its net, hint, weight, window and control mode."""
    net = models.controlnets[name]
    mode = spec.mode(guess_mode)
    return ControlInput(
        net, hint_tensor(cmap, net.hint_channels).to(models.device), spec.strength, spec.start, spec.end,
        global_average_pooling=bool(getattr(net, "global_average_pooling", False)),
        latent_cond=latent_cond, soft=mode.soft, cond_only=mode.cond_only,
    )


def display_map(cmap: np.ndarray) -> np.ndarray:
    """A control map as a uint8 picture (the inpaint hint's -1 shows black)."""
    if cmap.dtype == np.uint8:
        return cmap
    x = (np.clip(cmap, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return HWC3(x) if x.shape[2] in (1, 3) else x
