"""The rest of the ctrlnet command: --from-png reproduces pixels, convert round-trips weights, help texts."""

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ctrlnet.interfaces.cli import build_parser, main


def _square(path, size=72):
    img = np.zeros((size, size, 3), np.uint8)
    cv2.rectangle(img, (12, 12), (size - 14, size - 20), (255, 255, 255), 3)
    cv2.circle(img, (size // 2, size // 2), size // 6, (0, 200, 255), -1)
    cv2.imwrite(str(path), img)
    return path


def test_from_png_reproduces_the_same_pixels(tmp_path, capsys):
    # random:<preset> models draw their biases from torch's global generator: seed it before each
    # load so both runs have the same weights (with files, the weights are the same anyway)
    src = _square(tmp_path / "in.png")
    torch.manual_seed(0)
    rc = main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--control", str(src),
               "--annotator", "canny", "--prompt", "a box", "--steps", "2", "--resolution", "64", "-n", "2",
               "--eta", "0.5", "--seed", "-1", "--out", str(tmp_path / "a")])
    assert rc == 0
    seed = int(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    first = tmp_path / "a" / f"{seed}_1.png"
    record = json.loads(Image.open(first).info["ctrlnet"])
    assert record["base"] == "random:tiny-sd1" and record["controlnets"] == {"c": "random:c"}
    # image 1 of the batch records its own seed (seed + 1) and one image: it is made again alone
    assert record["control_maps"] == [f"{seed}_control0.png"] and record["request"]["seed"] == seed + 1
    assert record["request"]["num_images"] == 1

    torch.manual_seed(0)
    rc = main(["generate", "--from-png", str(first), "--out", str(tmp_path / "b")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{seed + 1}_0.png", f"{seed + 1}_control0.png"]
    a = np.asarray(Image.open(first))
    b = np.asarray(Image.open(tmp_path / "b" / f"{seed + 1}_0.png"))
    # the same noise; only the UNet's batch differs (2 vs 1), which moves float sums by ~5e-6
    assert a.shape == (64, 64, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # the control map fed back is the saved one, unchanged
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / f"{seed}_control0.png")),
                          np.asarray(Image.open(tmp_path / "b" / f"{seed + 1}_control0.png")))
    # the two images of the batch differ (other noise), so the equality above can fail
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / f"{seed}_0.png")),
                              np.asarray(Image.open(tmp_path / "a" / f"{seed}_1.png")))


def test_from_png_reproduces_hires_fix_with_an_annotator(tmp_path, capsys):
    """With hires fix a unit's map is fitted to each pass's size; the one saved map (the hires
    pass's, 128 px) resized back to 64 px for the first pass was another hint, and the image made
    again differed by up to 65 levels (canny). The control images are saved now and mapped again."""
    src = _square(tmp_path / "in.png")
    common = ["--prompt", "a box", "--steps", "2", "--width", "64", "--height", "64", "--hires-scale", "2",
              "--hires-denoising-strength", "0.6"]
    torch.manual_seed(0)
    assert main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--control", str(src),
                 "--annotator", "canny", "--control", str(src), "--annotator", "none", *common, "--seed", "3",
                 "--out", str(tmp_path / "a")]) == 0
    record = json.loads(Image.open(tmp_path / "a" / "3_0.png").info["ctrlnet"])
    # the ready-made map too: fitted from 72 px to each pass's size, not the saved 128 px one resized
    assert record["control_sources"] == {"0": "3_control0_source.png", "1": "3_control1_source.png"}
    saved = np.asarray(Image.open(tmp_path / "a" / "3_control0_source.png"))
    assert np.array_equal(saved, cv2.imread(str(src))[:, :, ::-1])
    torch.manual_seed(0)
    assert main(["generate", "--from-png", str(tmp_path / "a" / "3_0.png"), "--out", str(tmp_path / "b")]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "3_0.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b" / "3_0.png")).astype(int)
    assert a.shape == (128, 128, 3) and np.abs(a - b).max() == 0
    # without hires fix nothing more is saved: the map stands for the unit
    torch.manual_seed(0)
    assert main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--control", str(src),
                 "--annotator", "canny", *common[:-4], "--seed", "3", "--out", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["3_0.png", "3_control0.png"]


