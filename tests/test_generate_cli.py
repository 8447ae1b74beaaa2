"""`ctrlnet generate` with the workflow flags: img2img, inpaint, units, hires, tiles, LoRA by file and
by prompt tag, records that make inpainted images again, and inputs checked before models load."""

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ctrlnet.interfaces.cli import main
from ctrlnet.pipeline import GenerationRequest, generate, load_models


def _write(path, img):
    cv2.imwrite(str(path), img[:, :, ::-1] if img.ndim == 3 else img)
    return str(path)


def _picture(h=64, w=64):
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (250, 40, 40), -1)
    return img


def _run(args, capsys):
    rc = main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--device", "cpu", *args])
    out = capsys.readouterr().out
    return rc, out


def test_inpaint_with_units_from_the_cli_and_made_again_from_its_png(tmp_path, capsys):
    init = _write(tmp_path / "init.png", _picture())
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    m = _write(tmp_path / "mask.png", mask)
    ring = np.zeros((48, 64, 3), np.uint8)
    cv2.circle(ring, (32, 24), 15, (255, 255, 255), 2)
    ctl = _write(tmp_path / "ring.png", ring)
    torch.manual_seed(0)
    rc, out = _run(["--prompt", "x", "--init-image", init, "--mask", m, "--mask-blur", "2", "--denoising-strength",
                    "0.8", "--width", "64", "--height", "64", "--steps", "3", "--seed", "5", "--control", ctl,
                    "--annotator", "none", "--control-mode", "prompt", "--resize-mode", "resize_and_fill",
                    "--control-start", "0.2", "--sampler", "Euler a", "--out", str(tmp_path / "a")], capsys)
    assert rc == 0
    first = tmp_path / "a" / "5_0.png"
    rec = json.loads(Image.open(first).info["ctrlnet"])
    unit = rec["request"]["controls"][0]
    assert (unit["control_mode"], unit["resize_mode"], unit["start"]) == ("prompt", "resize_and_fill", 0.2)
    assert rec["inputs"] == {"init_image": "5_init_image.png", "mask": "5_mask.png"}
    printed = out.splitlines()
    assert str(tmp_path / "a" / "5_init_image.png") in printed and str(tmp_path / "a" / "5_mask.png") in printed
    infotext = Image.open(first).info["parameters"]
    assert "Control Mode: prompt" in infotext and "Sampler: Euler a," in infotext and "Seed: 5," in infotext
    a = np.asarray(Image.open(first))
    outside = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 2.0) < 1e-3
    assert np.abs(a[outside].astype(int) - _picture()[outside]).max() <= 1
    torch.manual_seed(0)
    rc, _ = _run(["--from-png", str(first), "--out", str(tmp_path / "b")], capsys)
    assert rc == 0
    b = np.asarray(Image.open(tmp_path / "b" / "5_0.png"))
    assert np.array_equal(a, b)


def test_hires_and_tiles_from_the_cli(tmp_path, capsys):
    rc, out = _run(["--prompt", "x", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1",
                    "--hires-scale", "2", "--hires-steps", "2", "--hires-denoising-strength", "0.5",
                    "--hires-upscaler", "lanczos", "--tile-size", "64", "--tile-overlap", "16",
                    "--out", str(tmp_path)], capsys)
    assert rc == 0
    assert np.asarray(Image.open(tmp_path / "1_0.png")).shape == (128, 128, 3)


