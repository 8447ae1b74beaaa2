"""Samplers, schedules, noise and sampler names against diffusers' schedulers on the same model
and the same noise.

How the two interfaces meet: diffusers' multistep VP schedulers (UniPC, DPM-Solver, LCM) walk
``z = x * sqrt(alpha_bar)`` from ``z = noise``; its k-style schedulers (Euler, LMS, Heun,
DPM-Solver SDE) walk ``x`` itself, feeding the model ``x / sqrt(sigma^2 + 1)``. Ours walks ``x``
in sigma space through ``Denoiser``, so a VP run starts at ``noise / sqrt(alpha_bar_0)`` and
ends multiplied back. Both sides call one model ``eps(z, t)``.

Sigmas: where diffusers can make ours (Karras, exponential, LCM) the diffusers scheduler is
configured to (``use_karras_sigmas=True`` ...) and the lists are checked equal; where it cannot
(its ``linspace``/``leading`` spacings are not among our schedules), diffusers' own sigmas are fed
to our sampler. diffusers rounds Karras timesteps to integers for UniPC and DPM-Solver
(multistep) while the sigmas stay exact, so those tests' model rounds ``t`` on both sides.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from ctrlnet.config import TINY_SD1
from ctrlnet.models.unet import UNetModel
from ctrlnet.sampling.denoiser import Denoiser
from ctrlnet.sampling.names import (SAMPLER_LABELS, a1111_name, resolve_sampler, sampler_names,
                                    schedule_names)
from ctrlnet.sampling.noise import make_noise_sampler, randn_like
from ctrlnet.sampling.registry import SAMPLERS, check_options, run_sampler
from ctrlnet.sampling.schedule import SCHEDULES, DiscreteSchedule, get_sigmas, lcm_timesteps, vp_scale
from helpers import randomize_

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHED = DiscreteSchedule()
TOL = 1e-4  # latents of scale ~4; measured 7e-7 .. 9e-6 (diffusers computes in float32)


def toy_net(z, t, ctx):
    """A cheap nonlinear, timestep-dependent stand-in for a UNet."""
    return torch.tanh(z * 0.7 + torch.sin(t.float() / 100.0)[:, None, None, None] + ctx.mean())


class EpsModel(torch.nn.Module):
    """``eps(z, t) = sqrt(1 - alpha_bar_t) z + 0.1 net(z, t)``: the exact eps of N(0, I) data plus a
    model's share, so latents stay near unit scale (as real ones) and absolute tolerances mean
    something. ``round_t``: call with integer timesteps, as diffusers does for some schedules."""

    def __init__(self, net=None, round_t: bool = False):
        super().__init__()
        self.net = net
        self.p = torch.nn.Parameter(torch.zeros(1))  # Denoiser reads the dtype from a parameter
        self.round_t = round_t

    def forward(self, z, t, ctx, control=None, only_mid_control=False):
        t = t.double()
        t = t.round() if self.round_t else t
        a = 1 / (1 + SCHED.t_to_sigma(t.cpu()) ** 2)
        net = toy_net(z, t, ctx) if self.net is None else self.net(z, t.float(), ctx)
        return (1 - a).sqrt().float()[:, None, None, None] * z + 0.1 * net


@pytest.fixture(scope="module")
def tiny_unet():
    return randomize_(UNetModel(**TINY_SD1.unet.kwargs()), seed=3).eval()


def ours(name, model, sigmas, x, ctx, **kw):
    den = Denoiser(model, SCHED, ctx, sigmas=sigmas)
    return run_sampler(name, den, x.clone(), sigmas, **kw)


@torch.no_grad()
def theirs(scheduler, model, z, ctx, generator=None):
    """diffusers' denoising loop (as its pipelines run it) with ``model`` as the UNet."""
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(z, t)
        eps = model(inp, t.reshape(1).expand(z.shape[0]).double(), ctx)
        kw = {} if generator is None else {"generator": generator}
        z = scheduler.step(eps, t, z, **kw).prev_sample
    return z


def start(shape=(2, 4, 16, 16), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)), torch.randn(1, 5, 32)


def assert_close(a, b, tol=TOL):
    diff = float((a - b).abs().max())
    print(f"max |diff| {diff:.2g}, scale {float(b.abs().max()):.2g}")  # the measured numbers, with -s
    assert torch.isfinite(a).all() and diff < tol, f"max |diff| {diff:.3g} (scale {float(b.abs().max()):.3g})"


