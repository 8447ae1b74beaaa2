"""The sampling loop's shortcuts give the numbers of the plain path: the hint encoder run once per
run (cached per unit) instead of every step, no ControlNet call outside every unit's window, and
a cond-only unit's ControlNet run on the conditional half only. Each is compared with the path
without it and its module calls are counted."""

import pytest
import torch

from ctrlnet.config import TINY_SD1
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.sampling.denoiser import ControlInput, Denoiser, control_scales
from ctrlnet.sampling.samplers import sample_ddim
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas, vp_scale
from helpers import randomize_


def _models():
    unet = randomize_(UNetModel(**TINY_SD1.unet.kwargs()), seed=3).eval()
    cn = randomize_(ControlNet(**TINY_SD1.controlnet.kwargs()), seed=4).eval()
    return unet, cn


class _Counter:
    """Counts forward calls of a module and the rows it saw (a forward hook: no code is replaced)."""

    def __init__(self, module):
        self.calls, self.rows = 0, []
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        self.rows.append(args[0].shape[0])


def _inputs(b=2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(b, 5, 32, generator=g), torch.randn(b, 5, 32, generator=g),
            torch.rand(1, 3, 64, 64, generator=g), torch.randn(b, 4, 8, 8, generator=g))


@pytest.mark.parametrize("cond_only", [False, True])
def test_hint_encoder_runs_once_per_run_and_gives_the_same_numbers(cond_only):
    unet, cn = _models()
    sched = DiscreteSchedule()
    sigmas = ddim_sigmas(sched, 5)
    cond, uncond, hint, x = _inputs()
    x = x * float(sigmas[0])
    outs = {}
    for cache in (False, True):
        hint_calls = _Counter(cn.input_hint_block)
        net_calls = _Counter(cn)
        den = Denoiser(unet, sched, cond, uncond, 6.0, [ControlInput(cn, hint, 0.9, cond_only=cond_only)],
                       sigmas=sigmas, cache_hints=cache)
        outs[cache] = sample_ddim(den, x.clone(), sigmas)
        assert net_calls.calls == 5  # one ControlNet call per step either way
        assert hint_calls.calls == (1 if cache else 5)
        assert net_calls.rows == [2 if cond_only else 4] * 5  # cond half only for cond_only units
        cn._forward_hooks.clear()
        cn.input_hint_block._forward_hooks.clear()
    assert torch.equal(outs[True], outs[False])  # bit-equal: the same convolutions on the same input


def test_hint_cache_is_per_unit_and_per_tile():
    unet, cn = _models()
    cn2 = randomize_(ControlNet(**TINY_SD1.controlnet.kwargs()), seed=8).eval()
    sched = DiscreteSchedule()
    sigmas = ddim_sigmas(sched, 3)
    cond, uncond, hint, x = _inputs(1)
    hint2 = torch.rand(1, 3, 64, 64)
    units = [ControlInput(cn, hint, 1.0), ControlInput(cn2, hint2, 0.5), ControlInput(cn, hint2, 0.7)]
    den = Denoiser(unet, sched, cond, uncond, 5.0, units, sigmas=sigmas)
    plain = Denoiser(unet, sched, cond, uncond, 5.0, units, sigmas=sigmas, cache_hints=False)
    sigma = sigmas[:1].float()
    for _ in range(2):  # the second call is served from the cache
        assert torch.equal(den(x, sigma), plain(x, sigma))
    assert len(den._hint_cache) == 3  # one entry per unit, though two share a net
    # tiles: each region gets its own crop's encoding, equal to the uncached tile
    reg = (0, 4, 2, 8)
    xt = x[..., 0:4, 2:8]
    assert torch.equal(den.region(xt, sigma, reg), plain.region(xt, sigma, reg))
    assert len(den._hint_cache) == 6