@pytest.mark.parametrize("bad", ["file", "under_file"])
def test_a_bad_output_folder_fails_before_models_load(tmp_path, capsys, monkeypatch, bad):
    import ctrlnet.pipeline

    monkeypatch.setattr(ctrlnet.pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    f = tmp_path / "taken"
    f.write_text("x")
    out = f if bad == "file" else f / "sub"
    rc = main(["generate", "--prompt", "x", "--out", str(out)])
    assert rc == 2
    assert "is a file" in capsys.readouterr().err


def test_a_missing_input_image_fails_before_models_load(tmp_path, capsys, monkeypatch):
    import ctrlnet.pipeline

    monkeypatch.setattr(ctrlnet.pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    rc = main(["generate", "--prompt", "x", "--init-image", str(tmp_path / "nope.png"), "--out", str(tmp_path)])
    assert rc == 2
    assert "nope.png" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--width", "4096", "--height", "4096"], ("the output would be 4096x4096 = 16777216 pixels, more than "
                                               "max_pixels=4194304")),
    (["--width", "1024", "--height", "1024", "--hires-scale", "3"], "the output would be 3072x3072"),
    (["--steps", "0"], "steps=0 is out of range"),
    (["--sampler", "LMS", "--eta", "0.5"], "sampler 'lms' takes no option eta"),
    # the embedded model's own 128-px default is read from its files: 128x128 fits, 512x512 would not
    (["--max-pixels", "20000"], None),
])
def test_sizes_and_ranges_fail_before_models_load(tmp_path, capsys, monkeypatch, flags, message):
    """The README says an output larger than --max-pixels is refused before any model loads; it
    was refused after loading (seconds to minutes for a full-size model), as were bad ranges."""
    import ctrlnet.pipeline

    monkeypatch.setattr(ctrlnet.pipeline, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    if message is None:
        with pytest.raises(pytest.fail.Exception, match="models loaded"):
            main(["generate", "--prompt", "x", "--out", str(tmp_path), *flags])
        return
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def _lora_file(path, unet):
    """A kohya LoRA on one attention projection of the tiny UNet (original module names)."""
    w = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    g = torch.Generator().manual_seed(2)
    save_file({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(w.shape[0], 2, generator=g) * 3,
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_lora_by_request_and_by_prompt_tag_for_this_call_only(tmp_path):
    models = load_models("random:tiny-sd1", [], device="cpu", dtype="fp32", lora_dirs=[str(tmp_path)])
    _lora_file(tmp_path / "style.safetensors", models.base.unet)
    before = {k: v.clone() for k, v in models.base.unet.state_dict().items()}
    req = GenerationRequest(prompt="x", added_prompt="", negative_prompt="", width=64, height=64, steps=2, seed=3)
    plain = generate(models, req).images[0]
    tagged = generate(models, GenerationRequest(**{**req.__dict__, "prompt": "x<lora:style:0.8>"})).images[0]
    listed = generate(models, GenerationRequest(**{**req.__dict__, "loras": [("style", 0.8)]})).images[0]
    zero = generate(models, GenerationRequest(**{**req.__dict__, "prompt": "x<lora:style:0>"})).images[0]
    assert np.array_equal(tagged, listed)  # the tag is removed from the text and applied like the field
    assert np.abs(tagged.astype(int) - plain).mean() > 1
    assert np.array_equal(zero, plain)
    assert all(torch.equal(v, models.base.unet.state_dict()[k]) for k, v in before.items())
    with pytest.raises(FileNotFoundError, match="'other' not found"):
        generate(models, GenerationRequest(**{**req.__dict__, "prompt": "x <lora:other>"}))
    with pytest.raises(FileNotFoundError):  # untrusted callers name LoRAs; no paths
        generate(models, GenerationRequest(**{**req.__dict__, "loras": [(str(tmp_path / "style.safetensors"), 1)]}),
                 allow_paths=False)


def test_untrusted_dicts_name_loras_and_never_give_paths():
    from ctrlnet.interfaces.request_io import request_from_dict

    assert request_from_dict({"loras": [["style", 0.5]]}).loras == [("style", 0.5)]
    for bad in ("../x", "/etc/passwd", "a/b", "C:x"):
        with pytest.raises(ValueError, match="named, not given by path"):
            request_from_dict({"loras": [[bad, 1]]})
    unit = request_from_dict({"controls": [{"control_mode": "prompt"}]}, images=[np.zeros((8, 8, 3), np.uint8)])
    assert unit.controls[0].control_mode.value == "prompt"
    with pytest.raises(ValueError, match="choose one of"):
        request_from_dict({"inpaint_fill": "paint"})


def test_lora_flag_is_recorded_and_honoured_by_from_png(tmp_path, capsys):
    from ctrlnet.pipeline import random_base

    lora = _lora_file(tmp_path / "style.safetensors", random_base("tiny-sd1").unet)
    args = ["--prompt", "x", "--width", "64", "--height", "64", "--steps", "2", "--seed", "9"]
    torch.manual_seed(0)
    assert _run([*args, "--lora", f"{lora}:0.7", "--out", str(tmp_path / "a")], capsys)[0] == 0
    torch.manual_seed(0)
    assert _run([*args, "--out", str(tmp_path / "plain")], capsys)[0] == 0
    rec = json.loads(Image.open(tmp_path / "a" / "9_0.png").info["ctrlnet"])
    assert rec["request"]["loras"] == [[str(lora.resolve()), 0.7]]
    torch.manual_seed(0)
    assert main(["generate", "--from-png", str(tmp_path / "a" / "9_0.png"), "--out", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "9_0.png")) for d in ("a", "b"))
    plain = np.asarray(Image.open(tmp_path / "plain" / "9_0.png"))
    assert np.array_equal(a, b) and np.abs(a.astype(int) - plain).mean() > 1


def test_control_init_is_the_init_image_and_builds_the_inpaint_map(tmp_path, capsys):
    init = _write(tmp_path / "init.png", _picture())
    mask = np.zeros((64, 64), np.uint8)
    mask[:20] = 255
    m = _write(tmp_path / "mask.png", mask)
    rc, _ = _run(["--prompt", "x", "--init-image", init, "--mask", m, "--mask-blur", "1", "--control", "init",
                  "--annotator", "inpaint", "--width", "64", "--height", "64", "--steps", "2", "--seed", "2",
                  "--out", str(tmp_path / "o")], capsys)
    assert rc == 0
    cmap = np.asarray(Image.open(tmp_path / "o" / "2_control0.png"))
    assert (cmap[:15] == 0).all()  # masked pixels at -1 show black
    assert np.abs(cmap[30:].astype(int) - _picture()[30:]).max() <= 1  # the rest is the init image


def test_vae_and_embeddings_are_recorded_and_honoured_by_from_png(tmp_path, capsys):
    from ctrlnet.pipeline import random_base

    vae = tmp_path / "other_vae.safetensors"
    save_file({k: v.contiguous() for k, v in random_base("tiny-sd1", seed=7).vae.state_dict().items()}, str(vae))
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))},
              str(emb_dir / "shiny.safetensors"))
    args = ["--prompt", "a shiny ball", "--width", "64", "--height", "64", "--steps", "2", "--seed", "4"]
    torch.manual_seed(0)
    assert _run([*args, "--vae", str(vae), "--embeddings", str(emb_dir), "--out", str(tmp_path / "a")], capsys)[0] == 0
    torch.manual_seed(0)
    assert _run([*args, "--out", str(tmp_path / "plain")], capsys)[0] == 0
    rec = json.loads(Image.open(tmp_path / "a" / "4_0.png").info["ctrlnet"])
    assert rec["vae"] == str(vae.resolve()) and rec["embeddings"] == [str(emb_dir.resolve())]
    torch.manual_seed(0)
    assert main(["generate", "--from-png", str(tmp_path / "a" / "4_0.png"), "--out", str(tmp_path / "b")]) == 0
    torch.manual_seed(0)
    assert _run([*args, "--embeddings", str(emb_dir), "--out", str(tmp_path / "emb")], capsys)[0] == 0
    a, b, plain, emb = (np.asarray(Image.open(tmp_path / d / "4_0.png")) for d in ("a", "b", "plain", "emb"))
    assert np.array_equal(a, b) and np.abs(a.astype(int) - plain).mean() > 1
    assert np.abs(emb.astype(int) - plain).mean() > 0.1  # "shiny" is the embedding, not the word