def test_from_png_refuses_flags_it_would_ignore(tmp_path, capsys, monkeypatch):
    """`--from-png out.png --seed 7 --steps 30` made the recorded image again and dropped the two
    flags without a word; they are refused now, naming them, before the PNG or any model is read."""
    import ctrlnet.pipeline

    monkeypatch.setattr(ctrlnet.pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    assert main(["generate", "--from-png", str(tmp_path / "none.png"), "--seed", "7", "--steps", "30",
                 "--annotator", "canny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert ("--from-png makes the recorded image again with the settings in the PNG, so --annotator, --steps, "
            "--seed would be ignored; leave them out") in err
    # the flags it honours are not refused (this PNG does not exist: the next error is about it)
    assert main(["generate", "--from-png", str(tmp_path / "none.png"), "--base", "random:tiny-sd1",
                 "--lora-dir", str(tmp_path), "--dtype", "fp32", "--out", str(tmp_path / "o")]) == 2
    assert "no image file at" in capsys.readouterr().err


def test_from_png_without_record_is_a_clear_error(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "plain.png"), np.zeros((16, 16, 3), np.uint8))
    assert main(["generate", "--from-png", str(tmp_path / "plain.png")]) == 2
    assert "no 'ctrlnet' text chunk" in capsys.readouterr().err


def test_from_png_refuses_paths_in_the_record(tmp_path, capsys):
    from ctrlnet.image import save_image

    rec = {"request": {"controls": [{"annotator": None}]}, "control_maps": ["../../etc/secret.png"]}
    save_image(np.zeros((16, 16, 3), np.uint8), tmp_path / "x.png", {"ctrlnet": json.dumps(rec)})
    assert main(["generate", "--from-png", str(tmp_path / "x.png")]) == 2
    assert "not a plain file name" in capsys.readouterr().err


def test_record_keeps_colour_references(tmp_path):
    from ctrlnet.interfaces.outputs import read_record, save_result
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, GenerationResult

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hint = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    req = GenerationRequest(prompt="p", seed=7, resolution=64,
                            controls=[ControlSpec(image=hint), ControlSpec(image=hint, reference=ref)])
    res = GenerationResult([np.zeros((32, 32, 3), np.uint8)], [hint, hint], 7, req)
    saved = save_result(res, tmp_path, "random:tiny-sd1", {"c": "random:c"})
    rec = read_record(saved.images[0])
    assert rec.request.controls[0].reference is None
    assert np.array_equal(rec.request.controls[1].reference, ref)
    assert json.loads(Image.open(saved.images[0]).info["ctrlnet"])["references"] == {"1": "7_reference1.png"}


def test_annotate_output_records_its_settings(tmp_path):
    src = _square(tmp_path / "in.png")
    assert main(["annotate", "canny", str(src), str(tmp_path / "m.png"), "--param", "low_threshold=50"]) == 0
    rec = json.loads(Image.open(tmp_path / "m.png").info["ctrlnet"])
    assert rec["annotator"] == "canny" and rec["params"] == {"low_threshold": 50}


def _tensors(path):
    from ctrlnet.checkpoints.io import read_checkpoint

    return read_checkpoint(path).state_dict


@pytest.mark.parametrize("preset,text_prefix", [("tiny-sd1", "cond_stage_model.transformer."),
                                                ("tiny-sd2", "cond_stage_model.model.")])
def test_convert_base_single_diffusers_single_round_trip(tmp_path, preset, text_prefix, capsys):
    from ctrlnet.checkpoints.convert import base_state_dict, write_single_file
    from ctrlnet.checkpoints.load import load_base
    from ctrlnet.pipeline import random_base

    base = random_base(preset)
    src = write_single_file(base_state_dict(base), tmp_path / "base.safetensors", base.config)
    assert main(["convert", str(src), str(tmp_path / "diff")]) == 0
    assert (tmp_path / "diff" / "unet" / "config.json").is_file()
    assert main(["convert", str(tmp_path / "diff"), str(tmp_path / "back.safetensors")]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "back.safetensors")
    assert any(k.startswith(text_prefix) for k in b)
    assert any(k.startswith("model.diffusion_model.") for k in b) and any(k.startswith("first_stage_model.") for k in b)
    common = set(a) & set(b)
    # every UNet and VAE tensor survives (the text tower may drop bookkeeping buffers)
    assert {k for k in a if not k.startswith("cond_stage_model.")} <= common
    lossy = set()
    if base.config.text.kind == "openclip":  # the diffusers text model lacks the unused last block
        from ctrlnet.checkpoints.diffusers_clip import openclip_unrecoverable_keys

        lossy = {text_prefix + k for k in openclip_unrecoverable_keys(base.config.text, base.config.text.layers - 1)}
    assert len(common - lossy) > 100
    for k in common - lossy:
        assert torch.equal(a[k], b[k]), k
    # the converted file loads as a model with the same config
    got = load_base(tmp_path / "back.safetensors").config.unet
    want = base.config.unet
    assert set(got.attention_resolutions) == set(want.attention_resolutions)  # a set; order is immaterial
    assert replace(got, attention_resolutions=()) == replace(want, attention_resolutions=())
    assert "wrote base" in capsys.readouterr().out


def test_convert_controlnet_to_fp16_and_refuse_overwrite(tmp_path, capsys):
    from ctrlnet.checkpoints.convert import base_state_dict, controlnet_state_dict, write_single_file
    from ctrlnet.checkpoints.load import load_controlnet
    from ctrlnet.pipeline import random_base, random_controlnet

    base = random_base("tiny-sd1")
    basefile = write_single_file(base_state_dict(base), tmp_path / "base.safetensors", base.config)
    net = random_controlnet(base.unet, "edges")
    src = write_single_file(controlnet_state_dict(net), tmp_path / "cn.safetensors", base.config)
    out = tmp_path / "cn16.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", "fp16", "--base", str(basefile)]) == 0
    sd = _tensors(out)
    assert all(k.startswith("control_model.") for k in sd)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert out.stat().st_size < 0.6 * src.stat().st_size
    back = load_controlnet(out, base=base.config)
    ref = net.state_dict()
    for k, v in back.state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), atol=1e-3, rtol=1e-3), k
    # to a diffusers ControlNet folder and back to the original layout, exactly
    assert main(["convert", str(src), str(tmp_path / "cn_diff"), "--base", str(basefile)]) == 0
    assert main(["convert", str(tmp_path / "cn_diff"), str(tmp_path / "cn_back.safetensors"),
                 "--base", str(basefile)]) == 0
    back = _tensors(tmp_path / "cn_back.safetensors")
    orig = _tensors(src)
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    capsys.readouterr()
    assert main(["convert", str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_convert_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a model at all, just some text")
    assert main(["convert", str(tmp_path / "junk.ckpt"), str(tmp_path / "o.safetensors")]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "o.safetensors")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ["generate", "annotate", "convert", "models", "ui", "serve"]:
        assert name in sub.choices
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert len(text) > 300 and "usage: ctrlnet " + name in text
    assert main([]) == 2  # no command: help and exit 2
