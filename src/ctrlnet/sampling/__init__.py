"""Diffusion schedules, the model-side denoiser, and samplers.

Samplers follow k-diffusion's convention: ``x = z / sqrt(alpha_bar)`` lives in "sigma space"
(``x = x0 + sigma * eps``) and the denoiser maps ``(x, sigma) -> x0``.
"""

from ctrlnet.sampling.samplers import SAMPLERS, get_sampler
from ctrlnet.sampling.schedule import DiscreteSchedule

__all__ = ["SAMPLERS", "DiscreteSchedule", "get_sampler"]
