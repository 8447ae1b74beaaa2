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
from serve_process import free_port, serve_process  # noqa: E402

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


@pytest.mark.parametrize("value,opt", [(0, "both"), (1, "low_res_only"), (2, "high_res_only"), ("Both", "both"),
                                       ("Low res only", "low_res_only"), ("High res only", "high_res_only")])
def test_hr_options_by_int_and_name(value, opt):
    t = _t2i([_unit(hr_option=value)], enable_hr=True, hr_scale=2)
    assert t.request.controls[0].hr_option.value == opt and not any("hr_option" in k for k in t.ignored)


def test_sides_not_a_multiple_of_8_are_floored_as_a1111s_latents_make_them():
    t = _t2i([], width=130, height=100)
    assert (t.request.width, t.request.height) == (128, 96)
    assert "128 px" in t.ignored["width"] and "96 px" in t.ignored["height"]
    assert "width" not in _t2i([], width=128).ignored


def test_bad_hr_option_is_refused():
    with pytest.raises(ValueError, match="hr_option='Sometimes' is unknown; choose one of: both, low res only"):
        _t2i([_unit(hr_option="Sometimes")])


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
    for body in ({"prompt": "x"}, {"prompt": "x", "seed": None, "steps": None, "width": None, "cfg_scale": None}):
        d = translate(body, "txt2img", CAT, _dec).request  # A1111's defaults, not the model's
        assert (d.width, d.height, d.steps, d.guidance_scale, d.sampler, d.seed) == (512, 512, 50, 7.0, "Euler", -1)
    with pytest.raises(ValueError, match="3 ControlNet units; the limit is 2"):
        translate({"alwayson_scripts": {"controlnet": {"args": [{"image": "bad"}] * 3}}}, "txt2img", CAT, _dec,
                  max_controls=2)


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


# ---- a real server driven by the unmodified webuiapi client -------------------------------------

import threading  # noqa: E402
import time  # noqa: E402

TOKEN = "a1111-test-token-0123456789"


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = free_port()
    with serve_process(["--max-steps", "1000", "--max-resolution", "512", "--max-queue", "4"], token=TOKEN,
                       port=port) as (url, _):
        yield port, url


@pytest.fixture(scope="module")
def api(server):
    webuiapi = pytest.importorskip("webuiapi")
    return webuiapi.WebUIApi(host="127.0.0.1", port=server[0], username="anyone", password=TOKEN)


