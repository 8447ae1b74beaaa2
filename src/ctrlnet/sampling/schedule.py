"""Noise schedules: betas -> alphas_cumprod -> sigmas, and the step lists samplers walk."""

from __future__ import annotations

import math

import numpy as np
import torch

from ctrlnet.config import ScheduleConfig


class DiscreteSchedule:
    """The 1000-step schedule of a latent diffusion model, with sigma <-> timestep maps.

    ``alphas_cumprod`` is computed in float64 and rounded to float32 as the original
    ``register_schedule`` does, so DDIM coefficients match the original code bit for bit.
    """

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        self.cfg = cfg
        betas = torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # rounded like the original buffers
        self.alphas_cumprod = ac.double()  # (T,)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # (T,) increasing
        self.log_sigmas = self.sigmas.log()
        self.parameterization = cfg.parameterization

    @property
    def num_timesteps(self) -> int:
        return self.cfg.timesteps

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, interpolating log-sigma."""
        t = t.double().clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of ``sigma``; exact integers come back exactly."""
        log_sigma = sigma.double().log().cpu()
        dists = log_sigma[:, None] - self.log_sigmas[None]  # (B, T)
        lo = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=self.num_timesteps - 2)
        hi = lo + 1
        low, high = self.log_sigmas[lo], self.log_sigmas[hi]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * lo + w * hi
        # sigmas taken from the table map back to their integer step (the original passes ints)
        near = (t - t.round()).abs() < 1e-6
        t = torch.where(near, t.round(), t)
        return t.to(sigma.device)


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The original "uniform" DDIM steps: ``range(0, T, T // steps) + 1``.

    As in the original, ``T % steps != 0`` can give one step more than asked (30 -> 31).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    c = num_timesteps // steps
    ts = np.asarray(list(range(0, num_timesteps, c))) + 1
    # The original indexes alphas_cumprod[T] and crashes when T - 1 is a multiple of c (3, 9, 27,
    # 37 ... steps); that step does not exist, so it is dropped.
    return ts[ts < num_timesteps]


def ddim_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Descending sigmas for DDIM, ending at the sigma of ``alphas_cumprod[0]`` (not 0),
    because the original's last step goes to ``alphas_prev[0] = alphas_cumprod[0]``."""
    ts = ddim_timesteps(steps, schedule.num_timesteps)
    s = schedule.sigmas[torch.from_numpy(ts[::-1].copy())]
    return torch.cat([s, schedule.sigmas[:1]])  # float64, (n + 1,)


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) spacing between the model's sigma range, ending at 0."""
    smin, smax = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def get_sigmas(schedule: DiscreteSchedule, steps: int, kind: str = "ddim") -> torch.Tensor:
    """Sigma list for ``kind`` in {"ddim", "karras"}."""
    if kind == "ddim":
        return ddim_sigmas(schedule, steps)
    if kind == "karras":
        return karras_sigmas(schedule, steps)
    raise ValueError(f"unknown schedule {kind!r}; use 'ddim' or 'karras'")


def vp_scale(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """``sqrt(alpha_bar)`` for sigma: multiply sigma-space x by it to get the model's z."""
    if isinstance(sigma, torch.Tensor):
        return (sigma.double() ** 2 + 1).rsqrt()
    return 1.0 / math.sqrt(sigma**2 + 1)
