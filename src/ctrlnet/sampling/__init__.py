"""Diffusion schedules, the model-side denoiser, noise, and samplers.

Samplers follow k-diffusion's convention: ``x = z / sqrt(alpha_bar)`` lives in "sigma space"
(``x = x0 + sigma * eps``) and the denoiser maps ``(x, sigma) -> x0``.
"""

from ctrlnet.sampling.names import a1111_name, resolve_sampler, sampler_names, schedule_names
from ctrlnet.sampling.registry import SAMPLERS, SamplerSpec, get_sampler, run_sampler
from ctrlnet.sampling.schedule import SCHEDULES, DiscreteSchedule, get_sigmas

__all__ = ["SAMPLERS", "SCHEDULES", "DiscreteSchedule", "SamplerSpec", "a1111_name", "get_sampler", "get_sigmas",
           "resolve_sampler", "run_sampler", "sampler_names", "schedule_names"]
