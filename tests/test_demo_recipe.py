"""The embedded model's recipe end to end at smoke size: data -> VAE -> base -> ControlNet ->
shipped fp16 files that the pipeline loads and samples from."""

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
    files = build(run, r, until="base")  # a session that ends after the base
    assert not (run / "controlnet").exists() and (run / "base" / "DONE.json").is_file()
    with pytest.raises(SystemExit, match="--resume"):
        build(run, r)
    base_written = files["base"].stat().st_mtime_ns
    files = build(run, r, resume=True)  # the next session: finished stages are kept
    assert files["base"].stat().st_mtime_ns == base_written
    for stage in ("vae", "base", "controlnet"):
        assert (run / stage / "DONE.json").is_file(), stage
    shipped = ship(run, tmp_path / "assets")
    vae_sd, base_sd = load_file(str(files["vae"])), load_file(str(shipped[0]))
    k = next(k for k in vae_sd if ".decoder." in k)
    assert torch.equal(base_sd[k], vae_sd[k].half())  # the base ships the VAE it was trained on
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
