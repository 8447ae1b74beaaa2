"""Sampling presets: ``fast`` (10 steps of UniPC order 1 on Karras Min) resolves to its sampler, schedule and steps on every surface (Python,
request dicts for the API and records, CLI flags), and whatever the caller sets explicitly wins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from ctrlnet.generation.presets import PRESETS, apply_preset, get_preset
from ctrlnet.interfaces.request_io import request_from_dict, with_model_defaults
from ctrlnet.sampling.names import a1111_name, resolve_sampler

MODEL_DEFAULTS = {"resolution": 128, "steps": 20, "guidance_scale": 5.0}  # as the demo model's files carry


def test_fast_is_ten_unipc_order_1_steps_on_karras_min():
    fast = get_preset("fast")
    assert (resolve_sampler(fast.sampler, fast.schedule), fast.steps) == (("unipc_1", "karras_min"), 10)
    assert resolve_sampler(fast.sampler) == ("unipc_1", "karras_min")  # also the sampler's own schedule
    assert get_preset(" FAST ") is fast
    with pytest.raises(ValueError, match="unknown preset 'turbo'; known: fast"):
        get_preset("turbo")


@pytest.mark.parametrize("given, want", [
    ({}, ("UniPC order 1", "karras_min", 10)),
    ({"steps": 30}, ("UniPC order 1", "karras_min", 30)),  # explicit steps win
    ({"schedule": "karras"}, ("UniPC order 1", "karras", 10)),  # explicit schedule wins
    ({"sampler": "DPM++ 2M"}, ("DPM++ 2M", None, 10)),  # another sampler keeps its own schedule
    ({"sampler": "UniPC", "schedule": "karras", "steps": 7}, ("UniPC", "karras", 7)),  # nothing left to fill
    ({"sampler": None, "steps": None}, ("UniPC order 1", "karras_min", 10)),  # null = not set
])
def test_apply_preset_fills_only_what_is_unset(given, want):
    got = apply_preset(given, "fast")
    assert (got["sampler"], got.get("schedule"), got["steps"]) == want
    assert apply_preset(given, None) == given


def test_request_dicts_take_the_preset_before_the_models_defaults():
    req = request_from_dict(with_model_defaults({"prompt": "x", "preset": "fast"}, MODEL_DEFAULTS))
    assert (req.sampler, req.schedule, req.steps, req.resolution) == ("UniPC order 1", "karras_min", 10, 128)
    assert a1111_name(req.sampler, req.schedule) == "UniPC order 1"
    req = request_from_dict(with_model_defaults({"preset": "fast", "steps": 25, "sampler": "ddim"}, MODEL_DEFAULTS))
    assert (req.sampler, req.schedule, req.steps) == ("ddim", None, 25)
    req = request_from_dict(with_model_defaults({}, MODEL_DEFAULTS))  # no preset: as before
    assert (req.sampler, req.schedule, req.steps) == ("ddim", None, 20)
    with pytest.raises(ValueError, match="unknown preset"):
        with_model_defaults({"preset": "slow"}, MODEL_DEFAULTS)
    with pytest.raises(ValueError, match="must be a string"):
        with_model_defaults({"preset": 3}, MODEL_DEFAULTS)


@pytest.mark.parametrize("flags, want", [
    (["--preset", "fast"], ("UniPC order 1", "karras_min", 10)),
    (["--preset", "fast", "--steps", "14"], ("UniPC order 1", "karras_min", 14)),
    (["--preset", "fast", "--sampler", "Euler a"], ("Euler a", None, 10)),
    ([], ("ddim", None, 20)),  # no preset: the model's steps, DDIM
])
def test_cli_flags_resolve_the_preset(flags, want):
    from ctrlnet.interfaces.cli import _request_from_args, build_parser

    args = build_parser().parse_args(["generate", *flags])
    models = SimpleNamespace(controlnets={}, defaults=MODEL_DEFAULTS)
    req = _request_from_args(args, models, {"controls": [], "init_image": None, "mask": None})
    assert (req.sampler, req.schedule, req.steps) == want


def test_the_cli_preset_reaches_the_sampler_and_the_record(tmp_path, capsys):
    import numpy as np

    from ctrlnet.interfaces.cli import main

    ctl = tmp_path / "c.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(ctl)
    rc = main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--device", "cpu",
               "--control", str(ctl), "--annotator", "none", "--resolution", "64", "--preset", "fast",
               "--steps", "3", "--seed", "1", "--out", str(tmp_path / "o")])
    assert rc == 0
    info = Image.open(tmp_path / "o" / "1_0.png").info["parameters"]
    assert "Steps: 3," in info and "Sampler: UniPC order 1," in info


def test_presets_are_plain_data():
    for name, p in PRESETS.items():
        assert name == name.lower() and isinstance(p.steps, int) and p.summary
        resolve_sampler(p.sampler, p.schedule)  # a name every surface accepts
