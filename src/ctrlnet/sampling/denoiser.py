"""The model side of sampling: UNet + ControlNets + classifier-free guidance, as a denoiser
``(x, sigma) -> x0`` in sigma space (k-diffusion's ``external.py`` idea)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrlnet.sampling.schedule import DiscreteSchedule, vp_scale

GUESS_MODE_DECAY = 0.825


def control_scales(strength: float, guess_mode: bool, n: int = 13) -> list[float]:
    """Per-residual scales: ``strength`` each, or ``strength * 0.825**(12-i)`` in guess mode
    (deep residuals strongest), as the original apps set ``model.control_scales``."""
    if guess_mode:
        return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]
    return [strength] * n


@dataclass
class ControlInput:
    """One ControlNet applied during sampling.

    ``hint``: (B or 1, C, H, W) in [0, 1] at 8x the latent size. ``start``/``end``: the fraction of
    sampling steps during which it acts. ``guess_mode``: the unconditional branch gets no control
    and residuals decay with depth. ``global_average_pooling``: the v1.1 shuffle models' pooled
    residuals (also applied to the conditional branch only). ``latent_cond``: (B or 1, C, h, w)
    latents passed to the net as ``latent_cond=`` with the noisy latent (reference colorization),
    on both branches like the hint.
    """

    net: torch.nn.Module
    hint: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    global_average_pooling: bool = False
    latent_cond: torch.Tensor | None = None

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"control window must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")
        if self.hint.ndim != 4:
            raise ValueError(f"hint must be (B, C, H, W), got shape {tuple(self.hint.shape)}")


class Denoiser:
    """Callable ``(x, sigma) -> x0`` for the samplers.

    Conditional and unconditional branches run as one batch ``[cond | uncond]``; each ControlNet's
    residuals are scaled and summed before the UNet adds them.
    """

    def __init__(self, unet: torch.nn.Module, schedule: DiscreteSchedule, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, guidance_scale: float = 9.0,
                 controls: Sequence[ControlInput] = (), only_mid_control: bool = False,
                 sigmas: torch.Tensor | None = None):
        self.unet = unet
        self.schedule = schedule
        self.cond = cond  # (B, L, D)
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.controls = list(controls)
        self.only_mid_control = only_mid_control
        self.sigmas = sigmas
        self.use_cfg = uncond is not None and guidance_scale != 1.0
        if self.use_cfg and uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} contexts differ in shape")
        self.dtype = next(unet.parameters()).dtype

    def progress(self, sigma: float) -> float:
        """Fraction of the sampling run done at ``sigma`` (0 at the first step)."""
        if self.sigmas is None or len(self.sigmas) < 2:
            return 0.0
        i = int((self.sigmas[:-1].double() - sigma).abs().argmin())
        return i / (len(self.sigmas) - 1)

    def _residuals(self, z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, sigma: float):
        total = None
        b = z.shape[0] // 2 if self.use_cfg else z.shape[0]
        p = self.progress(sigma)
        for c in self.controls:
            if p < c.start or p > c.end or c.strength == 0:
                continue
            cond_only = self.use_cfg and (c.guess_mode or c.global_average_pooling)
            n = b if cond_only else z.shape[0]
            hint = c.hint.to(device=z.device, dtype=self.dtype)
            hint = hint.expand(b, -1, -1, -1) if hint.shape[0] == 1 else hint
            if hint.shape[0] != b:
                raise ValueError(f"hint batch {hint.shape[0]} does not match latent batch {b}")
            if n != hint.shape[0]:
                hint = torch.cat([hint] * (n // b))
            extra = {}
            if c.latent_cond is not None:
                lc = c.latent_cond.to(device=z.device, dtype=self.dtype)
                lc = lc.expand(b, -1, -1, -1) if lc.shape[0] == 1 else lc
                extra["latent_cond"] = torch.cat([lc] * (n // b)) if n != b else lc
            res = c.net(z[:n], hint, t[:n], ctx[:n], **extra)
            scales = control_scales(c.strength, c.guess_mode, len(res))
            out = []
            for r, s in zip(res, scales):
                if c.global_average_pooling:
                    r = r.mean(dim=(2, 3), keepdim=True)
                r = r * s
                if cond_only:
                    r = torch.cat([r, torch.zeros_like(r)])  # no control on the uncond half
                out.append(r)
            total = out if total is None else [a + r for a, r in zip(total, out)]
        return total

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float64)
        scale = vp_scale(sigma).to(x.device, torch.float32)[:, None, None, None]
        z = (x * scale).to(self.dtype)  # (B, C, h, w): the model's input scale
        t = self.schedule.sigma_to_t(sigma).to(x.device)
        ctx = self.cond.to(device=x.device, dtype=self.dtype)
        if self.use_cfg:
            z = torch.cat([z, z])
            t = torch.cat([t, t])
            ctx = torch.cat([ctx, self.uncond.to(device=x.device, dtype=self.dtype)])
        control = self._residuals(z, t, ctx, float(sigma[0])) if self.controls else None
        out = self.unet(z, t, ctx, control=control, only_mid_control=self.only_mid_control).float()
        if self.use_cfg:
            out_c, out_u = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        s = sigma.to(x.device, torch.float32)[:, None, None, None]
        if self.schedule.parameterization == "v":
            # x0 = sqrt(a) z - sqrt(1-a) v, with z = x sqrt(a), a = 1 / (1 + sigma^2)
            return x * scale**2 - out * s * scale
        return x - s * out
