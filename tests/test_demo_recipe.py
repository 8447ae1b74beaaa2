"""The embedded model's recipe end to end at smoke size: data -> VAE (crops, then whole images)
-> base -> ControlNet -> shipped fp16 files that the pipeline loads and samples from."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("accelerate")


def test_quick_recipe_builds_resumes_and_ships(tmp_path):
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate, load_models
    from ctrlnet.training.demo import BASE_FILE, CONTROL_FILE, DemoRecipe, build, ship

    r = replace(DemoRecipe().quick(), n_train=8, n_heldout=2, sample_every=0)
    run = tmp_path / "run"
    build(run, r, until="vae")
    assert json.loads((run / "vae_whole" / "DONE.json").read_text())["step"] == r.vae_whole_steps
    with pytest.raises(SystemExit, match="--resume"):
        build(run, r)
    files = build(run, r, resume=True)  # the finished VAE phases are kept, the rest is built
    assert files["vae"] == run / "vae_whole" / "vae.safetensors"
    for stage in ("vae", "vae_whole", "base", "controlnet"):
        assert (run / stage / "DONE.json").is_file(), stage
    shipped = ship(run, tmp_path / "assets")
    assert [p.name for p in shipped] == [BASE_FILE, CONTROL_FILE]
    assert sum(p.stat().st_size for p in shipped) < 30 * 2**20

    models = load_models(str(shipped[0]), [str(shipped[1])], device="cpu")
    assert models.config.vae.scale_factor == pytest.approx(
        json.loads((run / "vae_whole" / "DONE.json").read_text())["scale_factor"], rel=1e-3)
    hint = np.zeros((128, 128, 3), np.uint8)
    hint[40:90, 40:90] = 255
    res = generate(models, GenerationRequest(prompt="red circle with blue background", steps=2, seed=1,
                                             resolution=128, controls=[ControlSpec(image=hint)]))
    assert res.images[0].shape == (128, 128, 3) and np.isfinite(res.images[0].astype(np.float32)).all()