def test_per_control_flags_belong_to_the_control_they_follow(tmp_path, capsys):
    ring = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(ring, (32, 32), 15, (255, 255, 255), 2)
    a, b, c = (_write(tmp_path / f"{n}.png", ring) for n in "abc")
    # the README's two-unit line: each unit gets only its own flags; --strength before the first
    # --control is every unit's, and a unit's own value wins over it
    rc, _ = _run(["--prompt", "x", "--width", "64", "--height", "64", "--steps", "1", "--seed", "3",
                  "--strength", "0.5",
                  "--control", a, "--annotator", "none", "--control-mode", "controlnet",
                  "--control", b, "--annotator", "canny", "--resize-mode", "resize_and_fill", "--control-end", "0.6",
                  "--control", c, "--annotator", "none", "--strength", "1.5", "--pixel-perfect", "--hr-option",
                  "low_res_only", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0
    units = json.loads(Image.open(tmp_path / "o" / "3_0.png").info["ctrlnet"])["request"]["controls"]
    assert [u["model"] for u in units] == ["c", "c", "c"]  # beyond the --controlnet list: the first, named
    got = [(u["annotator"], u["control_mode"], u["resize_mode"], u["end"], u["strength"], u["pixel_perfect"],
            u["hr_option"]) for u in units]
    assert got == [(None, "controlnet", "crop_and_resize", 1.0, 0.5, False, "both"),
                   ("canny", "balanced", "resize_and_fill", 0.6, 0.5, False, "both"),
                   (None, "balanced", "crop_and_resize", 1.0, 1.5, True, "low_res_only")]


def test_mask_without_init_image_names_the_flags(tmp_path, capsys):
    m = _write(tmp_path / "m.png", np.zeros((64, 64), np.uint8))
    rc = main(["generate", "--mask", m, "--prompt", "x", "--out", str(tmp_path / "o")])
    assert rc != 0 and "--mask needs --init-image" in capsys.readouterr().err


def test_a_per_control_flag_twice_for_one_control_is_refused(tmp_path, capsys):
    a = _write(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SystemExit):
        main(["generate", "--control", a, "--annotator", "canny", "--annotator", "none"])
    err = capsys.readouterr().err
    assert f"--annotator given twice for --control {a} ('canny' and 'none')" in err


def test_an_unknown_annotator_fails_before_models_load(tmp_path, capsys, monkeypatch):
    import ctrlnet.interfaces.model_args as model_args

    def no_loading(*a, **k):
        raise AssertionError("models were loaded before the annotator was checked")

    monkeypatch.setattr(model_args, "load_named", no_loading)
    a = _write(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    rc = main(["generate", "--control", a, "--annotator", "cany", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "--annotator 'cany' (for --control" in err and "canny" in err


def test_models_are_named_as_ctrlnet_models_list_names_them(tmp_path, capsys, monkeypatch):
    from ctrlnet.interfaces.model_args import resolve_name

    monkeypatch.setenv("CTRLNET_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    # a named official model found in a search folder is its file
    (tmp_path / "control_v11p_sd15_canny.pth").write_bytes(b"x")
    (tmp_path / "control_v11p_sd15_canny.yaml").write_text("model: {}")
    assert resolve_name("control_v11p_sd15_canny") == str(tmp_path / "control_v11p_sd15_canny.pth")
    # a named model that is not here says how to get it; a bare unknown word suggests close names
    rc = main(["generate", "--base", "sd15", "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "ctrlnet models download sd15" in err and "CTRLNET_MODELS_DIR" in err
    rc = main(["generate", "--controlnet", "control_v11p_sd15_cany", "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "neither a file nor a model name" in err and "control_v11p_sd15_canny" in err
    # paths stay paths (the loader names a missing one)
    assert resolve_name("nothing/here.safetensors") == "nothing/here.safetensors"
