"""Samplers as small pure functions with one signature (k-diffusion style); their registry,
options and the one call the pipeline uses are in :mod:`ctrlnet.sampling.registry`.

``sample_x(denoiser, x, sigmas, extra_args=None, callback=None, **options) -> x``

- ``x``: (B, C, h, w) float latent in sigma space (``x = z / sqrt(alpha_bar)``), holding noise of
  standard deviation ``sigmas[0]`` (plus the image, for img2img); returned at ``sigmas[-1]``.
- ``sigmas``: descending 1-D tensor (float64 preferred), usually from ``schedule.get_sigmas``.
- ``denoiser(x, sigma, **extra_args)``: ``sigma`` is a float64 CPU tensor (B,); returns the
  predicted clean latent shaped like ``x``.
- ``callback({"i", "x", "sigma", "denoised"})`` once per step, after the step (``x`` is the new
  latent, ``sigma`` the step's starting sigma as a float).
- Stochastic samplers take ``noise_sampler(sigma, sigma_next) -> unit noise like x``
  (``ctrlnet.sampling.noise``); without one they draw from torch's global RNG.

Each sampler follows a named reference (k-diffusion ``sampling.py`` or a diffusers scheduler),
said in its docstring; tests check them against diffusers on the same model and noise.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ctrlnet.sampling.noise import NoiseSampler

Callback = Callable[[dict], None]


def _floats(sigmas) -> list[float]:
    return [float(s) for s in torch.as_tensor(sigmas).detach().double().cpu()]


def _model(denoiser, x: torch.Tensor, sigma: float, extra_args: dict | None) -> torch.Tensor:
    # float64 on the CPU: the denoiser maps it back to an exact integer timestep (MPS has no fp64)
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
    return denoiser(x, s, **(extra_args or {}))


def _noise(noise_sampler: NoiseSampler | None, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return torch.randn_like(x) if noise_sampler is None else noise_sampler(sigma, sigma_next)


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) for a step from sigma to sigma_next (k-diffusion ``get_ancestral_step``)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *, eta: float = 0.0,
                s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None):
    """DDIM (Song et al. 2021) with ``eta``, as the original ``ddim_hacked`` sampler.

    In sigma space the DDIM update is ``x0 + sigma_down * eps + sigma_up * noise`` with
    ``sigma_up = eta * sqrt((1-a_prev)/(1-a_t) * (1-a_t/a_prev)) / sqrt(a_prev)``; eta = 0 is Euler.
    """
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        eps = (x - denoised) / s
        a_t, a_prev = 1 / (1 + s**2), 1 / (1 + s_next**2)
        sigma_vp = eta * max(0.0, (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        sigma_up = sigma_vp / a_prev**0.5
        sigma_down = max(0.0, s_next**2 - sigma_up**2) ** 0.5
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * s_noise * _noise(noise_sampler, x, s, s_next)
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn;
    k-diffusion ``sample_euler``, diffusers ``EulerDiscreteScheduler``)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = _model(denoiser, x, sig[i], extra_args)
        x = x + (x - denoised) / sig[i] * (sig[i + 1] - sig[i])
        _report(callback, i, x, sig[i], denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *,
                           eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None):
    """Ancestral Euler: a deterministic step to sigma_down, then fresh noise of sigma_up
    (k-diffusion ``sample_euler_ancestral``; diffusers ``EulerAncestralDiscreteScheduler`` at eta 1)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        down, up = _ancestral_step(s, s_next, eta)
        x = x + (x - denoised) / s * (down - s)
        if up > 0:
            x = x + _noise(noise_sampler, x, s, s_next) * s_noise * up
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2 without churn; k-diffusion
    ``sample_heun``, diffusers ``HeunDiscreteScheduler``): two model calls per step, an Euler
    step on the last one (to sigma 0)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        d = (x - denoised) / s
        dt = s_next - s
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _model(denoiser, x_2, s_next, extra_args)) / s_next
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, s, denoised)
    return x