# --- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 4, 10, 25])  # diffusers starts 1 step at sigma_min
def test_karras_and_exponential_sigmas_are_diffusers(steps):
    k = diffusers.EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    k.set_timesteps(steps)
    e = diffusers.EulerDiscreteScheduler(**SD_BETAS, use_exponential_sigmas=True)
    e.set_timesteps(steps)
    for ref, kind in ((k, "karras"), (e, "exponential")):
        got = get_sigmas(SCHED, steps, kind)
        assert got.dtype == torch.float64 and len(got) == steps + 1 and got[-1] == 0
        np.testing.assert_allclose(got.numpy(), ref.sigmas.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_schedule_is_diffusers_lcm(steps):
    ref = diffusers.LCMScheduler(**SD_BETAS)
    ref.set_timesteps(steps)
    assert lcm_timesteps(steps).tolist() == ref.timesteps.tolist()
    sig = get_sigmas(SCHED, steps, "lcm")
    np.testing.assert_allclose(sig[:-1].numpy(), SCHED.sigmas[ref.timesteps].numpy())
    with pytest.raises(ValueError, match="LCM"):
        get_sigmas(SCHED, 51, "lcm")


def test_uniform_sgm_simple_follow_k_diffusion_and_comfyui():
    log_sigmas = SCHED.sigmas.log().numpy()

    def t_to_sigma(t):  # k-diffusion DiscreteSchedule.t_to_sigma: linear in log-sigma
        lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
        w = t - lo
        return np.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi])

    for n in (1, 7, 20):
        uni = np.append(t_to_sigma(np.linspace(999, 0, n)), 0.0)  # k-diffusion get_sigmas(n)
        np.testing.assert_allclose(get_sigmas(SCHED, n, "uniform").numpy(), uni, rtol=1e-12)
        sgm = np.append(t_to_sigma(np.linspace(999, 0, n + 1)[:-1]), 0.0)  # ComfyUI sgm_uniform
        np.testing.assert_allclose(get_sigmas(SCHED, n, "sgm_uniform").numpy(), sgm, rtol=1e-12)
        ss = 1000 / n  # ComfyUI simple_scheduler
        simple = [float(SCHED.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]
        np.testing.assert_allclose(get_sigmas(SCHED, n, "simple").numpy(), simple)
    for kind in SCHEDULES:
        s = get_sigmas(SCHED, 12, kind)
        assert (s[1:] < s[:-1]).all(), kind  # strictly descending
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        get_sigmas(SCHED, 10, "nope")
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(SCHED, 0, "karras")


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_karras_min_is_karras_spacing_ending_where_ddim_ends(steps):
    # k-diffusion get_sigmas_karras(n=steps + 1, sigma_min, sigma_max, rho=3), transcribed, without its final 0
    smin, smax, rho = float(SCHED.sigmas[0]), float(SCHED.sigmas[-1]), 3.0
    ramp = np.linspace(0, 1, steps + 1)
    want = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = get_sigmas(SCHED, steps, "karras_min")
    assert got.dtype == torch.float64 and len(got) == steps + 1
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert got[0] == SCHED.sigmas[-1] and got[-1] == get_sigmas(SCHED, 20, "ddim")[-1]  # DDIM's last sigma, exactly


# --- samplers against diffusers ----------------------------------------------------------------

def test_unipc_karras_equals_diffusers_on_tiny_unet(tiny_unet):
    """UniPC (bh2, order 2, corrector on, lower order at the end) = UniPCMultistepScheduler."""
    noise, ctx = start((1, 4, 8, 8))
    ref = diffusers.UniPCMultistepScheduler(**SD_BETAS, use_karras_sigmas=True)
    ref.set_timesteps(6)
    sig = get_sigmas(SCHED, 6, "karras")
    np.testing.assert_allclose(sig.numpy(), ref.sigmas.double().numpy(), rtol=1e-6)
    model = EpsModel(tiny_unet, round_t=True)
    got = ours("UniPC", model, sig, noise / vp_scale(float(sig[0])), ctx)
    assert_close(got, theirs(ref, model, noise, ctx))


def test_dpmpp_2m_karras_equals_diffusers_on_tiny_unet(tiny_unet):
    noise, ctx = start((1, 4, 8, 8), seed=1)
    ref = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True)
    ref.set_timesteps(6)
    sigmas = get_sigmas(SCHED, 6, resolve_sampler("DPM++ 2M Karras")[1])
    np.testing.assert_allclose(sigmas.numpy(), ref.sigmas.double().numpy(), rtol=1e-6)
    model = EpsModel(tiny_unet, round_t=True)
    got = ours("DPM++ 2M Karras", model, sigmas, noise / vp_scale(float(sigmas[0])), ctx)
    assert_close(got, theirs(ref, model, noise, ctx))


