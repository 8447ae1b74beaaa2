"""The model side of sampling: UNet + ControlNets + classifier-free guidance, as a denoiser
``(x, sigma) -> x0`` in sigma space (k-diffusion's ``external.py`` idea)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrlnet.sampling.schedule import DiscreteSchedule, vp_scale

GUESS_MODE_DECAY = 0.825


def control_scales(strength: float, soft: bool, n: int = 13) -> list[float]:
    """Per-residual scales: ``strength`` each, or ``strength * 0.825**(12-i)`` with ``soft``
    (deep residuals strongest), as the original apps' guess mode and sd-webui-controlnet's
    soft injection set ``model.control_scales``."""
    if soft:
        return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]
    return [strength] * n


@dataclass
class ControlInput:
    """One ControlNet applied during sampling.

    ``hint``: (B or 1, C, H, W), in [0, 1] (the inpaint model's hint also holds -1), at 8x the
    latent size. ``start``/``end``: the fraction of sampling steps during which it acts.
    ``soft``: per-residual decaying scales (:func:`control_scales`). ``cond_only``: the
    unconditional CFG half gets no control. ``guess_mode=True`` sets both (the original apps'
    guess mode = sd-webui-controlnet's "ControlNet is more important"). ``global_average_pooling``:
    the v1.1 shuffle models' pooled residuals (conditional half only, as the original).
    ``latent_cond``: (B or 1, C, h, w) latents passed to the net as ``latent_cond=`` with the noisy
    latent (reference colorization), on both branches like the hint.
    """

    net: torch.nn.Module
    hint: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    global_average_pooling: bool = False
    latent_cond: torch.Tensor | None = None
    soft: bool = False
    cond_only: bool = False

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"control window must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")
        if self.hint.ndim != 4:
            raise ValueError(f"hint must be (B, C, H, W), got shape {tuple(self.hint.shape)}")
        if self.guess_mode:
            self.soft = self.cond_only = True


def _crop(t: torch.Tensor, region: tuple[int, int, int, int] | None, unit: int) -> torch.Tensor:
    """``t[..., y0*unit:y1*unit, x0*unit:x1*unit]`` for a latent-cell ``region`` (None = all)."""
    if region is None:
        return t
    y0, y1, x0, x1 = region
    return t[..., y0 * unit:y1 * unit, x0 * unit:x1 * unit]


def _batch(t: torch.Tensor, b: int, n: int, what: str) -> torch.Tensor:
    """Bring a (1 or b, ...) tensor to the batch of ``n`` rows (n = b, or 2b with CFG)."""
    t = t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t
    if t.shape[0] != b:
        raise ValueError(f"{what} batch {t.shape[0]} does not match latent batch {b}")
    return torch.cat([t] * (n // b)) if n != b else t


class Denoiser:
    """Callable ``(x, sigma) -> x0`` for the samplers.

    Conditional and unconditional branches run as one batch ``[cond | uncond]``; each ControlNet's
    residuals are scaled and summed before the UNet adds them. ``c_concat`` (B or 1, C', h, w) is
    concatenated to the UNet's input on both halves (the mask and masked-image latents of 9-channel
    inpainting UNets, as diffusers' inpaint pipelines); ControlNets see the plain latent.
    ``region(x, sigma, (y0, y1, x0, x1))`` denoises a latent tile whose place in the whole latent
    is given, cropping hints, ``latent_cond`` and ``c_concat`` to it (tiled sampling).
    ``cache_hints``: run each unit's hint encoder once per run (per tile) instead of every step
    (identical numbers; False runs it every step, as the original apps do).
    A unit outside its [start, end] window, or at strength 0, runs no ControlNet at all; a
    ``cond_only`` unit runs its ControlNet on the conditional half only (the UNet still runs the
    whole batch).
    """

    def __init__(self, unet: torch.nn.Module, schedule: DiscreteSchedule, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, guidance_scale: float = 9.0,
                 controls: Sequence[ControlInput] = (), only_mid_control: bool = False,
                 sigmas: torch.Tensor | None = None, c_concat: torch.Tensor | None = None,
                 cache_hints: bool = True):
        self.unet = unet
        self.schedule = schedule
        self.cond = cond  # (B, L, D)
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.controls = list(controls)
        self.only_mid_control = only_mid_control
        self.sigmas = sigmas
        self.c_concat = c_concat
        self.use_cfg = uncond is not None and guidance_scale != 1.0
        if self.use_cfg and uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} contexts differ in shape")
        self.dtype = next(unet.parameters()).dtype
        # hint-encoder outputs per (unit, tile region, rows), valid for this sampling run's weights
        self.cache_hints = cache_hints
        self._hint_cache: dict[tuple, torch.Tensor] = {}

    def progress(self, sigma: float) -> float:
        """Fraction of the sampling run done at ``sigma`` (0 at the first step)."""
        if self.sigmas is None or len(self.sigmas) < 2:
            return 0.0
        i = int((self.sigmas[:-1].double() - sigma).abs().argmin())
        return i / (len(self.sigmas) - 1)

    def _guided_hint(self, k: int, c: ControlInput, region, b: int, n: int, z: torch.Tensor) -> torch.Tensor | None:
        """Unit ``k``'s hint-encoder output for ``n`` rows, computed on first use and then reused:
        the hint encoder sees neither the latent nor the timestep, so every step gets the numbers
        running it each step would give (the same batched input through the same convolutions).
        None for nets without a separate hint encoder or with a packed hint (run as they are)."""
        if not self.cache_hints or not hasattr(c.net, "encode_hint") or c.hint.shape[1] != getattr(c.net, "hint_channels", -1):
            return None
        key = (k, region, n)
        if key not in self._hint_cache:
            hint = _batch(_crop(c.hint, region, 8).to(device=z.device, dtype=self.dtype), b, n, "hint")
            if hint.shape[-2] != z.shape[-2] * 8 or hint.shape[-1] != z.shape[-1] * 8:
                return None  # the net's forward names the size mismatch
            self._hint_cache[key] = c.net.encode_hint(hint, self.dtype)
        return self._hint_cache[key]

    def _residuals(self, z: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, sigma: float, region=None):
        total = None
        b = z.shape[0] // 2 if self.use_cfg else z.shape[0]
        p = self.progress(sigma)
        for k, c in enumerate(self.controls):
            if p < c.start or p > c.end or c.strength == 0:
                continue
            cond_only = self.use_cfg and (c.cond_only or c.global_average_pooling)
            n = b if cond_only else z.shape[0]
            extra = {}
            if c.latent_cond is not None:
                lc = _crop(c.latent_cond, region, 1).to(device=z.device, dtype=self.dtype)
                extra["latent_cond"] = _batch(lc, b, n, "latent_cond")
            guided = self._guided_hint(k, c, region, b, n, z)
            if guided is None:
                hint = _batch(_crop(c.hint, region, 8).to(device=z.device, dtype=self.dtype), b, n, "hint")
                res = c.net(z[:n], hint, t[:n], ctx[:n], **extra)
            else:
                res = c.net(z[:n], None, t[:n], ctx[:n], guided_hint=guided, **extra)
            scales = control_scales(c.strength, c.soft, len(res))
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
        return self.region(x, sigma, None)

    @torch.no_grad()
    def region(self, x: torch.Tensor, sigma: torch.Tensor, region: tuple[int, int, int, int] | None):
        """Denoise ``x`` (B, C, h, w), the latent cells ``region`` = (y0, y1, x0, x1) of the whole
        latent the hints were made for (None: all of it)."""
        sigma = sigma.to(torch.float64)
        scale = vp_scale(sigma).to(x.device, torch.float32)[:, None, None, None]
        z = (x * scale).to(self.dtype)  # (B, C, h, w): the model's input scale
        t = self.schedule.sigma_to_t(sigma).to(x.device)
        ctx = self.cond.to(device=x.device, dtype=self.dtype)
        if self.use_cfg:
            z = torch.cat([z, z])
            t = torch.cat([t, t])
            ctx = torch.cat([ctx, self.uncond.to(device=x.device, dtype=self.dtype)])
        control = self._residuals(z, t, ctx, float(sigma[0]), region) if self.controls else None
        z_in = z
        if self.c_concat is not None:
            cc = _crop(self.c_concat, region, 1).to(device=x.device, dtype=self.dtype)
            z_in = torch.cat([z, _batch(cc, x.shape[0], z.shape[0], "c_concat")], dim=1)
        out = self.unet(z_in, t, ctx, control=control, only_mid_control=self.only_mid_control).float()
        if self.use_cfg:
            out_c, out_u = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        s = sigma.to(x.device, torch.float32)[:, None, None, None]
        if self.schedule.parameterization == "v":
            # x0 = sqrt(a) z - sqrt(1-a) v, with z = x sqrt(a), a = 1 / (1 + sigma^2)
            return x * scale**2 - out * s * scale
        return x - s * out


class TiledDenoiser:
    """A :class:`Denoiser` evaluated on overlapping latent tiles of ``tile`` cells with ``overlap``
    cells of linear cross-fade (MultiDiffusion-style), so each model call sees one tile and peak
    memory does not grow with the image. Each tile gets its crop of every hint."""

    def __init__(self, denoiser: Denoiser, tile: int, overlap: int):
        self.denoiser = denoiser
        self.tile = tile
        self.overlap = overlap
        self.sigmas = denoiser.sigmas

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        from ctrlnet.runtime.tiling import tiled_apply

        return tiled_apply(lambda part, reg: self.denoiser.region(part, sigma, reg), x, self.tile,
                           self.overlap, 1, 1, with_region=True)
