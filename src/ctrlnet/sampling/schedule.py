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
    """Karras et al. (2022) spacing between the model's sigma range, ending at 0
    (k-diffusion ``get_sigmas_karras`` with the model's min and max sigma, as A1111 and diffusers'
    ``use_karras_sigmas``)."""
    smin, smax = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def karras_min_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 3.0) -> torch.Tensor:
    """``steps + 1`` sigmas in Karras et al. (2022) spacing (k-diffusion ``get_sigmas_karras``
    with ``n = steps + 1``) from the model's largest sigma down to its smallest, with no 0 after it.

    Like the original DDIM schedule, the last step ends at the first training sigma
    (``alphas_cumprod[0]``) instead of 0, so all ``steps`` model calls shape the trajectory; a
    schedule that ends at 0 spends its last call on the step from sigma_min to 0, which only
    swaps x for the prediction. ``rho`` 3 instead of Karras's 7 is what
    ``benchmarks/few_steps.py`` measured best for 10 UniPC order-1 steps (rho 2, 3, 4, 5 over 50
    pairs: 1.20, 0.72, 0.88, 1.07 levels from 50 DDIM steps).
    """
    smin, smax = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    s[0], s[-1] = schedule.sigmas[-1], schedule.sigmas[0]  # the ends exactly (the power can round them)
    return s


def exponential_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Sigmas evenly spaced in log-sigma from the model's max to its min, ending at 0
    (k-diffusion ``get_sigmas_exponential``; diffusers' ``use_exponential_sigmas``)."""
    smin, smax = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    s = torch.linspace(math.log(smax), math.log(smin), steps, dtype=torch.float64).exp()
    return torch.cat([s, s.new_zeros(1)])


def uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 to 0 (both included), log-sigma interpolated, ending at 0:
    k-diffusion's ``DiscreteSchedule.get_sigmas``, A1111's "Uniform" (its "Automatic" for samplers
    without a schedule of their own) and ComfyUI's "normal"."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64)
    s = schedule.t_to_sigma(t)
    return torch.cat([s, s.new_zeros(1)])


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """``steps + 1`` timesteps evenly spaced from T-1 to 0 without the last, then sigma 0
    (ComfyUI's and A1111's "SGM Uniform"; diffusers' default ``linspace`` spacing is this with the
    timesteps rounded to integers)."""
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    s = schedule.t_to_sigma(t)
    return torch.cat([s, s.new_zeros(1)])


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Every ``T / steps``-th training sigma from the top, then 0 (ComfyUI's and A1111's "Simple")."""
    stride = schedule.num_timesteps / steps
    idx = torch.tensor([schedule.num_timesteps - 1 - int(i * stride) for i in range(steps)])
    s = schedule.sigmas[idx]
    return torch.cat([s, s.new_zeros(1)])


def lcm_timesteps(steps: int, num_timesteps: int = 1000, original_steps: int = 50) -> np.ndarray:
    """The timesteps of diffusers' ``LCMScheduler`` (the LCM authors' schedule): ``steps`` of the
    ``original_steps`` distillation timesteps ``T/50 * k - 1``, picked evenly from the top.

    Raises ValueError when ``steps`` is not in [1, original_steps].
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM schedule steps must be in [1, {original_steps}], got {steps}")
    skip = num_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * skip - 1)[::-1]
    idx = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return origin[idx]


def lcm_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Sigmas of :func:`lcm_timesteps`, ending at 0 (the last step returns the prediction)."""
    s = schedule.sigmas[torch.from_numpy(lcm_timesteps(steps, schedule.num_timesteps).copy())]
    return torch.cat([s, s.new_zeros(1)])


SCHEDULES = {
    "ddim": ddim_sigmas,
    "uniform": uniform_sigmas,
    "karras": karras_sigmas,
    "karras_min": karras_min_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "lcm": lcm_sigmas,
}


def get_sigmas(schedule: DiscreteSchedule, steps: int, kind: str = "ddim") -> torch.Tensor:
    """Descending float64 sigmas (``steps + 1`` of them; ``ddim`` can give one more, see
    :func:`ddim_timesteps`) for ``kind`` in :data:`SCHEDULES`. All end at 0 except ``ddim`` and
    ``karras_min``, which end at the first training sigma as the original DDIM sampler does.

    Raises ValueError on an unknown kind or ``steps`` out of range.
    """
    fn = SCHEDULES.get(kind)
    if fn is None:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_timesteps}], got {steps}")
    return fn(schedule, steps)


def vp_scale(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """``sqrt(alpha_bar)`` for sigma: multiply sigma-space x by it to get the model's z."""
    if isinstance(sigma, torch.Tensor):
        return (sigma.double() ** 2 + 1).rsqrt()
    return 1.0 / math.sqrt(sigma**2 + 1)