def _lms_coefficient(sig: Sequence[float], order: int, i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial j through sig[i], ...,
    sig[i-order+1] (k-diffusion ``linear_multistep_coeff``). The integrand is a polynomial of
    degree order-1, so Gauss-Legendre with 4 nodes is exact (k-diffusion uses scipy's quad)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = sig[i], sig[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
    return float((b - a) / 2 * np.sum(weights * prod))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *, order: int = 4):
    """Linear multistep of ``order`` on the derivatives ``(x - denoised) / sigma``
    (k-diffusion ``sample_lms``; diffusers ``LMSDiscreteScheduler``), lower order while warming up."""
    sig = _floats(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        denoised = _model(denoiser, x, sig[i], extra_args)
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(sig, cur, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, x, sig[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in log-sigma (k-diffusion
    ``sample_dpmpp_2m``; diffusers ``DPMSolverMultistepScheduler``): first order on the first
    step and on the last step to sigma 0."""
    sig = _floats(sigmas)
    old = None
    h_last = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)  # t = -log(sigma)
            if old is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
            h_last = h
        old = denoised
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` at eta 1), ``solver_type``
    "midpoint" or "heun" for the second-order correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = _floats(sigmas)
    old = None
    h_last = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            eta_h = eta * h
            x = (s_next / s * math.exp(-eta_h)) * x + (-math.expm1(-h - eta_h)) * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    coef = -math.expm1(-h - eta_h) / (-h - eta_h) + 1
                else:
                    coef = 0.5 * -math.expm1(-h - eta_h)
                x = x + coef * (1 / r) * (denoised - old)
            if eta:
                amp = s_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
                x = x + _noise(noise_sampler, x, s, s_next) * amp
            h_last = h
        old = denoised
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                     noise_sampler: NoiseSampler | None = None):
    """DPM-Solver++ (stochastic, single-step second order; k-diffusion ``sample_dpmpp_sde``;
    diffusers ``DPMSolverSDEScheduler`` at r = 1/2): a model call at ``sigma^(1-r) sigma_next^r``
    between the steps, an Euler step on the last one (to sigma 0)."""
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _model(denoiser, x, s, extra_args)
        if s_next == 0:
            x = x + (x - denoised) / s * (s_next - s)
        else:
            t, t_next = -math.log(s), -math.log(s_next)
            h = t_next - t
            s_mid = math.exp(-(t + h * r))
            fac = 1 / (2 * r)
            # step 1: to the intermediate sigma
            down, up = _ancestral_step(s, s_mid, eta)
            x_2 = (down / s) * x - math.expm1(t + math.log(down)) * denoised
            if up > 0:
                x_2 = x_2 + _noise(noise_sampler, x, s, s_mid) * s_noise * up
            denoised_2 = _model(denoiser, x_2, s_mid, extra_args)
            # step 2: the full step with the blended prediction
            down, up = _ancestral_step(s, s_next, eta)
            d = (1 - fac) * denoised + fac * denoised_2
            x = (down / s) * x - math.expm1(t + math.log(down)) * d
            if up > 0:
                x = x + _noise(noise_sampler, x, s, s_next) * s_noise * up
        _report(callback, i, x, s, denoised)
    return x


def _unipc_terms(h: float, rks: Sequence[float], variant: str):
    """UniPC's B(h), h*phi_1 and the order conditions (R, b) for ratios ``rks`` (last one 1),
    as diffusers ``multistep_uni_p/c_bh_update`` with ``predict_x0`` (data prediction)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    R, b = [], []
    for k in range(1, len(rks) + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return b_h, h_phi_1, np.array(R), np.array(b)


def _unipc_history(lam: Sequence[float], outputs: Sequence[torch.Tensor], at: int, order: int, h: float):
    """Ratios r_k and scaled differences D1_k = (m_k - m0) / r_k of the ``order - 1`` model outputs
    before ``outputs[-1]`` (which is at sigma index ``at``)."""
    m0 = outputs[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[at - k] - lam[at]) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    return rks + [1.0], d1s


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *, order: int = 2,
                 variant: str = "bh2"):
    """UniPC (Zhao et al. 2023): multistep predictor UniP-``order`` with the corrector UniC after
    every model call, data prediction, as diffusers' ``UniPCMultistepScheduler`` with
    ``solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
    disable_corrector=[]``: lower order while warming up and on the last step (to sigma 0),
    where the result is the model's prediction. The corrector reuses the model output at the
    predicted point (no extra model call).

    In sigma space (lambda = -log sigma) the VP update ``sigma_t/sigma_s x - alpha_t h_phi_1 m0 - ...``
    divides through by alpha_t, which removes every alpha factor.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    sig = _floats(sigmas)
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    outputs: list[torch.Tensor] = []  # model predictions at the last `order` sigmas, newest last
    x_prev, prev_order = None, 0
    for i in range(n):
        denoised = _model(denoiser, x, sig[i], extra_args)
        if i > 0:
            # UniC: correct the predicted x at sig[i] with the fresh prediction there
            h = lam[i] - lam[i - 1]
            rks, d1s = _unipc_history(lam, outputs, i - 1, prev_order, h)
            b_h, h_phi_1, R, b = _unipc_terms(h, rks, variant)
            rhos = [0.5] if prev_order == 1 else np.linalg.solve(R, b).tolist()
            res = sum(float(rho) * d for rho, d in zip(rhos[:-1], d1s))
            m0 = outputs[-1]
            x = (sig[i] / sig[i - 1]) * x_prev - h_phi_1 * m0 - b_h * (res + rhos[-1] * (denoised - m0))
        outputs = (outputs + [denoised])[-order:]
        this_order = min(order, n - i, len(outputs))
        x_prev = x
        if sig[i + 1] == 0:  # first order into sigma 0 gives the prediction exactly
            x = denoised
        else:
            # UniP: predict x at sig[i + 1]
            h = lam[i + 1] - lam[i]
            rks, d1s = _unipc_history(lam, outputs, i, this_order, h)
            b_h, h_phi_1, R, b = _unipc_terms(h, rks, variant)
            if this_order == 1:
                rhos = []
            elif this_order == 2:
                rhos = [0.5]
            else:
                rhos = np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            res = sum(float(rho) * d for rho, d in zip(rhos, d1s))
            x = (sig[i + 1] / sig[i]) * x - h_phi_1 * denoised - b_h * res
        prev_order = this_order
        _report(callback, i, x, sig[i], denoised)
    return x


def sample_unipc_1(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *,
                   variant: str = "bh2"):
    """UniPC with the first-order predictor: :func:`sample_unipc` at ``order=1`` (diffusers'
    ``UniPCMultistepScheduler(solver_order=1)``). Each step is a DDIM step, corrected once the
    next prediction is known: with bh2, ``x_next = (s'/s) x + (1 - s'/s) (m + m') / 2``, the
    trapezoid rule on the two predictions ``m`` (at x) and ``m'`` (at the DDIM-predicted point;
    no extra model call). Second order at one model call a step, with no extrapolation from
    older steps, which is what made order 2 and 3 (and DPM++ 2M, LMS) drift on the guided demo
    model (README, "Fewer steps"). The last step is the DDIM step (nothing left to correct it).
    """
    return sample_unipc(denoiser, x, sigmas, extra_args, callback, order=1, variant=variant)


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, extra_args=None, callback: Callback | None = None, *,
               noise_sampler: NoiseSampler | None = None):
    """Latent Consistency Model sampling (A1111's and ComfyUI's ``sample_lcm``; diffusers
    ``LCMScheduler``): take the prediction, then noise it afresh to the next sigma; the last step
    returns the prediction. For LCM-distilled weights and LCM-LoRA, with the ``lcm`` schedule.

    diffusers additionally mixes ``c_skip * z`` into the prediction (LCM's boundary condition with
    timestep scaling 10); on the LCM timesteps (>= 19) ``c_skip < 7e-6`` and ``c_out > 1 - 4e-6``,
    so it is left out here, as A1111 and ComfyUI do for SD models.
    """
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        denoised = _model(denoiser, x, sig[i], extra_args)
        x = denoised
        if sig[i + 1] > 0:
            x = x + sig[i + 1] * _noise(noise_sampler, x, sig[i], sig[i + 1])
        _report(callback, i, x, sig[i], denoised)
    return x
