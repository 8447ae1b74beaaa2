"""The web app's handlers without a browser (tests/test_webui_browser.py drives the real page)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import gradient_photo as _photo

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def models():
    from ctrlnet.pipeline import load_models

    return load_models("random:tiny-sd1", ["random:canny_edges", "random:scribble_net"], device="cpu")


@pytest.fixture(scope="module")
def holder(models):
    from ctrlnet.interfaces.webui import ModelHolder, as_loaded

    return ModelHolder(as_loaded(models), None)


@pytest.fixture(scope="module")
def colorizer():
    from ctrlnet.colorize.reference import load_colorizer_models

    return load_colorizer_models("random:tiny-sd1", "random", device="cpu", dtype="fp32")


def _settings(**kw) -> dict:
    d = {"prompt": "a box", "added_prompt": "", "negative_prompt": "", "width": 64, "height": 64, "steps": 3,
         "sampler": "DDIM", "schedule": "Automatic", "guidance_scale": 7.0, "seed": 5, "num_images": 1,
         "batch_count": 1, "clip_skip": 1, "hires_enabled": False, "hires_scale": 2.0, "hires_steps": 0,
         "hires_denoising_strength": 0.7, "hires_upscaler": "latent", "denoising_strength": 0.75, "mask_blur": 0,
         "inpaint_fill": "original", "only_masked": "whole", "only_masked_padding": 32}
    d.update(kw)
    return d


def _components(app):
    return list(app.blocks.values())


def test_app_has_the_tabs_units_and_named_endpoints(models, tmp_path):
    from ctrlnet.annotators import list_annotators
    from ctrlnet.annotators.availability import missing_weights
    from ctrlnet.interfaces.webui import build_app

    app = build_app(models, outputs_dir=tmp_path, defaults={"resolution": 256})
    comps = _components(app)
    tabs = [c.label for c in comps if isinstance(c, gr.Tab)]
    assert tabs == ["txt2img", "img2img", "inpaint", "PNG info", "Line-art colorization", "Reference colorization"]
    units = [c.label for c in comps if isinstance(c, gr.Accordion) and c.label.startswith("ControlNet Unit")]
    assert units == [f"ControlNet Unit {i}" for i in range(3)] * 3
    assert sum(isinstance(c, gr.ImageMask) for c in comps) == 1  # the inpaint canvas
    widths = [c for c in comps if getattr(c, "label", None) == "Width"]
    assert len(widths) == 3 and {c.value for c in widths} == {256}
    # every registry annotator is offered; those without weights here say so in the menu
    menus = [c for c in comps if getattr(c, "label", None) == "Preprocessor" and isinstance(c, gr.Dropdown)
             and (c.elem_id or "").endswith("-annotator")]
    assert len(menus) == 9
    choices = dict((v, label) for label, v in menus[0].choices)
    assert set(choices) == set(list_annotators())
    for a in list_annotators():
        assert choices[a].endswith("(weights missing)") == bool(missing_weights(a))
    for name in ("sampler", "schedule"):
        menu = [c for c in comps if getattr(c, "elem_id", None) == f"txt2img-{name}"][0]
        assert len(menu.choices) >= (11 if name == "sampler" else 8)
    names = {d.api_name for d in app.fns.values()}
    assert {"txt2img", "img2img", "inpaint", "interrupt", "png_info", "png_info_to_txt2img",
            "txt2img_preview_unit_0", "inpaint_preview_unit_2", "lineart", "colorize", "load_models"} <= names
    # no server path in what the page is sent (the outputs folder is the server's business)
    assert str(tmp_path) not in json.dumps(app.get_config_file(), default=str)
    five = build_app(models, outputs_dir=tmp_path, units=5)
    assert sum(isinstance(c, gr.Accordion) and c.label.startswith("ControlNet Unit") for c in _components(five)) == 15
    with pytest.raises(ValueError, match="units=0"):
        build_app(models, outputs_dir=tmp_path, units=0)


def test_size_defaults_come_from_the_model_files(tmp_path):
    from ctrlnet.interfaces.webui import build_app
    from ctrlnet.pipeline import DEMO_BASE, demo_dir, load_models

    def width(app):
        return [c.value for c in _components(app) if getattr(c, "elem_id", None) == "txt2img-width"][0]

    if (demo_dir() / DEMO_BASE).is_file():  # the embedded demo (loaded on first use): its files say 128
        assert width(build_app(None, outputs_dir=tmp_path)) == 128
    plain = load_models("random:tiny-sd1", [], device="cpu")  # no defaults in the files: SD's 512
    assert width(build_app(plain, outputs_dir=tmp_path)) == 512


def test_run_generation_is_generate_with_two_units_and_batches(models, holder, tmp_path):
    from ctrlnet.interfaces.webui import UnitValues, run_generation
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate

    a, b = _photo(), 255 - _photo()
    units = [UnitValues(True, a, "none", model="canny_edges"),
             UnitValues(True, b, "none", model="scribble_net", weight=0.8, start=0.2, control_mode="controlnet",
                        resize_mode="just_resize"),
             UnitValues(False, a)]
    out = run_generation(holder, tmp_path, "txt2img", _settings(batch_count=2), units)
    assert out.seeds == [5, 6] and len(out.images) == 2 and out.seed == 5
    assert out.status == "Done: 2 image(s), 6 steps." and len(out.maps) == 2
    req = GenerationRequest(prompt="a box", added_prompt="", negative_prompt="", width=64, height=64, steps=3,
                            guidance_scale=7.0, seed=6, sampler="DDIM", controls=[
                                ControlSpec(a, "canny_edges", detect_resolution=512),
                                ControlSpec(b, "scribble_net", detect_resolution=512, strength=0.8, start=0.2,
                                            control_mode="controlnet", resize_mode="just_resize")])
    ref = generate(models, req)
    got = np.asarray(Image.open(out.images[1]).convert("RGB"))  # the second batch continues the seeds
    assert np.array_equal(got, ref.images[0])
    rec = json.loads(Image.open(out.images[0]).info["ctrlnet"])
    assert rec["request"]["seed"] == 5 and rec["request"]["controls"][1]["control_mode"] == "controlnet"
    assert "ControlNet 1: \"Module: none, Model: scribble_net, Weight: 0.8" in out.info and "Seed: 5" in out.info
    # the txt2img unit's hires-fix option reaches the unit
    low = UnitValues(True, a, "none", model="canny_edges", hr_option="low_res_only").spec(0)
    assert low.hr_option.value == "low_res_only" and UnitValues(True, a).spec(0).hr_option.value == "both"


def test_run_generation_errors_are_readable(holder, tmp_path):
    from ctrlnet.interfaces.webui import UnitValues, run_generation

    with pytest.raises(gr.Error, match="steps=0 is out of range"):
        run_generation(holder, tmp_path, "txt2img", _settings(steps=0), [])
    with pytest.raises(gr.Error, match="unit 2 is enabled but has no image"):
        run_generation(holder, tmp_path, "txt2img", _settings(), [UnitValues(), UnitValues(True)])
    with pytest.raises(gr.Error, match="Add the image to start from"):
        run_generation(holder, tmp_path, "img2img", _settings(), [])
    with pytest.raises(gr.Error, match="Paint the area to repaint"):
        run_generation(holder, tmp_path, "inpaint", _settings(), [], init=_photo())
    with pytest.raises(gr.Error, match="unknown sampler 'Nope'"):
        run_generation(holder, tmp_path, "txt2img", _settings(sampler="Nope"), [])
    bad = tmp_path / "notes.png"
    bad.write_text("these are my notes, not a picture")
    with pytest.raises(gr.Error) as e:
        run_generation(holder, tmp_path, "img2img", _settings(), [], init=str(bad))
    msg = e.value.message
    assert "init image is not a usable image: notes.png (33 bytes) looks like a text file" in msg
    assert str(tmp_path) not in msg


def test_interrupt_stops_at_the_next_step_and_keeps_finished_batches(holder, tmp_path):
    from ctrlnet.interfaces.webui import run_generation
    from ctrlnet.interfaces.webui.runs import Runs

    runs = Runs()
    flag = runs.start("s1")
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 6:  # the Interrupt button, pressed during step 6 (the second batch's second step)
            assert runs.interrupt("s1")

    out = run_generation(holder, tmp_path, "txt2img", _settings(steps=4, batch_count=5), [], cancel=flag.is_set,
                         progress=progress)
    runs.finish("s1", flag)
    assert seen[-1] == (6, 20) and out.status.startswith("Interrupted after 6 of 20 steps")
    # the finished batch is saved; the interrupted one is shown as it stood, unsaved
    assert len(out.images) == 2 and isinstance(out.images[0], str) and isinstance(out.images[1], np.ndarray)
    assert out.seeds == [5, 6] and out.status.endswith("The last 1 show the unfinished batch (not saved).")
    assert len(list(tmp_path.rglob("*.png"))) == 1
    assert not runs.interrupt("s1") and runs.running() == 0
    fresh = runs.start("s1")  # an earlier Interrupt does not stop the next run
    assert not fresh.is_set()


def vae_round_trip(models, image: np.ndarray) -> np.ndarray:
    """What img2img keeps of an image at strength -> 0 (the tiny model's VAE is random, so this is
    far from the image itself)."""
    import torch

    from ctrlnet.generation.latents import decode_images, encode_images

    with torch.no_grad():
        return decode_images(models, encode_images(models, [image]))[0]


def test_img2img_and_inpaint_runs(models, holder, tmp_path):
    from ctrlnet.interfaces.webui import run_generation

    init = _photo()
    kept = vae_round_trip(models, init).astype(int)
    diffs = []
    for strength in (0.3, 0.9):
        out = run_generation(holder, tmp_path, "img2img", _settings(denoising_strength=strength, steps=10), [],
                             init=init)
        img = np.asarray(Image.open(out.images[0]).convert("RGB")).astype(int)
        diffs.append(np.abs(img - kept).mean())
    # (measured 37.5 < 41.8 on this random model; the browser test checks it on the trained demo model)
    assert diffs[0] < diffs[1]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = run_generation(holder, tmp_path, "inpaint", _settings(denoising_strength=1.0), [], init=init, mask=mask)
    img = np.asarray(Image.open(out.images[0]).convert("RGB")).astype(int)
    assert np.abs(img - init)[mask == 0].max() <= 1 and np.abs(img - init)[mask > 0].mean() > 10


def test_mask_from_the_editor_value(tmp_path):
    from ctrlnet.interfaces.webui.generate_tab import mask_from_editor

    Image.fromarray(_photo()).save(tmp_path / "bg.png")
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[10:20, 30:50] = (255, 255, 255, 255)  # a brush stroke: opaque where painted
    Image.fromarray(layer).save(tmp_path / "layer.png")
    empty = np.zeros((64, 64, 4), np.uint8)
    Image.fromarray(empty).save(tmp_path / "empty.png")
    image, mask = mask_from_editor({"background": str(tmp_path / "bg.png"),
                                    "layers": [str(tmp_path / "layer.png"), str(tmp_path / "empty.png")],
                                    "composite": None})
    assert np.array_equal(image, _photo())
    want = np.zeros((64, 64), np.uint8)
    want[10:20, 30:50] = 255
    assert np.array_equal(mask, want)
    assert mask_from_editor({"background": str(tmp_path / "bg.png"), "layers": [str(tmp_path / "empty.png")]})[1] is None


def test_preview_is_the_annotator_output_and_missing_weights_are_explained():
    from ctrlnet.annotators import run_annotator
    from ctrlnet.annotators.availability import missing_weights
    from ctrlnet.image import resize_image
    from ctrlnet.interfaces.webui import UnitValues, preview_map

    img = _photo(128, 192)
    got = preview_map(UnitValues(image=img, annotator="canny", params={"low_threshold": 50},
                                 detect_resolution=128), (64, 64))
    want = run_annotator("canny", resize_image(img, 128), low_threshold=50)
    assert got.shape == (128, 192, 3) and np.array_equal(got[:, :, 0], want.reshape(want.shape[:2] + (-1,))[:, :, 0])
    # pixel perfect: the resolution that maps the image 1:1 onto a 64x64 crop (short side 64)
    pp = preview_map(UnitValues(image=img, annotator="canny", pixel_perfect=True), (64, 64))
    assert pp.shape[:2] == (64, 128)
    with pytest.raises(gr.Error, match="Pick a preprocessor"):
        preview_map(UnitValues(image=img), (64, 64))
    with pytest.raises(gr.Error, match="low_thresh"):
        preview_map(UnitValues(image=img, annotator="canny", params={"low_thresh": 1}), (64, 64))
    if missing_weights("hed"):
        with pytest.raises(gr.Error) as e:
            preview_map(UnitValues(image=img, annotator="hed"), (64, 64))
        msg = e.value.message
        assert "ControlNetHED.pth" in msg and "https://huggingface.co/lllyasviel/Annotators/resolve/main/" in msg
        assert "$CTRLNET_ANNOTATOR_DIR" in msg and "<" not in msg and "/root" not in msg


def test_messages_hide_server_paths():
    from ctrlnet.annotators.weights import MissingWeightsError
    from ctrlnet.interfaces.webui.messages import error, scrub

    text = scrub("no image file at /srv/ctrlnet/uploads/abc/photo.png; see https://example.org/a/b, pass x=<folder>")
    assert text == "no image file at photo.png; see https://example.org/a/b, pass x=‹folder›"
    e = error(MissingWeightsError("annotator weights file 'x.pth' not found. Searched: /home/u/w (cache)."))
    assert e.message == "Missing weights: annotator weights file 'x.pth' not found. Searched: w (cache)."


def test_infotext_parsing_reads_a1111_and_our_own():
    from ctrlnet.generation.infotext import parse_parameters
    from ctrlnet.interfaces.request_io import request_from_dict
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, GenerationResult

    text = ('a cat, (fluffy:1.2)\nsitting\nNegative prompt: blurry, ugly\n'
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, '
            'Model hash: abc123, Model: v1-5, Denoising strength: 0.55, Clip skip: 2, '
            'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.9, '
            'Resize Mode: Resize and Fill, Low Vram: False, Processor Res: 512, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: True, '
            'Control Mode: My prompt is more important, Hr Option: Low res only", Face restoration: CodeFormer, '
            'Version: v1.9.0')
    d, notes = parse_parameters(text)
    assert d["prompt"] == "a cat, (fluffy:1.2)\nsitting" and d["negative_prompt"] == "blurry, ugly"
    assert (d["steps"], d["sampler"], d["schedule"], d["guidance_scale"], d["seed"]) == (28, "DPM++ 2M", "Karras",
                                                                                          6.5, 1234)
    assert (d["width"], d["height"], d["denoising_strength"], d["clip_skip"]) == (512, 768, 0.55, 2)
    assert d["controls"] == [{"annotator": "canny", "model": "control_v11p_sd15_canny", "strength": 0.9,
                              "resize_mode": "resize_and_fill", "detect_resolution": 512, "start": 0.1, "end": 0.8,
                              "pixel_perfect": True, "control_mode": "prompt", "hr_option": "low_res_only"}]
    assert notes == ["Face restoration has no equivalent here and is ignored"]
    assert request_from_dict(d).controls[0].pixel_perfect  # what the parser gives, the request reader takes
    # our own writer's text reads back to the same settings
    req = GenerationRequest(prompt="x", added_prompt="", negative_prompt="n", width=64, height=96, steps=7,
                            sampler="euler_a", schedule="karras", guidance_scale=4.0, seed=99,
                            controls=[ControlSpec(model="m", annotator="canny", strength=0.5, end=0.5,
                                                  control_mode="controlnet", resize_mode="just_resize",
                                                  hr_option="high_res_only")])
    res = GenerationResult([np.zeros((96, 64, 3), np.uint8)], [], 99, req)
    back, notes = parse_parameters(res.parameters_text("demo"))
    r = request_from_dict(back)
    assert notes == [] and (r.width, r.height, r.steps, r.seed, r.guidance_scale) == (64, 96, 7, 99, 4.0)
    from ctrlnet.sampling.names import resolve_sampler

    assert resolve_sampler(r.sampler, r.schedule) == ("euler_a", "karras")
    c = r.controls[0]
    assert (c.model, c.annotator, c.strength, c.end, c.control_mode.value, c.resize_mode.value, c.hr_option.value) == (
        "m", "canny", 0.5, 0.5, "controlnet", "just_resize", "high_res_only")
    with pytest.raises(ValueError, match="no settings line"):
        parse_parameters("just a prompt")
    with pytest.raises(ValueError, match="Seed: 'x'"):
        parse_parameters("p\nSteps: 2, Seed: x")


def test_png_info_prefers_the_record_and_checks_pasted_text(holder, tmp_path):
    from ctrlnet.interfaces.webui import UnitValues, run_generation
    from ctrlnet.interfaces.webui.png_info import read_png_info, settings_from

    out = run_generation(holder, tmp_path, "txt2img", _settings(seed=77, sampler="Euler a", schedule="Karras"),
                         [UnitValues(True, _photo(), "canny", {"low_threshold": 30}, "canny_edges",
                                     control_mode="prompt")])
    text, record = read_png_info(out.images[0])
    assert "Seed: 77" in text and record
    fields, notes = settings_from(text, record, text)
    from ctrlnet.sampling.names import resolve_sampler

    assert notes == [] and fields["seed"] == 77
    assert resolve_sampler(fields["sampler"], fields["schedule"]) == ("euler_a", "karras")
    assert fields["controls"][0]["annotator_params"] == {"low_threshold": 30}
    assert fields["controls"][0]["control_mode"] == "prompt"
    edited = text.replace("Seed: 77", "Seed: 78")
    fields, _ = settings_from(edited, record, text)  # edited text wins over the record
    assert fields["seed"] == 78 and fields["controls"][0]["annotator"] == "canny"
    with pytest.raises(gr.Error, match="steps"):
        settings_from("p\nSteps: 0", "", "")
    (tmp_path / "x.png").write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(gr.Error, match="looks like a PDF document"):
        read_png_info(str(tmp_path / "x.png"))


def test_auth_file(tmp_path):
    from ctrlnet.interfaces.webui import read_auth_file

    f = tmp_path / "users"
    f.write_text("# shared box\nana:s3cret:with:colons\n\nbo : pw\n")
    assert read_auth_file(f) == [("ana", "s3cret:with:colons"), ("bo", " pw")]
    f.write_text("ana:ok\nbo-has-no-password\n")
    with pytest.raises(ValueError, match="line 2: expected user:password"):
        read_auth_file(f)


def test_run_lineart_and_colorize(models, colorizer, tmp_path):
    from ctrlnet.colorize.lab import lightness
    from ctrlnet.colorize.synthetic import synthetic_clip
    from ctrlnet.interfaces.webui import ModelHolder, as_loaded, run_colorize, run_lineart
    from ctrlnet.interfaces.webui.colorize_tab import colorizer_loader

    lines = np.full((96, 64, 3), 255, np.uint8)
    lines[40:44] = 0
    files, maps, seed = run_lineart(ModelHolder(as_loaded(models), None), tmp_path, lines,
                                    {"prompt": "x", "annotator": "invert", "controlnet": "scribble_net",
                                     "resolution": 64, "steps": 2, "guidance_scale": 5.0, "seed": 3, "added_prompt": ""})
    img = np.asarray(Image.open(files[0]))
    assert seed == 3 and img.shape == (128, 64, 3)  # short side 64, sides rounded to 64 as the original apps
    rows = maps[0][:, :, 0].mean(axis=1)  # the inverted line (rows 40-44 of 96 -> 53-59 of 128): white on black
    assert 52 <= int(np.argmax(rows)) <= 60 and rows.max() > 200 and rows[:40].max() < 10

    holder = ModelHolder(as_loaded(colorizer), colorizer_loader)
    ref, target = synthetic_clip(2, 64, seed=5)
    opts = {"steps": 1, "strength": 1.0, "seed": -1, "keep_luminance": True}
    image, path, seed = run_colorize(holder, tmp_path, target, ref, opts)
    assert seed >= 0 and image.shape == target.shape
    assert np.abs(lightness(image).astype(int) - lightness(target).astype(int)).max() <= 1
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    with pytest.raises(gr.Error, match="colour reference"):
        run_colorize(holder, tmp_path, target, None, opts)


def test_scan_models_dir(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ctrlnet.interfaces.webui import scan_models_dir

    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "base.safetensors"))
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(1)}, str(tmp_path / "edges.safetensors"))
    (tmp_path / "control_v11p_sd15_canny.pth").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    bases, nets = scan_models_dir(tmp_path)
    assert [Path(b).name for b in bases] == ["base.safetensors"]
    assert sorted(Path(n).name for n in nets) == ["control_v11p_sd15_canny.pth", "edges.safetensors"]


def test_login_from_the_auth_file(models, tmp_path):
    import socket

    import httpx

    from ctrlnet.interfaces.webui import build_app, launch

    users = tmp_path / "users"
    users.write_text("ana:s3cret\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(models, outputs_dir=tmp_path, units=1)
    launch(app, port=port, auth_file=users, outputs_dir=tmp_path, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/config").status_code == 401
            assert c.post("/login", data={"username": "ana", "password": "wrong"}).status_code == 400
            assert c.post("/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
            assert c.get("/config").status_code == 200
    finally:
        app.close()


def test_the_preset_menu_fills_the_sampler_menus_with_the_preset():
    from ctrlnet.generation.presets import PRESETS, apply_preset
    from ctrlnet.interfaces.webui.generate_tab import build_requests, preset_menu_values
    from ctrlnet.sampling.names import resolve_sampler

    for name in PRESETS:
        sampler, schedule, steps = preset_menu_values(name)
        req = build_requests("txt2img", _settings(sampler=sampler, schedule=schedule, steps=steps), [])
        want = apply_preset({"sampler": None, "schedule": None, "steps": None}, name)  # what the CLI and API take
        assert resolve_sampler(req.sampler, req.schedule) == resolve_sampler(want["sampler"], want["schedule"])
        assert req.steps == want["steps"]
    assert preset_menu_values("fast")[0] == "UniPC order 1"
    with pytest.raises(ValueError, match="unknown preset"):
        preset_menu_values("slowest")