@pytest.mark.parametrize("order,variant", [(1, "bh2"), (2, "bh1"), (3, "bh2"), (3, "bh1")])
def test_unipc_orders_and_variants_equal_diffusers(order, variant):
    # diffusers' default linspace spacing; final sigma_min, because its bh1 turns NaN on a step to 0
    noise, ctx = start()
    ref = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_order=order, solver_type=variant,
                                            final_sigmas_type="sigma_min")
    ref.set_timesteps(12)
    sig = ref.sigmas.double()
    model = EpsModel(round_t=True)
    got = ours("unipc", model, sig, noise / vp_scale(float(sig[0])), ctx, order=order, variant=variant)
    assert_close(got * vp_scale(float(sig[-1])), theirs(ref, model, noise, ctx))


@pytest.mark.parametrize("variant", ["bh2", "bh1"])
def test_unipc_order_1_equals_diffusers_order_1(variant):
    # the registry's "UniPC order 1" is diffusers' solver_order=1, ending at sigma_min as Karras Min does
    noise, ctx = start()
    ref = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_order=1, solver_type=variant,
                                            final_sigmas_type="sigma_min")
    ref.set_timesteps(10)
    sig = ref.sigmas.double()
    model = EpsModel(round_t=True)
    got = ours("UniPC order 1", model, sig, noise / vp_scale(float(sig[0])), ctx, variant=variant)
    assert_close(got * vp_scale(float(sig[-1])), theirs(ref, model, noise, ctx))


def test_unipc_order_1_on_karras_min_is_the_trapezoid_rule(tiny_unet):
    """UniC-1 with B(h) = e^-h - 1 (Zhao et al. 2023, bh2, data prediction) after the DDIM predictor,
    transcribed in sigma space: x' = r x + (1 - r) (m + m') / 2 with r = s'/s, m' the prediction at the
    DDIM point r x + (1 - r) m (one model call a step); the last step is the DDIM step alone."""
    noise, ctx = start((1, 4, 8, 8), seed=4)
    model = EpsModel(tiny_unet)
    sig = get_sigmas(SCHED, 6, resolve_sampler("UniPC order 1")[1])
    den = Denoiser(model, SCHED, ctx, sigmas=sig)
    s = [float(v) for v in sig]
    x = noise / vp_scale(s[0])
    m = den(x, torch.full((1,), s[0], dtype=torch.float64))
    for i in range(len(s) - 1):
        r = s[i + 1] / s[i]
        pred = r * x + (1 - r) * m
        if i == len(s) - 2:
            x = pred
            break
        m_next = den(pred, torch.full((1,), s[i + 1], dtype=torch.float64))
        x, m = r * x + (1 - r) * (m + m_next) / 2, m_next
    assert_close(ours("UniPC order 1", model, sig, noise / vp_scale(s[0]), ctx), x)


def test_unipc_default_schedule_equals_diffusers_on_its_sigmas():
    # diffusers' default config ends at sigma 0; its linspace sigmas fed to ours
    noise, ctx = start()
    ref = diffusers.UniPCMultistepScheduler(**SD_BETAS)
    ref.set_timesteps(10)
    sig = ref.sigmas.double()
    model = EpsModel(round_t=True)
    assert_close(ours("unipc", model, sig, noise / vp_scale(float(sig[0])), ctx), theirs(ref, model, noise, ctx))


@pytest.mark.parametrize("name,cls", [("LMS Karras", "LMSDiscreteScheduler"),
                                      ("Euler Karras", "EulerDiscreteScheduler"),
                                      ("Heun Karras", "HeunDiscreteScheduler")])
def test_k_style_deterministic_samplers_equal_diffusers(name, cls):
    noise, ctx = start()
    ref = getattr(diffusers, cls)(**SD_BETAS, use_karras_sigmas=True)
    ref.set_timesteps(10)
    key, kind = resolve_sampler(name)
    sig = get_sigmas(SCHED, 10, kind)
    x = noise * float(sig[0])
    model = EpsModel()
    assert_close(ours(key, model, sig, x, ctx), theirs(ref, model, x, ctx))


