"""Sampling defaults carried by model files (``ctrlnet_defaults``): written and checked, read by
load_models into ``Models.defaults``, and used by the CLI, the HTTP API, the web UI and
colorization when the user leaves resolution, steps or guidance out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctrlnet.checkpoints.defaults import (DEFAULTS_KEY, LEGACY_DEMO_DEFAULTS, check_defaults, defaults_metadata,
                                          model_defaults, read_defaults)

DEFAULTS = {"resolution": 64, "steps": 2, "guidance_scale": 3.5, "vocabulary": "css"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny random base (our single-file layout) whose metadata carries DEFAULTS."""
    from ctrlnet.checkpoints.save import PREFIXES, save_model_file
    from ctrlnet.pipeline import random_base

    b = random_base("tiny-sd1")
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    parts = {PREFIXES["unet"]: b.unet.state_dict(), PREFIXES["vae"]: b.vae.state_dict(),
             PREFIXES["text"]: b.text_encoder.state_dict()}
    return save_model_file(path, parts, b.config, defaults_metadata(DEFAULTS))


def test_check_defaults_types_ranges_and_unknown_keys():
    assert check_defaults({"guidance_scale": 5}) == {"guidance_scale": 5.0}  # an int JSON number is fine
    for bad, msg in [({"resolution": 100}, "multiple of 8"), ({"steps": 0}, "between 1"),
                     ({"steps": True}, "int"), ({"guidance_scale": "5"}, "float"), ({"size": 128}, "unknown")]:
        with pytest.raises(ValueError, match=msg):
            check_defaults(bad)


def test_read_defaults_and_precedence(model_file, tmp_path):
    from safetensors.torch import save_file

    assert read_defaults(model_file) == DEFAULTS
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert read_defaults(plain) == {} and read_defaults(tmp_path / "missing.ckpt") == {}
    net = tmp_path / "net.safetensors"
    save_file({"x": torch.zeros(1)}, str(net), metadata=defaults_metadata({"steps": 7}))
    # the ControlNet's steps win over the base's; the rest stays the base's
    assert model_defaults(model_file, [net]) == {**DEFAULTS, "steps": 7}
    assert model_defaults(plain, [], legacy={"resolution": 128}) == {"resolution": 128}
    assert model_defaults(model_file, [], legacy={"resolution": 128}) == DEFAULTS  # legacy only fills a void
    broken = tmp_path / "broken.safetensors"
    save_file({"x": torch.zeros(1)}, str(broken), metadata={DEFAULTS_KEY: "{not json"})
    with pytest.raises(ValueError, match="not JSON"):
        read_defaults(broken)
    save_file({"x": torch.zeros(1)}, str(broken), metadata={DEFAULTS_KEY: json.dumps({"steps": -1})})
    with pytest.raises(ValueError, match="steps"):
        read_defaults(broken)


def test_load_models_reads_the_file_defaults(model_file):
    from ctrlnet.pipeline import demo_dir, load_models

    models = load_models(str(model_file), [], device="cpu")
    assert {k: models.defaults[k] for k in DEFAULTS} == DEFAULTS
    assert "resolution" not in load_models("random:tiny-sd1", [], device="cpu").defaults
    if (demo_dir() / "demo_base.safetensors").is_file():
        embedded = load_models(None, device="cpu")
        # the embedded files carry theirs, or (shipped before the key) the legacy demo settings
        assert embedded.defaults["resolution"] == 128
        assert set(LEGACY_DEMO_DEFAULTS) <= set(embedded.defaults)


def test_cli_generate_takes_resolution_steps_guidance_from_the_model(model_file, tmp_path):
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.cli import main
    from ctrlnet.interfaces.outputs import read_record

    hint = np.zeros((96, 96, 3), np.uint8)
    hint[30:60, 30:60] = 255
    save_image(hint, tmp_path / "hint.png")
    rc = main(["generate", "--base", str(model_file), "--controlnet", "random:edges", "--control",
               str(tmp_path / "hint.png"), "--prompt", "a", "--seed", "1", "--device", "cpu",
               "--out", str(tmp_path / "out")])
    assert rc in (0, None)
    png = tmp_path / "out" / "1_0.png"
    assert load_image(png).shape == (64, 64, 3)  # the file's 64 px, not SD's 512
    req = read_record(png).request
    assert (req.steps, req.guidance_scale, req.resolution) == (2, 3.5, 64)
    rc = main(["generate", "--base", str(model_file), "--controlnet", "random:edges", "--control",
               str(tmp_path / "hint.png"), "--prompt", "a", "--seed", "1", "--device", "cpu", "--steps", "1",
               "--resolution", "128", "--guidance-scale", "2", "--out", str(tmp_path / "out2")])
    req = read_record(tmp_path / "out2" / "1_0.png").request
    assert (req.steps, req.guidance_scale, req.resolution) == (1, 2.0, 128)  # what the user says wins


def test_api_fills_what_the_client_leaves_out(model_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ctrlnet.interfaces.api import create_app
    from ctrlnet.interfaces.request_io import with_model_defaults
    from ctrlnet.pipeline import load_models

    assert with_model_defaults({"steps": 5, "resolution": None}, DEFAULTS) == {"steps": 5, "resolution": 64,
                                                                              "guidance_scale": 3.5}
    models = load_models(str(model_file), [], device="cpu")
    client = TestClient(create_app(models))
    assert client.get("/v1/models").json()["defaults"]["resolution"] == 64
    r = client.post("/v1/generate", json={"prompt": "a", "seed": 3})
    assert r.status_code == 200, r.text
    req = r.json()["request"]
    assert (req["resolution"], req["steps"], req["guidance_scale"]) == (64, 2, 3.5)
    r = client.post("/v1/generate", json={"prompt": "a", "seed": 3, "steps": 1, "resolution": 128})
    assert (r.json()["request"]["steps"], r.json()["request"]["resolution"]) == (1, 128)


def test_webui_sliders_start_at_the_model_defaults(model_file, tmp_path):
    gr = pytest.importorskip("gradio")
    from ctrlnet.interfaces.webui import build_app
    from ctrlnet.pipeline import demo_dir, load_models

    def sliders(app):  # the txt2img / img2img / inpaint tabs' settings
        comps = list(app.blocks.values())
        return {k: {c.value for c in comps if getattr(c, "elem_id", None) in (f"{m}-{k}" for m in
                                                                              ("txt2img", "img2img", "inpaint"))}
                for k in ("width", "height", "steps", "cfg")}

    app = build_app(load_models(str(model_file), [], device="cpu"), outputs_dir=tmp_path)
    got = sliders(app)
    assert got["width"] == got["height"] == {64} and got["cfg"] == {3.5} and got["steps"] == {2}
    if (demo_dir() / "demo_base.safetensors").is_file():  # the embedded model, loaded on first use
        got = sliders(build_app(None, outputs_dir=tmp_path))
        assert got["width"] == {128}
    assert isinstance(app, gr.Blocks)
