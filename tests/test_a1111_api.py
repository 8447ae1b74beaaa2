"""A1111-compatible routes: the payload translation (pure), and a real ``ctrlnet serve`` process
driven by the unmodified ``webuiapi`` client from PyPI."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from ctrlnet.generation.request import ControlMode, InpaintFill, ResizeMode, Upscaler
from ctrlnet.interfaces.a1111_modules import MODULES, resolve_module
from ctrlnet.interfaces.api.a1111_payload import Catalog, response, translate

CAT = Catalog("tiny-sd1 [abcd1234]", {"edges": "edges [12345678]", "depth": "control_depth [0badf00d]"})
PIC = (np.arange(48 * 80 * 3) % 251).astype(np.uint8).reshape(48, 80, 3)


def _dec(s, where):
    """Test decoder: "pic" -> PIC, "mask" -> a left-half mask; anything else names itself in an error."""
    if s == "pic":
        return PIC.copy()
    if s == "mask":
        m = np.zeros((48, 80), np.uint8)
        m[:, :40] = 255
        return m
    raise ValueError(f"{where}: undecodable {s!r}")


def _unit(**kw):
    return {"enabled": True, "image": "pic", "module": "none", "model": "edges", **kw}


def _t2i(units=(), **kw):
    body = {"prompt": "a house", "width": 64, "height": 64, "steps": 4,
            "alwayson_scripts": {"controlnet": {"args": list(units)}}, **kw}
    return translate(body, "txt2img", CAT, _dec)


def _i2i(units=(), **kw):
    body = {"prompt": "a house", "width": 64, "height": 64, "steps": 4, "init_images": ["pic"],
            "alwayson_scripts": {"controlnet": {"args": list(units)}}, **kw}
    return translate(body, "img2img", CAT, _dec)


@pytest.mark.parametrize("value,mode", [(0, "balanced"), (1, "prompt"), (2, "controlnet"), ("Balanced", "balanced"),
                                        ("My prompt is more important", "prompt"),
                                        ("ControlNet is more important", "controlnet")])
def test_control_modes_by_int_and_name(value, mode):
    c = _t2i([_unit(control_mode=value)]).request.controls[0]
    assert c.control_mode is ControlMode(mode)


def test_legacy_guessmode_is_controlnet_mode_and_bad_mode_is_refused():
    assert _t2i([_unit(guessmode=True)]).request.controls[0].control_mode is ControlMode.CONTROLNET
    with pytest.raises(ValueError, match="control_mode"):
        _t2i([_unit(control_mode=3)])


@pytest.mark.parametrize("value,mode", [(0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_fill"),
                                        (3, "just_resize"), ("Just Resize", "just_resize"),
                                        ("Crop and Resize", "crop_and_resize"), ("Resize and Fill", "resize_and_fill"),
                                        ("Inner Fit (Scale to Fit)", "crop_and_resize"),
                                        ("Envelope (Outer Fit)", "resize_and_fill")])
def test_unit_resize_modes_by_int_and_name(value, mode):
    assert _t2i([_unit(resize_mode=value)]).request.controls[0].resize_mode is ResizeMode(mode)


def test_unit_defaults_follow_sd_webui_controlnet():
    c = _t2i([{"image": "pic", "model": "edges"}]).request.controls[0]  # no "enabled": on
    assert (c.annotator, c.resize_mode, c.control_mode, c.strength, c.start, c.end) == \
        (None, ResizeMode.CROP_AND_RESIZE, ControlMode.BALANCED, 1.0, 0.0, 1.0)
    assert _t2i([_unit(enabled=False), False]).request.controls == []


@pytest.mark.parametrize("module,annotator,params", [
    ("canny", "canny", {"low_threshold": 100, "high_threshold": 200}), ("depth", "depth", {}),
    ("depth_midas", "depth", {}), ("openpose", "openpose", {}), ("lineart", "lineart", {}),
    ("lineart_realistic", "lineart", {}), ("lineart_anime", "lineart_anime", {}),
    ("softedge_hed", "hed", {"safe": False}), ("hed_safe", "hed", {"safe": True}),
    ("softedge_pidisafe", "softedge_pidinet", {"safe": True}), ("scribble_hed", "fake_scribble", {}),
    ("mlsd", "mlsd", {"thr_v": 0.1, "thr_d": 0.1}), ("normal_midas", "normal", {"bg_th": 0.4}),
    ("seg_ofade20k", "seg", {}), ("invert (from white bg & black line)", "invert", {}), ("invert", "invert", {}),
    ("tile_resample", "tile", {"down_sampling_rate": 1.0}), ("none", None, {}), ("SoftEdge_HED", "hed", {"safe": False})])
def test_module_names_and_aliases_map_to_annotators(module, annotator, params):
    c = _t2i([_unit(module=module)]).request.controls[0]
    assert c.annotator == annotator and c.annotator_params == params


@pytest.mark.parametrize("module,words", [("normal_bae", "no detector"), ("depth_zoe", "no detector"),
                                          ("reference_only", "no detector"), ("nonsense", "unknown")])
def test_modules_without_a_detector_are_refused_by_name(module, words):
    with pytest.raises(ValueError, match=words):
        _t2i([_unit(module=module)])


def test_every_module_resolves_to_a_registered_annotator():
    from ctrlnet.annotators import list_annotators

    for m in MODULES:
        assert resolve_module(m.name) is m and resolve_module(m.label) is m
        assert m.annotator is None or m.annotator in list_annotators()


@pytest.mark.parametrize("module,a,b,params", [
    ("canny", 64, 64, {"low_threshold": 64, "high_threshold": 64}),      # webuiapi's defaults, in range: used
    ("canny", -1, 300, {"low_threshold": 100, "high_threshold": 200}),   # out of range: the slider's default
    ("canny", 50.4, 180, {"low_threshold": 50, "high_threshold": 180}),  # integer slider
    ("mlsd", 0.5, 5.0, {"thr_v": 0.5, "thr_d": 5.0}), ("mlsd", 64, 64, {"thr_v": 0.1, "thr_d": 0.1}),
    ("normal_map", 0.2, 99, {"bg_th": 0.2}), ("recolor_luminance", 1.5, 0, {"gamma_correction": 1.5}),
    ("tile_resample", 2, 0, {"down_sampling_rate": 2.0}), ("depth", 3, 4, {})])
def test_thresholds_map_to_each_annotators_parameters(module, a, b, params):
    c = _t2i([_unit(module=module, threshold_a=a, threshold_b=b)]).request.controls[0]
    assert c.annotator_params == params


@pytest.mark.parametrize("res,pp,want", [(256, False, 256), (-1, False, 512), (5000, False, 512), (256, True, None)])
def test_processor_res_is_the_detect_resolution(res, pp, want):
    c = _t2i([_unit(module="canny", processor_res=res, pixel_perfect=pp)]).request.controls[0]
    assert c.detect_resolution == want and c.pixel_perfect is pp


def test_no_resolution_for_modules_without_one():
    assert _t2i([_unit(module="none", processor_res=300)]).request.controls[0].detect_resolution is None


@pytest.mark.parametrize("name,key", [("edges [12345678]", "edges"), ("edges", "edges"), ("EDGES", "edges"),
                                      ("control_depth", "depth"), ("control_depth [0badf00d]", "depth"),
                                      ("depth", "depth")])
def test_model_names_with_or_without_hash(name, key):
    assert _t2i([_unit(model=name)]).request.controls[0].model == key


@pytest.mark.parametrize("name", ["edges [ffffffff]", "control_v11p_sd15_canny [d14c016b]", "None", ""])
def test_unknown_models_are_refused_with_the_loaded_list(name):
    with pytest.raises(ValueError, match=r"edges \[12345678\]"):
        _t2i([_unit(model=name)])


def test_unit_fields_weight_guidance_and_legacy_aliases():
    c = _t2i([{"input_image": "pic", "model": "edges", "weight": 0.6, "guidance_start": 0.1,
               "guidance": 0.7, "lowvram": True}])
    u = c.request.controls[0]
    assert (u.strength, u.start, u.end) == (0.6, 0.1, 0.7)
    assert "controlnet.args[0].lowvram" in c.ignored
    im = _t2i([{"image": {"image": "pic", "mask": "mask"}, "model": "edges"}])
    assert np.array_equal(im.request.controls[0].image, PIC) and "controlnet.args[0].mask" in im.ignored
    with pytest.raises(ValueError, match="weight"):
        _t2i([_unit(weight=2.5)])


def test_request_fields():
    t = _t2i(prompt="p", negative_prompt="n", seed=7, steps=9, cfg_scale=5.5, batch_size=2, n_iter=3,
             sampler_name="DPM++ 2M", scheduler="Karras", override_settings={"CLIP_stop_at_last_layers": 2})
    r = t.request
    assert (r.prompt, r.added_prompt, r.negative_prompt, r.seed, r.steps, r.guidance_scale, r.num_images) == \
        ("p", "", "n", 7, 9, 5.5, 6)
    assert (r.sampler, r.schedule, r.clip_skip, r.width, r.height) == ("DPM++ 2M", "Karras", 2, 64, 64)
    assert t.ignored == {}
    d = translate({"prompt": "x"}, "txt2img", CAT, _dec).request  # A1111's defaults, not the model's
    assert (d.width, d.height, d.steps, d.guidance_scale, d.sampler, d.seed) == (512, 512, 50, 7.0, "Euler", -1)


def test_eta_goes_to_samplers_that_take_it_and_is_reported_otherwise():
    assert _t2i(sampler_name="Euler a", eta=0.5).request.eta == 0.5
    t = _t2i(sampler_name="Euler", eta=1.0)
    assert t.request.eta is None and "eta" in t.ignored


def test_fields_without_an_equivalent_are_named_with_a_reason():
    t = _t2i(restore_faces=True, tiling=True, styles=["s"], subseed=3, subseed_strength=0.5, s_churn=1.0,
             override_settings={"sd_model_checkpoint": "tiny-sd1", "some_setting": 1},
             alwayson_scripts={"ADetailer": {"args": [True, {}]}, "controlnet": {"args": []}})
    for k in ("restore_faces", "tiling", "styles", "subseed_strength", "s_churn", "override_settings.some_setting",
              "alwayson_scripts.ADetailer"):
        assert k in t.ignored and t.ignored[k], k
    quiet = _t2i(restore_faces=False, tiling=False, styles=[], subseed=3, subseed_strength=0,
                 alwayson_scripts={"ADetailer": {"args": [False]}})
    assert quiet.ignored == {}


@pytest.mark.parametrize("over,words", [({"script_name": "x/y/z plot"}, "script"),
                                        ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}},
                                         "tiny-sd1"),
                                        ({"override_settings": {"CLIP_stop_at_last_layers": 3}}, "1 or 2"),
                                        ({"sampler_name": "Nope"}, "unknown sampler"),
                                        ({"steps": "many"}, "steps"), ({"batch_size": 0}, "batch_size")])
def test_refused_fields(over, words):
    with pytest.raises(ValueError, match=words):
        _t2i(**over)


def test_txt2img_unit_needs_an_image_img2img_uses_the_init_image():
    with pytest.raises(ValueError, match="no image"):
        _t2i([_unit(image="")])
    assert _i2i([_unit(image="")]).request.controls[0].image is None


@pytest.mark.parametrize("fill,ours", [(0, "fill"), (1, "original"), (2, "latent_noise"), (3, "latent_nothing")])
def test_img2img_inpaint_fields(fill, ours):
    t = _i2i(mask="mask", inpainting_fill=fill, mask_blur=6, inpaint_full_res=True, inpaint_full_res_padding=16,
             denoising_strength=0.4)
    r = t.request
    assert r.inpaint_fill is InpaintFill(ours) and r.mask_blur == 6 and r.only_masked and r.only_masked_padding == 16
    assert r.denoising_strength == 0.4 and r.init_image.shape == PIC.shape  # only masked: the picture keeps its size


def test_img2img_init_image_fitted_with_resize_mode_and_mask_inverted():
    from ctrlnet.generation.preprocess import fit_image

    for mode, ours in ((0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_fill")):
        r = _i2i(resize_mode=mode).request
        assert np.array_equal(r.init_image, fit_image(PIC, (64, 64), ours)) and r.mask is None
    r = _i2i(mask="mask", inpaint_full_res=False, inpainting_mask_invert=1).request
    assert not r.only_masked and r.mask.shape[:2] == (64, 64)
    m = r.mask[..., 0] if r.mask.ndim == 3 else r.mask
    assert m[:, :28].max() == 0 and m[:, 36:].min() == 255  # left half was white: now black


def test_inpaint_unit_needs_img2img_with_a_mask():
    with pytest.raises(ValueError, match="inpaint"):
        _t2i([_unit(module="inpaint_only")])
    t = _i2i([_unit(module="inpaint_only", image="")], mask="mask")
    assert t.request.controls[0].annotator == "inpaint"


def test_hires_fields():
    r = _t2i(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, denoising_strength=0.55,
             hr_upscaler="Latent").request
    assert (r.hires_scale, r.hires_steps, r.hires_denoising_strength, r.hires_upscaler) == (1.5, 3, 0.55, Upscaler.LATENT)
    t = _t2i(enable_hr=True, hr_resize_x=128, hr_upscaler="R-ESRGAN 4x+")
    assert t.request.hires_scale == 2.0 and t.request.hires_upscaler is Upscaler.LANCZOS and "hr_upscaler" in t.ignored
    assert _t2i(enable_hr=False, hr_scale=4).request.hires_scale == 1.0
    with pytest.raises(ValueError, match="aspect"):
        _t2i(enable_hr=True, hr_resize_x=128, hr_resize_y=256)


def _png_text(b64: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB")), dict(im.info)


def _result(t, n=2):
    from ctrlnet.generation.result import GenerationResult

    imgs = [np.full((64, 64, 3), 10 * k, np.uint8) for k in range(n)]
    maps = [np.full((64, 64, 3), 200, np.uint8) for _ in t.request.controls]
    t.request.seed = 41
    return GenerationResult(imgs, maps, 41, t.request)


def test_response_shape_images_maps_and_info():
    from ctrlnet.interfaces.outputs import png_bytes

    def b64(im, chunks=None):
        return base64.b64encode(png_bytes(im, chunks)).decode()

    t = _t2i([_unit(), _unit(save_detected_map=False)], batch_size=2, restore_faces=True)
    out = response(_result(t), t, CAT, b64, version="x")
    assert len(out["images"]) == 3  # two images, one map (the second unit keeps none)
    img, text = _png_text(out["images"][1])
    assert img[0, 0, 0] == 10 and "Seed: 42" in text["parameters"] and "Steps: 4" in text["parameters"]
    assert _png_text(out["images"][2])[0][0, 0, 0] == 200
    info = json.loads(out["info"])
    assert info["all_seeds"] == [41, 42] and info["seed"] == 41 and info["infotexts"][1] == text["parameters"]
    for k in ("prompt", "all_prompts", "negative_prompt", "subseed", "sampler_name", "cfg_scale", "steps",
              "width", "height", "sd_model_name", "job_timestamp", "index_of_first_image", "styles"):
        assert k in info
    assert info["sd_model_hash"] == "abcd1234" and info["ctrlnet_ignored"]["restore_faces"]
    assert out["parameters"]["batch_size"] == 2
    none = _t2i([_unit()], send_images=False, override_settings={"control_net_no_detectmap": True})
    assert response(_result(none), none, CAT, b64)["images"] == []
    nomap = _t2i([_unit()], override_settings={"control_net_no_detectmap": True})
    assert len(response(_result(nomap, 1), nomap, CAT, b64)["images"]) == 1
    i2i = _i2i()
    assert response(_result(i2i, 1), i2i, CAT, b64)["parameters"]["init_images"] is None
