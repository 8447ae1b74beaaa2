"""Samplers as small pure functions with one signature (k-diffusion style):

``sample_x(denoiser, x, sigmas, extra_args=None, callback=None, **options) -> x``

``x`` starts as noise scaled to ``sigmas[0]`` and ends at ``sigmas[-1]``. ``denoiser(x, sigma)``
returns the predicted clean latent. Noise for stochastic samplers comes from ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Callback = Callable[[dict], None]


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like ``x``: from ``generator`` (a torch.Generator, or a callable noise
    source such as per-image generators ``generator(x) -> noise``), else the global RNG."""
    if callable(generator) and not isinstance(generator, torch.Generator):
        return generator(x)
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x)


def _step_sigma(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # float64 on the CPU: the denoiser maps it back to an exact integer timestep (MPS has no fp64)
    return s.detach().to("cpu", torch.float64).reshape(()).expand(x.shape[0])


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, eta: float = 0.0,
                generator: torch.Generator | None = None):
    """DDIM (Song et al. 2021) with ``eta``, as the original ``ddim_hacked`` sampler.

    In sigma space the DDIM update is ``x0 + sigma_down * eps + sigma_up * noise`` with
    ``sigma_up = eta * sqrt((1-a_prev)/(1-a_t) * (1-a_t/a_prev)) / sqrt(a_prev)``; eta = 0 is Euler.
    """
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].double(), sigmas[i + 1].double()
        denoised = denoiser(x, _step_sigma(x, s), **extra_args)
        eps = (x - denoised) / s.float()
        a_t, a_prev = 1 / (1 + s**2), 1 / (1 + s_next**2)
        sigma_vp = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        sigma_up = sigma_vp / a_prev.sqrt()
        sigma_down = (s_next**2 - sigma_up**2).clamp(min=0).sqrt()
        x = denoised + float(sigma_down) * eps
        if eta > 0 and sigma_up > 0:
            x = x + float(sigma_up) * _noise_like(x, generator)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        denoised = denoiser(x, _step_sigma(x, s), **extra_args)
        d = (x - denoised) / float(s)
        x = x + d * float(sigmas[i + 1] - s)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None,
                           eta: float = 1.0, generator: torch.Generator | None = None):
    """Ancestral Euler: a deterministic step to sigma_down, then fresh noise of sigma_up."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, _step_sigma(x, sigmas[i]), **extra_args)
        sigma_up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5) if s_next > 0 else 0.0
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        x = denoised + (x - denoised) / s * sigma_down
        if sigma_up > 0:
            x = x + _noise_like(x, generator) * sigma_up
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-sigma."""
    extra_args = extra_args or {}
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, _step_sigma(x, sigmas[i]), **extra_args)
        if s_next == 0:
            x = denoised
        else:
            t, t_next = -torch.tensor(s).log(), -torch.tensor(s_next).log()
            h = float(t_next - t)
            if old is None:
                d = denoised
            else:
                h_last = float(t - (-torch.tensor(float(sigmas[i - 1])).log()))
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - (torch.expm1(torch.tensor(-h))).item() * d
        old = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


SAMPLERS: dict[str, Callable] = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None
