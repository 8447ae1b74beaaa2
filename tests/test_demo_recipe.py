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

    from ctrlnet.checkpoints.defaults import read_defaults

    want = {"resolution": 128, "steps": 20, "guidance_scale": 5.0, "vocabulary": "css"}
    assert read_defaults(shipped[0]) == read_defaults(shipped[1]) == want
    # the training data hold only training pairs of the whole vocabulary; the previews only held-out ones
    from ctrlnet.training.builders import read_jsonl
    from ctrlnet.training.colors import is_heldout_pair

    rows = read_jsonl(run / "data" / "train" / "prompt.json")
    assert not any(is_heldout_pair(x["circle_color"], x["background_color"]) for x in rows)
    held = read_jsonl(run / "data" / "heldout" / "prompt.json")
    assert all(is_heldout_pair(x["circle_color"], x["background_color"]) for x in held)
    # another vocabulary in the same folder is refused before anything is rebuilt on other data
    with pytest.raises(SystemExit, match="vocabulary"):
        build(run, replace(r, vocabulary="basic20"), resume=True)

    models = load_models(str(shipped[0]), [str(shipped[1])], device="cpu")
    assert {k: models.defaults[k] for k in want} == want  # load_models reads them for every surface
    assert models.config.schedule.parameterization == r.parameterization == "v"
    assert models.config.vae.scale_factor == pytest.approx(
        json.loads((run / "vae" / "DONE.json").read_text())["scale_factor"], rel=1e-3)
    hint = np.zeros((128, 128, 3), np.uint8)
    hint[40:90, 40:90] = 255
    res = generate(models, GenerationRequest(prompt="red circle with blue background", steps=2, seed=1,
                                             resolution=128, controls=[ControlSpec(image=hint)]))
    assert res.images[0].shape == (128, 128, 3) and np.isfinite(res.images[0].astype(np.float32)).all()
