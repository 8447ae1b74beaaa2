"""Schedules, samplers and the denoiser against a transcription of the original DDIM code."""

import numpy as np
import pytest
import torch

from ctrlnet.config import TINY_SD1, ScheduleConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.sampling.denoiser import ControlInput, Denoiser, control_scales
from ctrlnet.sampling.registry import run_sampler
from ctrlnet.sampling.samplers import sample_ddim, sample_euler
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas, ddim_timesteps, vp_scale
from helpers import randomize_


def reference_ddim(eps_fn, shape, steps, eta, gen, parameterization="eps"):
    """The original cldm/ddim_hacked.py + ldm DDPM schedule arithmetic, step for step (float32)."""
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    c = 1000 // steps
    ts = np.asarray(list(range(0, 1000, c))) + 1
    alphas = alphas_cumprod[ts]
    alphas_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[ts[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas.numpy()) * (1 - alphas.numpy() / alphas_prev))
    sqrt_one_minus = np.sqrt(1.0 - alphas)
    x = torch.randn(shape, generator=gen)
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        t = torch.full((shape[0],), int(step), dtype=torch.long)
        out = eps_fn(x, t)
        a_t = torch.full((shape[0], 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((shape[0], 1, 1, 1), float(alphas_prev[index]))
        sigma_t = torch.full((shape[0], 1, 1, 1), float(sigmas[index]))
        s1m = torch.full((shape[0], 1, 1, 1), float(sqrt_one_minus[index]))
        if parameterization == "v":
            ac = alphas_cumprod[t][:, None, None, None]
            e_t = ac.sqrt() * out + (1 - ac).sqrt() * x
            pred_x0 = ac.sqrt() * x - (1 - ac).sqrt() * out
        else:
            e_t = out
            pred_x0 = (x - s1m * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * torch.randn(x.shape, generator=gen)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


def ours_ddim(eps_fn, shape, steps, eta, gen, parameterization="eps"):
    sched = DiscreteSchedule(ScheduleConfig(parameterization=parameterization))
    sigmas = ddim_sigmas(sched, steps)

    class Fn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, t, ctx, control=None, only_mid_control=False):
            assert torch.equal(t, t.round()), "DDIM must hand the model integer timesteps"
            return eps_fn(z, t.long())

    den = Denoiser(Fn(), sched, cond=torch.zeros(shape[0], 1, 1), sigmas=sigmas)
    x = torch.randn(shape, generator=gen) / vp_scale(float(sigmas[0]))
    x = run_sampler("ddim", den, x, sigmas, eta=eta, generator=gen, noise="gaussian")
    return x * vp_scale(float(sigmas[-1]))


def toy_eps(z, t):
    # a smooth, nonlinear, timestep-dependent "model"
    return torch.tanh(z * 0.7 + torch.sin(t.float() / 100.0)[:, None, None, None]) * 0.9


@pytest.mark.parametrize("steps,eta,param", [(20, 0.0, "eps"), (30, 0.0, "eps"), (20, 0.5, "eps"), (25, 0.0, "v"), (10, 1.0, "v")])
def test_ddim_matches_original_arithmetic(steps, eta, param):
    shape = (2, 4, 8, 8)
    ref = reference_ddim(toy_eps, shape, steps, eta, torch.Generator().manual_seed(5), param)
    ours = ours_ddim(toy_eps, shape, steps, eta, torch.Generator().manual_seed(5), param)
    assert (ref - ours).abs().max() < 2e-5


def test_ddim_timesteps_are_the_originals():
    assert ddim_timesteps(20)[:3].tolist() == [1, 51, 101]
    assert len(ddim_timesteps(20)) == 20
    assert len(ddim_timesteps(30)) == 31  # the original's quirk, kept for parity
    assert ddim_timesteps(3).tolist() == [1, 334, 667]  # the original would index step 1000 and crash
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0)


def test_sigma_t_round_trip():
    sched = DiscreteSchedule()
    t = torch.tensor([0.0, 1.0, 51.0, 999.0, 500.5])
    back = sched.sigma_to_t(sched.t_to_sigma(t))
    assert torch.allclose(back, t.double(), atol=1e-6)
    assert torch.equal(back[:4], t[:4].double())


def test_deterministic_ddim_is_euler_on_ddim_sigmas():
    sched = DiscreteSchedule()
    unet = randomize_(UNetModel(**TINY_SD1.unet.kwargs()), seed=4).eval()
    ctx = torch.randn(1, 5, 32)
    den = Denoiser(unet, sched, ctx, sigmas=ddim_sigmas(sched, 8))
    sig = ddim_sigmas(sched, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    a = sample_ddim(den, x.clone(), sig)
    b = sample_euler(den, x.clone(), sig)
    assert (a - b).abs().max() < 1e-5 * x.abs().max()


def test_guess_mode_scales():
    s = control_scales(1.0, True)
    assert len(s) == 13 and s[12] == 1.0 and abs(s[0] - 0.825**12) < 1e-12
    assert control_scales(0.7, False) == [0.7] * 13


def _tiny_unet_and_control(seed=0):
    unet = randomize_(UNetModel(**TINY_SD1.unet.kwargs()), seed=seed).eval()
    cn = randomize_(ControlNet(**TINY_SD1.controlnet.kwargs()), seed=seed + 1).eval()
    return unet, cn


def test_batched_cfg_equals_separate_calls():
    unet, cn = _tiny_unet_and_control()
    sched = DiscreteSchedule()
    cond, uncond = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    hint = torch.rand(1, 3, 64, 64)
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.full((2,), float(sched.sigmas[500]))
    for guess in (False, True):
        ctl = ControlInput(cn, hint, strength=0.8, guess_mode=guess)
        den = Denoiser(unet, sched, cond, uncond, guidance_scale=7.5, controls=[ctl])
        got = den(x, sigma)
        with torch.no_grad():
            z = x * vp_scale(sigma).float()[:, None, None, None]
            t = torch.full((2,), 500.0)
            scales = control_scales(0.8, guess, cn.num_control_residuals)
            res_c = [r * s for r, s in zip(cn(z, hint.expand(2, -1, -1, -1), t, cond), scales)]
            e_c = unet(z, t, cond, control=res_c)
            if guess:
                e_u = unet(z, t, uncond)
            else:
                res_u = [r * s for r, s in zip(cn(z, hint.expand(2, -1, -1, -1), t, uncond), scales)]
                e_u = unet(z, t, uncond, control=res_u)
            eps = e_u + 7.5 * (e_c - e_u)
            want = x - sigma.float()[:, None, None, None] * eps
        assert (got - want).abs().max() < 2e-4  # batched vs separate; amplified by the guidance scale


def test_two_controlnets_sum_and_window():
    unet, cn1 = _tiny_unet_and_control(1)
    cn2 = randomize_(ControlNet(**TINY_SD1.controlnet.kwargs()), seed=9).eval()
    sched = DiscreteSchedule()
    sigmas = ddim_sigmas(sched, 10)
    cond = torch.randn(1, 5, 32)
    x = torch.randn(1, 4, 8, 8)
    h1, h2 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    sigma = sigmas[:1].float()
    both = Denoiser(unet, sched, cond, controls=[ControlInput(cn1, h1, 0.5), ControlInput(cn2, h2, 1.5)], sigmas=sigmas)
    with torch.no_grad():
        z = x * vp_scale(sigma).float()[:, None, None, None]
        t = sched.sigma_to_t(sigma.double()).float()
        r = [0.5 * a + 1.5 * b for a, b in zip(cn1(z, h1, t, cond), cn2(z, h2, t, cond))]
        want = x - sigma[:, None, None, None] * unet(z, t, cond, control=r)
    assert (both(x, sigma) - want).abs().max() < 1e-4
    # a control whose window starts later does nothing at the first step
    late = Denoiser(unet, sched, cond, controls=[ControlInput(cn1, h1, 1.0, start=0.5)], sigmas=sigmas)
    none = Denoiser(unet, sched, cond, sigmas=sigmas)
    assert torch.equal(late(x, sigma), none(x, sigma))
    with pytest.raises(ValueError, match="window"):
        ControlInput(cn1, h1, start=0.8, end=0.2)