def _picture(h=72, w=96):
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[(x - w // 2) ** 2 + (y - h // 2) ** 2 < (h // 3) ** 2] = 255
    img[..., 1] = (x * 2).astype(np.uint8)
    return Image.fromarray(img)


def _v1(url, body):
    import httpx

    r = httpx.post(url + "/v1/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return _png_text(r.json()["images"][0])[0]


def _b64png(pil) -> str:
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_webuiapi_txt2img_with_a_unit_equals_v1_generate(api, server):
    import webuiapi

    pic = _picture()
    unit = webuiapi.ControlNetUnit(image=pic, module="canny", model="edges", processor_res=64, threshold_a=50,
                                   threshold_b=150, control_mode=1, resize_mode="Crop and Resize", weight=0.8)
    res = api.txt2img(prompt="a red ball", negative_prompt="blurry", seed=1234, steps=4, cfg_scale=6.5,
                      width=64, height=64, sampler_name="Euler a", controlnet_units=[unit], alwayson_scripts={},
                      restore_faces=True)
    assert len(res.images) == 2  # the image, then the canny map (as sd-webui-controlnet appends it)
    assert res.images[0].size == (64, 64) and "Seed: 1234" in res.images[0].info["parameters"]
    assert res.info["all_seeds"] == [1234] and res.info["ctrlnet_ignored"]["restore_faces"]
    assert res.parameters["prompt"] == "a red ball"
    body = {"prompt": "a red ball", "added_prompt": "", "negative_prompt": "blurry", "seed": 1234, "steps": 4,
            "guidance_scale": 6.5, "width": 64, "height": 64, "sampler": "Euler a", "eta": 1.0,
            "controls": [{"image": _b64png(pic), "model": "edges", "annotator": "canny", "strength": 0.8,
                          "annotator_params": {"low_threshold": 50, "high_threshold": 150},
                          "detect_resolution": 64, "control_mode": "prompt", "resize_mode": "crop_and_resize"}]}
    ours = _v1(server[1], body)
    theirs = np.asarray(res.images[0].convert("RGB"))
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0
    assert theirs.std() > 1  # a picture, not a flat field
    unit.control_mode = "Balanced"  # the unit reaches the model: another mode, another image
    other = api.txt2img(prompt="a red ball", negative_prompt="blurry", seed=1234, steps=4, cfg_scale=6.5,
                        width=64, height=64, sampler_name="Euler a", controlnet_units=[unit], alwayson_scripts={})
    assert np.abs(np.asarray(other.images[0].convert("RGB")).astype(int) - theirs.astype(int)).max() > 0
    cmap = np.asarray(res.images[1].convert("RGB"))
    assert cmap.shape == (64, 64, 3) and set(np.unique(cmap)) <= {0, 255} and cmap.max() == 255


def test_webuiapi_img2img_with_a_unit_on_the_init_image_equals_v1_generate(api, server):
    import webuiapi

    pic = _picture()
    unit = webuiapi.ControlNetUnit(module="invert", model="edges", processor_res=64, control_mode=2, resize_mode=0)
    res = api.img2img(images=[pic], prompt="a green ball", seed=77, steps=6, cfg_scale=5.0, width=64, height=64,
                      denoising_strength=0.5, sampler_name="DDIM", eta=0.0, controlnet_units=[unit],
                      alwayson_scripts={})
    assert len(res.images) == 2 and res.images[0].size == (64, 64)
    assert "image_cfg_scale" in res.info["ctrlnet_ignored"]
    from ctrlnet.generation.preprocess import fit_image

    init = fit_image(np.asarray(pic), (64, 64), "just_resize")  # A1111 resize_mode 0, as the route did
    from PIL import Image

    body = {"prompt": "a green ball", "added_prompt": "", "negative_prompt": "", "seed": 77, "steps": 6,
            "guidance_scale": 5.0, "width": 64, "height": 64, "sampler": "DDIM", "eta": 0.0,
            "denoising_strength": 0.5, "init_image": _b64png(Image.fromarray(init)),
            "controls": [{"model": "edges", "annotator": "invert", "detect_resolution": 64,
                          "control_mode": "controlnet", "resize_mode": "just_resize"}]}
    ours = _v1(server[1], body)
    assert np.abs(ours.astype(int) - np.asarray(res.images[0].convert("RGB")).astype(int)).max() == 0


def test_webuiapi_detect_lists_and_info_routes(api, server):
    pic = _picture()
    det = api.controlnet_detect([pic], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    assert len(det.images) == 1 and det.info == "Success"
    from ctrlnet.annotators import run_annotator
    from ctrlnet.image import resize_image

    want = run_annotator("canny", resize_image(np.asarray(pic), 64), low_threshold=50, high_threshold=150)
    got = np.asarray(det.images[0].convert("RGB"))
    assert np.array_equal(got[..., 0], want if want.ndim == 2 else want[..., 0])
    assert api.controlnet_model_list() == [f"edges [{_hash('random:edges')}]"]
    mods = api.controlnet_module_list()
    assert "canny" in mods and "hed" in mods and "none" in mods
    assert api.controlnet_version() == 3
    assert api.util_get_current_model().startswith("random:tiny-sd1 [")
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    models = api.get_sd_models()
    assert models[0]["filename"] == "random:tiny-sd1" and "/" not in json.dumps(models)
    import httpx

    url = server[1]
    aliased = httpx.get(url + "/controlnet/module_list", params={"alias_names": True},
                        headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert "softedge_hed" in aliased["module_list"]
    assert aliased["module_detail"]["canny"]["sliders"][1]["name"] == "Canny Low Threshold"
    assert httpx.get(url + "/sdapi/v1/options").status_code == 401  # same auth as /v1


def _hash(label):
    from ctrlnet.interfaces.api.a1111 import short_hash

    return short_hash(label)


def test_a1111_errors_have_its_shape_and_no_paths(server):
    import httpx

    h = {"Authorization": f"Bearer {TOKEN}"}
    url = server[1]
    r = httpx.post(url + "/sdapi/v1/txt2img", headers=h, json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                   "alwayson_scripts": {"controlnet": {"args": [{"image": "abc", "module": "normal_bae",
                                                                 "model": "edges"}]}}})
    assert r.status_code == 422 and set(r.json()) == {"error", "detail", "body", "errors"}
    assert "normal_bae" in r.json()["detail"]
    r = httpx.post(url + "/sdapi/v1/img2img", headers=h, json={"init_images": ["data:image/png;base64,@@@"]})
    assert r.status_code == 400 and "init_images[0]" in r.json()["detail"]
    # sd-webui-controlnet would read a unit image given as a server path; here it is only ever base64
    r = httpx.post(url + "/sdapi/v1/txt2img", headers=h, json={"steps": 2, "width": 64, "height": 64,
                   "alwayson_scripts": {"ControlNet": {"args": [{"image": "/etc/hostname", "model": "edges"}]}}})
    assert r.status_code == 400 and "controlnet.args[0].image" in r.json()["detail"]
    assert "/etc" not in r.text
    r = httpx.post(url + "/sdapi/v1/txt2img", headers=h, json={"steps": 2, "width": 1024, "height": 64})
    assert r.status_code == 422 and "width" in r.json()["detail"]


def test_progress_during_a_run_and_interrupt(api, server):
    import httpx
    from PIL import Image

    url = server[1]
    h = {"Authorization": f"Bearer {TOKEN}"}
    out = {}

    def long_run():
        out["res"] = api.txt2img(prompt="slow", seed=5, steps=1000, width=128, height=128, sampler_name="Euler",
                                 alwayson_scripts={})

    t = threading.Thread(target=long_run)
    t.start()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = httpx.get(url + "/sdapi/v1/progress", headers=h).json()
        if p["state"]["job"] == "txt2img":
            seen.append(p["state"]["sampling_step"])
            if len(set(seen)) >= 3 and seen[-1] > 0:
                break
        time.sleep(0.05)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the step advances while we watch
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 1000
    # the live preview: the last step's x0 estimate at latent resolution (128 px / 8), as A1111's
    # "Approx cheap"; skip_current_image leaves it out as in A1111
    preview = api.get_progress()["current_image"]
    assert Image.open(io.BytesIO(base64.b64decode(preview))).size == (16, 16)
    skipped = httpx.get(url + "/sdapi/v1/progress", headers=h, params={"skip_current_image": "true"}).json()
    assert skipped["current_image"] is None and skipped["state"]["job"] == "txt2img"
    assert api.interrupt() == {}
    t.join(60)
    assert not t.is_alive()
    res = out["res"]
    # A1111 answers an interrupted run with the image so far (its last x0 estimate)
    assert len(res.images) == 1 and res.images[0].size == (128, 128)
    assert res.info["ctrlnet_interrupted"] is True and 0 < res.info["ctrlnet_interrupted_at_step"] < 1000
    assert res.info["all_seeds"] == [5] and "Seed: 5" in res.info["infotexts"][0]
    assert httpx.get(url + "/sdapi/v1/progress", headers=h).json()["state"]["job_count"] == 0
    nxt = api.txt2img(prompt="after", seed=6, steps=2, width=64, height=64, alwayson_scripts={})
    assert len(nxt.images) == 1 and nxt.info["all_seeds"] == [6]


def test_webuiapi_inpaint_with_an_inpaint_unit_keeps_the_unmasked_part(api):
    import webuiapi
    from PIL import Image

    from ctrlnet.generation.preprocess import fit_image

    pic = _picture(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    unit = webuiapi.ControlNetUnit(module="inpaint_only", model="edges", control_mode=0)
    res = api.img2img(images=[pic], mask_image=Image.fromarray(mask), inpainting_fill=2, inpaint_full_res=False,
                      mask_blur=0, prompt="fill", seed=3, steps=4, width=64, height=64, denoising_strength=1.0,
                      controlnet_units=[unit], alwayson_scripts={})
    out = np.asarray(res.images[0].convert("RGB")).astype(int)
    init = fit_image(np.asarray(pic), (64, 64)).astype(int)
    assert np.abs(out[:, 40:] - init[:, 40:]).max() == 0  # outside the mask: the picture itself
    assert np.abs(out[:, :24] - init[:, :24]).max() > 20  # inside: repainted from noise
    assert res.info["ctrlnet_ignored"] == {"image_cfg_scale": res.info["ctrlnet_ignored"]["image_cfg_scale"]}


def test_auth_bearer_or_basic_with_the_token(server):
    import httpx

    url = server[1] + "/sdapi/v1/progress"
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url, auth=("someone", TOKEN)).status_code == 200
    assert httpx.get(url, auth=("someone", "wrong-password-0123456789")).status_code == 401
    assert httpx.get(url, auth=(TOKEN, "")).status_code == 401  # the token is the password, not the user


def test_webuiapi_hires_fix_and_model_selection(api, server):
    import httpx

    res = api.txt2img(prompt="big", seed=9, steps=3, width=64, height=64, enable_hr=True, hr_scale=2,
                      hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent", alwayson_scripts={})
    # A1111's info and infotext keep the first pass's size (p.width/p.height); the upscale is separate
    assert res.images[0].size == (128, 128) and res.info["width"] == 64
    assert "Size: 64x64" in res.images[0].info["parameters"]
    assert "Hires upscale: 2.0" in res.images[0].info["parameters"]
    api.util_set_model("random:tiny-sd1")  # POST /sdapi/v1/options with the loaded model: accepted
    r = httpx.post(server[1] + "/sdapi/v1/options", auth=("u", TOKEN), json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert r.status_code == 422 and "random:tiny-sd1" in r.json()["detail"]
    r = httpx.post(server[1] + "/sdapi/v1/options", auth=("u", TOKEN), json={"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 200 and "CLIP_stop_at_last_layers" in r.json()["ctrlnet_ignored"]
