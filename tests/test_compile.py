"""The opt-in compile switch (``ctrlnet.runtime.compile``): its backends (inductor, openvino),
its wiring into ``load_models`` and the CLI, the openvino backend refused early where it cannot
run, and an inductor-compiled sampling run that gives the eager run's numbers (the openvino
backend's numbers: ``tests/test_openvino.py``)."""

import copy
import re
import shutil
import sys

import pytest
import torch
from PIL import Image

from ctrlnet.generation.bundle import load_models
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.runtime.compile import COMPILE_ENV, check_backend, compile_step, is_compiled, resolve_compile
from ctrlnet.runtime.openvino import OpenVINOError
from ctrlnet.sampling.denoiser import ControlInput, Denoiser
from ctrlnet.sampling.samplers import sample_ddim
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas
from helpers import randomize_


@pytest.mark.parametrize("value, expected", [("", None), ("0", None), ("off", None), ("1", "inductor"),
                                             ("TRUE", "inductor"), (" yes ", "inductor"), ("inductor", "inductor"),
                                             (" OpenVINO ", "openvino")])
def test_switch_reads_the_environment_when_not_given(monkeypatch, value, expected):
    monkeypatch.setenv(COMPILE_ENV, value)
    assert resolve_compile(None) == expected
    # an explicit choice wins; True is the inductor backend (what --compile alone always meant)
    assert resolve_compile(True) == "inductor" and resolve_compile(False) is None
    assert resolve_compile("openvino") == "openvino"


def test_switch_refuses_an_unknown_value(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "fast")
    with pytest.raises(ValueError, match="CTRLNET_COMPILE='fast' is not a compile backend: choose inductor or openvino"):
        resolve_compile(None)
    with pytest.raises(ValueError, match="compile='tvm'"):
        resolve_compile("tvm")
    with pytest.raises(ValueError, match="unknown compile backend 'tvm'"):
        compile_step([], "tvm")


def test_openvino_without_the_package_is_refused_before_any_model_loads(monkeypatch, tmp_path, capsys):
    """Every surface: load_models (which the web UI and API call with $CTRLNET_COMPILE) and the CLI."""
    from ctrlnet.generation import bundle
    from ctrlnet.interfaces.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError

    def no_loading(*a, **k):
        raise AssertionError("models loaded before the backend was checked")

    monkeypatch.setattr(bundle, "_load_base_spec", no_loading)
    with pytest.raises(OpenVINOError, match=re.escape("pip install 'ctrlnet[openvino]'")):
        load_models("random:tiny-sd1", device="cpu", compile="openvino")
    monkeypatch.setenv(COMPILE_ENV, "openvino")
    with pytest.raises(OpenVINOError, match=re.escape("pip install 'ctrlnet[openvino]'")):
        load_models("random:tiny-sd1", device="cpu")
    monkeypatch.delenv(COMPILE_ENV)
    rc = main(["generate", "--base", "random:tiny-sd1", "--device", "cpu", "--compile", "openvino", "--prompt", "x",
               "--width", "64", "--height", "64", "--steps", "1", "--out", str(tmp_path)])
    assert rc == 2 and "pip install 'ctrlnet[openvino]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    inp = tmp_path.parent / (tmp_path.name + "-in")
    inp.mkdir()
    Image.new("RGB", (64, 64)).save(inp / "a.png")
    rc = main(["batch", str(inp), "--out", str(tmp_path / "batch"), "--no-progress", "--base", "random:tiny-sd1",
               "--device", "cpu", "--compile", "openvino", "--prompt", "x", "--resolution", "64", "--steps", "1"])
    assert rc == 2 and "pip install 'ctrlnet[openvino]'" in capsys.readouterr().err
    assert not list((tmp_path / "batch").glob("*.png"))


def test_openvino_is_refused_off_the_cpu():
    with pytest.raises(OpenVINOError, match="runs the step on the CPU only, not on cuda:0"):
        check_backend("openvino", "cuda:0")  # checked before the package, so no GPU or OpenVINO needed
    with pytest.raises(OpenVINOError, match="not on mps"):
        check_backend("openvino", torch.device("mps"))
    check_backend("inductor", "cuda")  # inductor runs anywhere
    check_backend(None, "mps")


def test_cli_compile_flag_takes_an_optional_backend():
    import argparse

    from ctrlnet.interfaces.model_args import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert p.parse_args([]).compile is None
    assert p.parse_args(["--compile"]).compile == "inductor"
    assert p.parse_args(["--compile", "openvino"]).compile == "openvino"
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "tvm"])


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