def test_controlnet_is_not_called_outside_every_window():
    unet, cn = _models()
    sched = DiscreteSchedule()
    sigmas = ddim_sigmas(sched, 10)
    cond, uncond, hint, x = _inputs(1)
    x = x * float(sigmas[0])
    calls = _Counter(cn)
    unet_calls = _Counter(unet)
    den = Denoiser(unet, sched, cond, uncond, 5.0, [ControlInput(cn, hint, 1.0, start=0.2, end=0.5)], sigmas=sigmas)
    sample_ddim(den, x.clone(), sigmas)
    # steps at progress 0.0 .. 0.9: those in [0.2, 0.5] are 0.2, 0.3, 0.4, 0.5
    assert calls.calls == 4
    assert unet_calls.calls == 10 and unet_calls.rows == [2] * 10  # the UNet still runs cond | uncond
    # strength 0: never called
    cn._forward_hooks.clear()
    calls = _Counter(cn)
    sample_ddim(Denoiser(unet, sched, cond, uncond, 5.0, [ControlInput(cn, hint, 0.0)], sigmas=sigmas),
                x.clone(), sigmas)
    assert calls.calls == 0


def test_cond_only_equals_control_with_zero_uncond_residuals():
    """A cond-only unit (control mode "ControlNet is more important") computes the ControlNet on
    the conditional rows only; the result equals running it on both halves and zeroing the
    unconditional half's residuals (the definition), to float rounding of a half-size batch."""
    unet, cn = _models()
    sched = DiscreteSchedule()
    cond, uncond, hint, x = _inputs()
    sigma = torch.full((2,), float(sched.sigmas[400]))
    got = Denoiser(unet, sched, cond, uncond, 7.0, [ControlInput(cn, hint, 0.8, cond_only=True)])(x, sigma)
    with torch.no_grad():
        z = (x * vp_scale(sigma).float()[:, None, None, None])
        t = torch.full((4,), 400.0)
        zz, ctx = torch.cat([z, z]), torch.cat([cond, uncond])
        res = cn(zz, hint.expand(4, -1, -1, -1), t, ctx)
        res = [torch.cat([r[:2], torch.zeros_like(r[2:])]) * s for r, s in zip(res, control_scales(0.8, False))]
        e_c, e_u = unet(zz, t, ctx, control=res).chunk(2)
        want = x - sigma[:, None, None, None].float() * (e_u + 7.0 * (e_c - e_u))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_guided_hint_is_checked_against_the_latent():
    _, cn = _models()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    with torch.no_grad():
        g = cn.encode_hint(torch.rand(1, 3, 64, 64))
        assert torch.equal(torch.stack(cn(x, None, t, ctx, guided_hint=g)[0:1]),
                           torch.stack(cn(x, None, t, ctx, guided_hint=g.clone())[0:1]))
        with pytest.raises(ValueError, match="guided_hint"):
            cn(x, None, t, ctx, guided_hint=g[..., :4])
        with pytest.raises(ValueError, match="needs a hint"):
            cn(x, None, t, ctx)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bf16_group_norm_equals_the_fp32_round_trip(layout):
    """GroupNorm32 hands bf16 to PyTorch's kernel (fp32 statistics inside) instead of converting the
    tensor to fp32 and back: the same numbers up to one bf16 rounding step on a few elements."""
    from ctrlnet.models.layers import GroupNorm32

    gn = GroupNorm32(32, 320)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.1 * torch.randn(320))
        gn.bias.copy_(0.1 * torch.randn(320))
    gn = gn.bfloat16()
    x = (3 * torch.randn(2, 320, 16, 16) + 1).bfloat16().contiguous(memory_format=layout)
    got = gn(x)
    want = torch.nn.functional.group_norm(x.float(), 32, gn.weight.float(), gn.bias.float(), gn.eps).bfloat16()
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=layout)
    ulp = want.float().abs() * 2.0**-7 + 1e-4  # one bf16 step (8 bits), and an absolute floor near 0
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).float().mean() < 0.01


def test_bf16_step_follows_fp32():
    """UNet + ControlNet in bf16 against fp32 (the same random weights): stated tolerance 3% of the
    output's scale for 8 mantissa bits through the tiny model's ~40 layers."""
    unet, cn = _models()
    cond, _, hint, x = _inputs()
    t = torch.tensor([300, 700])
    with torch.no_grad():
        want = unet(x, t, cond, control=cn(x, hint.expand(2, -1, -1, -1), t, cond))
        unet.bfloat16().to(memory_format=torch.channels_last)
        cn.bfloat16().to(memory_format=torch.channels_last)
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        got = unet(xb, t, cond.bfloat16(), control=cn(xb, hint.expand(2, -1, -1, -1).bfloat16(), t, cond.bfloat16()))
    err = (got.float() - want).abs().max() / want.abs().max()
    assert torch.isfinite(got).all() and err < 3e-2, err
