"""The opt-in ``torch.compile`` path (``ctrlnet.runtime.compile``): the switch, its wiring into
``load_models``, and a compiled sampling run that gives the eager run's numbers."""

import copy
import shutil

import pytest
import torch

from ctrlnet.generation.bundle import load_models
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.runtime.compile import COMPILE_ENV, compile_step, is_compiled, resolve_compile
from ctrlnet.sampling.denoiser import ControlInput, Denoiser
from ctrlnet.sampling.samplers import sample_ddim
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas
from helpers import randomize_


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("off", False), ("1", True),
                                             ("TRUE", True), (" yes ", True)])
def test_switch_reads_the_environment_when_not_given(monkeypatch, value, expected):
    monkeypatch.setenv(COMPILE_ENV, value)
    assert resolve_compile(None) is expected
    assert resolve_compile(True) is True and resolve_compile(False) is False  # an explicit choice wins


def test_switch_refuses_an_unknown_value(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "fast")
    with pytest.raises(ValueError, match="CTRLNET_COMPILE='fast'"):
        resolve_compile(None)


def test_load_models_compiles_the_step_modules_only_when_asked(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    plain = load_models("random:tiny-sd1", ["random:a"], device="cpu")
    assert not is_compiled(plain.base.unet) and not is_compiled(plain.controlnets["a"])
    monkeypatch.setenv(COMPILE_ENV, "1")
    m = load_models("random:tiny-sd1", ["random:a"], device="cpu")
    # compiled in place: same modules and state-dict keys, nothing else (text encoder, VAE) touched
    assert is_compiled(m.base.unet) and is_compiled(m.controlnets["a"])
    assert not is_compiled(m.base.vae) and not is_compiled(m.base.text_encoder)
    assert list(m.base.unet.state_dict()) == list(plain.base.unet.state_dict())
    with pytest.raises(ValueError, match="compile and low_vram"):
        load_models("random:tiny-sd1", device="cpu", low_vram=True)  # before anything loads


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile (inductor) needs a C++ compiler on the CPU: install g++ or clang++")
def test_compiled_sampling_matches_eager():
    """Three DDIM steps with CFG and one ControlNet (hint encoder cached, as generate() runs it):
    compiled vs eager in fp32 on a small two-level model (the smallest layout with down/upsampling,
    attention and every residual). Compiling it took 7 minutes on 2 cores shared with load 8-10
    (hence ``slow``); inductor's on-disk cache makes reruns faster. Inductor reorders float sums,
    so the two agree to rounding only: asserted below 1e-4 of max |x0|."""
    cfg = dict(model_channels=32, attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
               context_dim=32, num_res_blocks=1)
    unet = randomize_(UNetModel(**cfg), seed=3).eval()
    cn = randomize_(ControlNet(**cfg), seed=4).eval()
    sched = DiscreteSchedule()
    sigmas = ddim_sigmas(sched, 3)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    x = torch.randn(1, 4, 8, 8, generator=g) * float(sigmas[0])

    def run(u, c):
        den = Denoiser(u, sched, cond, uncond, 6.0, [ControlInput(c, hint, 0.9)], sigmas=sigmas)
        return sample_ddim(den, x.clone(), sigmas)

    eager = run(unet, cn)
    cu, ccn = copy.deepcopy(unet), copy.deepcopy(cn)
    compile_step([cu, ccn])
    compiled = run(cu, ccn)
    diff = (compiled - eager).abs().max().item() / eager.abs().max().item()
    assert diff < 1e-4, diff
    uncontrolled = sample_ddim(Denoiser(unet, sched, cond, uncond, 6.0, sigmas=sigmas), x.clone(), sigmas)
    assert (uncontrolled - eager).abs().max().item() > 1e-2 * eager.abs().max().item()  # the control acts