def test_euler_a_equals_diffusers_with_the_same_noise():
    # EulerAncestralDiscreteScheduler has no Karras option: its "leading" sigmas fed to ours
    noise, ctx = start()
    ref = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(10)
    sig = ref.sigmas.double()
    x = noise * float(sig[0])
    model = EpsModel(round_t=True)
    got = ours("Euler a", model, sig, x, ctx, generator=torch.Generator().manual_seed(7))
    assert_close(got, theirs(ref, model, x, ctx, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("name,solver_type", [("DPM++ 2M SDE Karras", "midpoint"),
                                              ("DPM++ 2M SDE Heun Karras", "heun")])
def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise(name, solver_type):
    noise, ctx = start()
    ref = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                                solver_type=solver_type)
    ref.set_timesteps(10)
    key, kind = resolve_sampler(name)
    sig = get_sigmas(SCHED, 10, kind)
    model = EpsModel(round_t=True)
    # diffusers draws plain Gaussian noise each step: ours with noise="gaussian" from the same generator
    got = ours(key, model, sig, noise / vp_scale(float(sig[0])), ctx, generator=torch.Generator().manual_seed(7),
               noise="gaussian")
    assert_close(got, theirs(ref, model, noise, ctx, torch.Generator().manual_seed(7)))


@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # diffusers asks torchsde just below its range
def test_dpmpp_sde_equals_diffusers_with_the_same_brownian_tree():
    noise, ctx = start()
    ref = diffusers.DPMSolverSDEScheduler(**SD_BETAS, use_karras_sigmas=True, noise_sampler_seed=123)
    ref.set_timesteps(8)
    # A Brownian path is rough: moving a query by 1e-6 moves the increment by ~1e-3, and diffusers'
    # float32 Karras sigmas differ from ours by 4e-7 relative, so its sigmas are fed to ours.
    sig = ref.sigmas[torch.cat([torch.tensor([0]), torch.arange(1, len(ref.sigmas), 2)])].double()
    np.testing.assert_allclose(sig.numpy(), get_sigmas(SCHED, 8, "karras").numpy(), rtol=1e-6)
    x = noise * float(sig[0])
    model = EpsModel()
    got = ours("DPM++ SDE", model, sig, x, ctx, seed=123)
    assert_close(got, theirs(ref, model, x, ctx))


def test_lcm_equals_diffusers_with_the_same_noise():
    noise, ctx = start()
    ref = diffusers.LCMScheduler(**SD_BETAS)
    ref.set_timesteps(4)
    sig = get_sigmas(SCHED, 4, resolve_sampler("LCM")[1])
    model = EpsModel()
    got = ours("LCM", model, sig, noise / vp_scale(float(sig[0])), ctx, generator=torch.Generator().manual_seed(3))
    # diffusers' boundary condition (c_skip <= 4e-8 at t = 259 here) is the only arithmetic we leave out
    assert_close(got, theirs(ref, model, noise, ctx, torch.Generator().manual_seed(3)), 2e-5)


# --- defaults, options, noise ------------------------------------------------------------------

def test_euler_a_is_ancestral_by_default_and_reproducible():
    noise, ctx = start()
    sig = get_sigmas(SCHED, 6, "uniform")
    model = EpsModel()
    x = noise * float(sig[0])

    def run(name, seed=5, **kw):
        return ours(name, model, sig, x, ctx, generator=torch.Generator().manual_seed(seed), **kw)

    a = run("euler_a")
    assert torch.equal(a, run("euler_a"))  # same seed, same latents
    assert not torch.equal(a, run("euler_a", seed=6))
    euler = run("euler")
    assert float((a - euler).abs().mean()) > 0.05  # eta 1 by default: not Euler
    assert_close(run("euler_a", eta=0.0), euler, 1e-6)  # eta 0 is Euler


def test_sde_and_ddim_samplers_at_eta_0_are_their_odes():
    noise, ctx = start()
    model = EpsModel()
    sig = get_sigmas(SCHED, 7, "exponential")
    x = noise * float(sig[0])
    two_m = ours("dpmpp_2m", model, sig, x, ctx)
    assert_close(ours("dpmpp_2m_sde", model, sig, x, ctx, eta=0.0), two_m, 1e-5)
    euler = ours("euler", model, sig, x, ctx)
    assert_close(ours("ddim", model, sig, x, ctx), euler, 1e-5)
    # DPM++ SDE at eta 0 adds no noise: the Brownian seed does not matter
    sde = ours("dpmpp_sde", model, sig, x, ctx, eta=0.0)
    assert torch.equal(sde, ours("dpmpp_sde", model, sig, x, ctx, eta=0.0, seed=99))


def test_options_defaults_and_refusals():
    assert check_options("euler_a", {}) == {"eta": 1.0, "s_noise": 1.0, "noise": "gaussian"}
    assert check_options("ddim", {})["eta"] == 0.0
    assert check_options("ddim", {"eta": 1})["eta"] == 1.0  # a given eta wins, as a float
    assert check_options("dpmpp_2m_sde", {})["noise"] == "brownian"
    with pytest.raises(ValueError, match=r"sampler 'euler' takes no option eta; its options: none"):
        check_options("euler", {"eta": 0.5})
    with pytest.raises(ValueError, match="takes no option bogus, color"):
        check_options("unipc", {"bogus": 1, "color": 2})
    with pytest.raises(ValueError, match=r"eta=1.5 is out of range"):
        check_options("euler_a", {"eta": 1.5})
    with pytest.raises(ValueError, match="order=2.5 must be a whole number"):
        check_options("lms", {"order": 2.5})
    with pytest.raises(ValueError, match="variant='bh3' is not one of bh1, bh2"):
        check_options("unipc", {"variant": "bh3"})
    noise, ctx = start()
    calls = []
    den = Denoiser(EpsModel(), SCHED, ctx)
    with pytest.raises(ValueError, match="eta"):
        run_sampler("dpmpp_2m", lambda *a: calls.append(a), noise, get_sigmas(SCHED, 4, "karras"), eta=0.3)
    assert not calls  # refused before any model call
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        run_sampler("nope", den, noise, get_sigmas(SCHED, 4, "karras"))


def test_registry_defaults_are_the_functions_defaults():
    # calling a sampler function bare (training previews do) gives the registry's behaviour
    for key, spec in SAMPLERS.items():
        params = inspect.signature(spec.fn).parameters
        for name, opt in spec.options.items():
            if name == "noise":
                assert "noise_sampler" in params, key
            elif key != "dpmpp_2m_sde_heun":  # shares the function, with solver_type="heun"
                assert params[name].default == opt.default, (key, name)
        assert spec.schedule in SCHEDULES, key


def test_every_sampler_runs_every_schedule_to_a_clean_latent():
    noise, ctx = start((1, 4, 8, 8))
    model = EpsModel()
    for key in SAMPLERS:
        for kind, skip in (("karras", 0), ("ddim", 0), ("uniform", 3)):  # skip: img2img's later start
            sig = get_sigmas(SCHED, 6, kind)[skip:]
            seen = []
            out = ours(key, model, sig, noise * float(sig[0]), ctx, generator=torch.Generator().manual_seed(0),
                       callback=lambda info: seen.append(info["i"]))
            assert seen == list(range(len(sig) - 1)), key
            assert torch.isfinite(out).all() and float(out.abs().max()) < 10, (key, kind)


def test_per_item_generators_and_brownian_seeds_make_each_image_alone():
    noise, ctx = start((3, 4, 8, 8))
    ctx = torch.zeros(3, 5, 32)
    model = EpsModel()
    sig = get_sigmas(SCHED, 5, "karras")
    x = noise * float(sig[0])
    gens = [torch.Generator().manual_seed(100 + k) for k in range(3)]
    batch = ours("euler_a", model, sig, x, ctx, generator=gens)
    alone = ours("euler_a", model, sig, x[2:], ctx[2:], generator=[torch.Generator().manual_seed(102)])
    assert torch.equal(batch[2:], alone)
    batch = ours("dpmpp_sde", model, sig, x, ctx, seed=[7, 8, 9])
    alone = ours("dpmpp_sde", model, sig, x[1:2], ctx[1:2], seed=[8])
    assert_close(batch[1:2], alone, 1e-6)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 Brownian seeds for a batch of 3"):
        ours("dpmpp_sde", model, sig, x, ctx, seed=[1, 2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like(x, gens[:2])


def test_brownian_noise_is_one_path():
    # increments over [a, b] and [b, c] add up to the increment over [a, c], and have unit variance
    x = torch.zeros(1, 4, 32, 32)
    ns = make_noise_sampler("brownian", x, torch.tensor([10.0, 1.0, 0.0]), seed=4)
    a, b, c = 10.0, 3.0, 1.0
    w_ab = ns(a, b) * (a - b) ** 0.5
    w_bc = ns(b, c) * (b - c) ** 0.5
    w_ac = ns(a, c) * (a - c) ** 0.5
    assert_close(w_ab + w_bc, w_ac, 1e-5)
    assert 0.9 < float(ns(a, b).std()) < 1.1
    again = make_noise_sampler("brownian", x, torch.tensor([10.0, 1.0, 0.0]), seed=4)
    assert torch.equal(again(a, b), ns(a, b))
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise_sampler("pink", x, torch.tensor([1.0, 0.0]))


# --- names -------------------------------------------------------------------------------------

A1111_NAMES = {
    "Euler a": ("euler_a", "uniform"), "Euler": ("euler", "uniform"), "LMS": ("lms", "uniform"),
    "LMS Karras": ("lms", "karras"), "Heun": ("heun", "uniform"), "DDIM": ("ddim", "ddim"),
    "DPM++ 2M": ("dpmpp_2m", "karras"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"), "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde_heun", "exponential"),
    "DPM++ 2M SDE Heun Karras": ("dpmpp_2m_sde_heun", "karras"), "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras"), "UniPC": ("unipc", "sgm_uniform"), "LCM": ("lcm", "lcm"),
    "euler a karras": ("euler_a", "karras"), "DPM++ 2M SGM Uniform": ("dpmpp_2m", "sgm_uniform"),
    "  dpm++  2m   karras ": ("dpmpp_2m", "karras"), "k_euler_a": ("euler_a", "uniform"),
    "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"), "dpmpp_2m": ("dpmpp_2m", "karras"), "euler_a": ("euler_a", "uniform"),
    "ddim": ("ddim", "ddim"), "Euler Normal": ("euler", "uniform"), "Euler Simple": ("euler", "simple"),
    "UniPC order 1": ("unipc_1", "karras_min"), "unipc_1": ("unipc_1", "karras_min"),
    "UniPC order 1 Karras": ("unipc_1", "karras"), "Euler Karras Min": ("euler", "karras_min"),
    "UniPC Karras Min": ("unipc", "karras_min"),
}


@pytest.mark.parametrize("name", list(A1111_NAMES))
def test_a1111_names_resolve(name):
    assert resolve_sampler(name) == A1111_NAMES[name]


def test_explicit_schedule_wins_and_names_round_trip():
    assert resolve_sampler("DPM++ 2M Karras", "exponential") == ("dpmpp_2m", "exponential")
    assert resolve_sampler("Euler", "Karras") == ("euler", "karras")
    assert resolve_sampler("DPM++ 2M Karras", "Automatic") == ("dpmpp_2m", "karras")
    assert resolve_sampler("DDIM", None) == ("ddim", "ddim")
    for key in SAMPLERS:
        for kind in SCHEDULES:
            name = a1111_name(key, kind)
            assert resolve_sampler(name) == (key, kind), name
    assert a1111_name("euler") == "Euler" and a1111_name("ddim", "ddim") == "DDIM"
    assert a1111_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"  # A1111 < 1.9 read a bare "DPM++ 2M" as Uniform
    assert a1111_name("euler_a", "karras") == "Euler a Karras"
    for name in sampler_names(with_schedules=True):
        resolve_sampler(name)
    assert set(SAMPLER_LABELS) == set(SAMPLERS)
    assert schedule_names()[0] == "Automatic" and "Karras" in schedule_names()
    with pytest.raises(ValueError, match="unknown sampler 'Euler z'"):
        resolve_sampler("Euler z")
    with pytest.raises(ValueError, match="unknown schedule 'Polyexponential'"):
        resolve_sampler("Euler", "Polyexponential")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_sampler("  ")


# --- the pipeline's call ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    from ctrlnet.pipeline import load_models

    return load_models("random:tiny-sd1", [], device="cpu", dtype="fp32")


def test_generate_euler_a_is_seeded_and_not_euler(models):
    from ctrlnet.pipeline import GenerationRequest, generate

    base = GenerationRequest(prompt="x", resolution=64, steps=3, seed=3, sampler="Euler a")
    a, b = generate(models, base), generate(models, base)
    assert np.array_equal(a.images[0], b.images[0])
    e = generate(models, GenerationRequest(**{**base.__dict__, "sampler": "euler"}))
    assert not np.array_equal(a.images[0], e.images[0])
    z = generate(models, GenerationRequest(**{**base.__dict__, "eta": 0.0}))  # eta 0: Euler again
    assert np.abs(z.images[0].astype(int) - e.images[0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="takes no option eta"):
        generate(models, GenerationRequest(**{**base.__dict__, "sampler": "DPM++ 2M Karras", "eta": 0.5}))
    with pytest.raises(ValueError, match="unknown schedule"):
        generate(models, GenerationRequest(**{**base.__dict__, "schedule": "zigzag"}))
