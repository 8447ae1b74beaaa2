"""The embedded model's recipe end to end at smoke size: data -> VAE -> decoder (beside base)
-> base -> ControlNet -> shipped fp16 files that the pipeline loads and samples from."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")


def test_quick_recipe_builds_resumes_and_ships(tmp_path):
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate, load_models
    from ctrlnet.training.demo import BASE_FILE, CONTROL_FILE, DemoRecipe, build, ship

    r = replace(DemoRecipe().quick(), n_train=8, n_heldout=2, sample_every=0)
    run = tmp_path / "run"
    files = build(run, r, skip=("decoder",))  # as the first of two processes would
    assert not (run / "decoder").exists() and (run / "controlnet" / "DONE.json").is_file()
    first = load_file(str(ship(run, tmp_path / "early")[0]))  # before the decoder stage: the first VAE
    k = next(k for k in first if ".decoder." in k)
    assert torch.equal(first[k], load_file(str(files["vae"]))[k].half())
    with pytest.raises(SystemExit, match="--resume"):
        build(run, r)
    assert build(run, r, resume=True, until="decoder")["decoder"] == run / "decoder" / "vae.safetensors"
    for stage in ("vae", "decoder", "base", "controlnet"):
        assert (run / stage / "DONE.json").is_file(), stage
    vae_sd, dec_sd = load_file(str(files["vae"])), load_file(str(run / "decoder" / "vae.safetensors"))
    enc = [k for k in vae_sd if ".encoder." in k or ".quant_conv." in k]
    assert enc and all(torch.equal(vae_sd[k], dec_sd[k]) for k in enc)  # the latent space is kept
    assert any(not torch.equal(vae_sd[k], dec_sd[k]) for k in vae_sd if ".decoder." in k)
    shipped = ship(run, tmp_path / "assets")
    assert torch.equal(load_file(str(shipped[0]))[k], dec_sd[k].half())
    assert [p.name for p in shipped] == [BASE_FILE, CONTROL_FILE]
    assert sum(p.stat().st_size for p in shipped) < 30 * 2**20

    models = load_models(str(shipped[0]), [str(shipped[1])], device="cpu")
    assert models.config.schedule.parameterization == r.parameterization == "v"
    assert models.config.vae.scale_factor == pytest.approx(
        json.loads((run / "vae" / "DONE.json").read_text())["scale_factor"], rel=1e-3)
    hint = np.zeros((128, 128, 3), np.uint8)
    hint[40:90, 40:90] = 255
    res = generate(models, GenerationRequest(prompt="red circle with blue background", steps=2, seed=1,
                                             resolution=128, controls=[ControlSpec(image=hint)]))
    assert res.images[0].shape == (128, 128, 3) and np.isfinite(res.images[0].astype(np.float32)).all()
