"""AUTOMATIC1111 + sd-webui-controlnet request bodies -> :class:`GenerationRequest`, and results back.

Pure translation (no web framework, no device): the routes in ``a1111.py`` decode the body, call
:func:`translate`, run the request through the shared job queue and call :func:`response`.

Field names and meanings follow A1111's ``StableDiffusionTxt2ImgProcessingAPI`` /
``StableDiffusionImg2ImgProcessingAPI`` (``modules/api/models.py``, generated from
``processing.py``) and sd-webui-controlnet's ``ControlNetUnit`` (``internal_controlnet/args.py``,
``scripts/enums.py``). Absent fields take A1111's defaults (512x512, 50 steps, CFG 7, "Euler"),
not the loaded model's: a client written for A1111 gets what it would get there.

Every field is honoured, or named in the response's ``info["ctrlnet_ignored"]`` with a reason, or
refused (ValueError -> 422) when ignoring it would silently give a different kind of picture
(another checkpoint, a script, a preprocessor we do not have). The table lives in README
("Using A1111 API clients"); the choices are commented where they are made below.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ctrlnet.generation.request import ControlMode, GenerationRequest, HiresOption, ResizeMode
from ctrlnet.interfaces.a1111_modules import A1111Module, resolve_module

# A1111's API defaults for fields a client leaves out (processing.py class defaults).
A1111_DEFAULTS = {"prompt": "", "negative_prompt": "", "seed": -1, "steps": 50, "cfg_scale": 7.0,
                  "width": 512, "height": 512, "batch_size": 1, "n_iter": 1, "sampler_name": None,
                  "sampler_index": "Euler", "denoising_strength": 0.75, "mask_blur": 4,
                  "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
                  "inpainting_mask_invert": 0, "resize_mode": 0, "enable_hr": False, "hr_scale": 2.0,
                  "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0}

CONTROL_MODES = {0: ControlMode.BALANCED, 1: ControlMode.PROMPT, 2: ControlMode.CONTROLNET,
                 "balanced": ControlMode.BALANCED, "my prompt is more important": ControlMode.PROMPT,
                 "controlnet is more important": ControlMode.CONTROLNET}
# ResizeMode.int_value() and the legacy labels (external_code.resize_mode_aliases); 3 is
# "Just Resize (Latent upscale)", which sd-webui-controlnet treats as Just Resize.
RESIZE_MODES = {0: ResizeMode.JUST_RESIZE, 1: ResizeMode.CROP_AND_RESIZE, 2: ResizeMode.RESIZE_AND_FILL,
                3: ResizeMode.JUST_RESIZE, "just resize": ResizeMode.JUST_RESIZE,
                "crop and resize": ResizeMode.CROP_AND_RESIZE, "resize and fill": ResizeMode.RESIZE_AND_FILL,
                "inner fit (scale to fit)": ResizeMode.CROP_AND_RESIZE,
                "scale to fit (inner fit)": ResizeMode.CROP_AND_RESIZE,
                "outer fit (shrink to fit)": ResizeMode.RESIZE_AND_FILL,
                "envelope (outer fit)": ResizeMode.RESIZE_AND_FILL,
                "just resize (latent upscale)": ResizeMode.JUST_RESIZE}
# sd-webui-controlnet's HiResFixOption: values, and the list index its API also accepts
HR_OPTIONS = {0: HiresOption.BOTH, 1: HiresOption.LOW_RES_ONLY, 2: HiresOption.HIGH_RES_ONLY,
              "both": HiresOption.BOTH, "low res only": HiresOption.LOW_RES_ONLY,
              "high res only": HiresOption.HIGH_RES_ONLY}
# A1111 "masked content" (inpainting_fill) 0..3
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")

# Fields that change nothing here, whatever their value (saving is the client's business here:
# this server keeps no files; the rest are bookkeeping).
_NO_EFFECT = {"do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
              "sampler_index", "send_images", "include_init_images", "script_args", "alwayson_scripts",
              "firstphase_width", "firstphase_height", "force_task_id", "infotext", "comments",
              "disable_extra_networks", "save_images", "user", "refiner_switch_at"}
# Settings in override_settings we honour or that do not touch the image.
_SETTINGS_NO_EFFECT = {"sd_vae": ("Automatic", "None", None), "samples_format": None, "save_images": None}


@dataclass
class Catalog:
    """What the server has loaded, named as A1111 names it: ``base_title`` ("name [hash8]"),
    ``controlnets`` our key -> title ("name [hash8]")."""

    base_title: str
    controlnets: dict[str, str] = field(default_factory=dict)

    def controlnet_key(self, name: str, where: str) -> str:
        """Our key for a model as clients name it: "name [hash]", "name", or our key (any case)."""
        want = name.strip()
        bare = want.split(" [", 1)[0].strip().lower()
        for key, title in self.controlnets.items():
            if want.lower() in (title.lower(), key.lower()) or (" [" not in want and bare == _bare(title)):
                return key
        raise ValueError(f"{where}={name!r} is not loaded; loaded: {', '.join(self.controlnets.values()) or 'none'}")

    def is_base(self, name: str) -> bool:
        n = name.strip().lower()
        return n in (self.base_title.lower(), _bare(self.base_title)) or n.split(" [", 1)[0] == _bare(self.base_title)


def _bare(title: str) -> str:
    return title.split(" [", 1)[0].strip().lower()


@dataclass
class Translated:
    """A request ready for ``generate()`` plus what the response needs: the ignored fields with
    reasons, whether control maps are appended, whether images are sent, the echo of the body."""

    request: GenerationRequest
    ignored: dict[str, str]
    append_maps: list[bool]
    send_images: bool
    echo: dict
    mode: str
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))


Decoder = Callable[[str, str], np.ndarray]  # (base64 string, field name) -> (H, W, C) uint8


def _num(d: dict, key: str, kind=float, lo=None, hi=None):
    v = d.get(key)
    if v is None:  # absent or null: A1111's default
        v = A1111_DEFAULTS.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key}={v!r} must be a number")
    if kind is int and float(v) != int(v):
        raise ValueError(f"{key}={v!r} must be a whole number")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{key}={v!r} is out of range: must be between {lo} and {hi}")
    return v


def _flag(d: dict, key: str, default=False) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    raise ValueError(f"{key}={v!r} must be true or false")


def _choice(table: dict, value, where: str):
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or not isinstance(key, (int, str)) or key not in table:
        names = [k for k in table if isinstance(k, str)]
        raise ValueError(f"{where}={value!r} is unknown; choose one of: {', '.join(names)} "
                         f"(or {', '.join(str(k) for k in table if isinstance(k, int))})")
    return table[key]


def _text(d: dict, key: str) -> str:
    v = d.get(key, A1111_DEFAULTS.get(key, ""))
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string")
    return v


def _settings(over, catalog: Catalog, ignored: dict) -> tuple[int, bool]:
    """override_settings -> (clip_skip, no_detectmap); another checkpoint is refused."""
    if over is None:
        return 1, False
    if not isinstance(over, dict):
        raise ValueError("override_settings must be an object")
    clip_skip, no_maps = 1, False
    for k, v in over.items():
        if k == "CLIP_stop_at_last_layers":
            if isinstance(v, bool) or not isinstance(v, int) or v not in (1, 2):
                raise ValueError(f"override_settings.CLIP_stop_at_last_layers={v!r}: this server does 1 or 2")
            clip_skip = v
        elif k == "control_net_no_detectmap":
            no_maps = bool(v)
        elif k == "sd_model_checkpoint":
            # another checkpoint would be another picture, not a detail: refuse rather than ignore
            if v and not (isinstance(v, str) and catalog.is_base(v)):
                raise ValueError(f"override_settings.sd_model_checkpoint={v!r}: this server has only "
                                 f"{catalog.base_title!r} loaded")
        elif k == "eta_noise_seed_delta" and not v:
            pass
        elif k in _SETTINGS_NO_EFFECT and (_SETTINGS_NO_EFFECT[k] is None or v in _SETTINGS_NO_EFFECT[k]):
            pass
        else:
            ignored[f"override_settings.{k}"] = "this setting does not exist on this server"
    return clip_skip, no_maps


def _sampler(d: dict, ignored: dict) -> tuple[str, str | None, float | None]:
    from ctrlnet.sampling.names import resolve_sampler
    from ctrlnet.sampling.registry import sampler_spec

    name = d.get("sampler_name") or d.get("sampler_index") or "Euler"
    sched = d.get("scheduler")
    if not isinstance(name, str) or (sched is not None and not isinstance(sched, str)):
        raise ValueError("sampler_name and scheduler must be strings")
    key, _ = resolve_sampler(name, sched)  # ValueError lists the known names
    options = sampler_spec(key).options
    eta = _num(d, "eta", float, 0.0, 1.0)
    if eta is not None and "eta" not in options:
        # A1111 passes eta only to samplers that take it; say so rather than drop it unseen
        ignored["eta"] = f"sampler {name!r} takes no eta (A1111 ignores it there too)"
        eta = None
    if (_num(d, "s_churn") or 0) > 0:
        ignored["s_churn"] = "stochastic churn (and s_tmin/s_tmax) is not implemented"
    if _num(d, "s_noise") not in (None, 1.0):
        ignored["s_noise"] = "noise scaling other than 1 is not offered through this API"
    return name, sched, eta


def _unit_images(u: dict, i: int, decode: Decoder) -> tuple[np.ndarray | None, np.ndarray | None]:
    """sd-webui-controlnet's image forms: base64 string, {"image", "mask"}, [image, mask];
    "" or null = none (img2img then uses the init image). Never a file path."""
    where = f"controlnet.args[{i}]"
    img, mask = u.get("image", u.get("input_image")), u.get("mask", u.get("mask_image"))
    if isinstance(img, list) and len(img) == 1 and isinstance(img[0], dict):
        img = img[0]
    if isinstance(img, dict):
        img, mask = img.get("image"), img.get("mask", mask)
    elif isinstance(img, list) and len(img) == 2:
        img, mask = img
    out_img = decode(img, f"{where}.image") if img else None
    out_mask = decode(mask, f"{where}.mask") if mask else None
    return out_img, out_mask


# sd-webui-controlnet unit fields that do not change anything here at their defaults; other values
# are named as ignored.
_UNIT_DEFAULTS = {"low_vram": False, "lowvram": False, "is_ui": False, "input_mode": "simple",
                  "batch_images": None, "output_dir": "", "loopback": False,
                  "inpaint_crop_input_image": True, "advanced_weighting": None, "effective_region_mask": None,
                  "pulid_mode": "Fidelity", "union_control_type": "Unknown", "ipadapter_input": None,
                  "batch_mask_dir": None, "animatediff_batch": False, "batch_modifiers": [],
                  "batch_image_files": [], "batch_keyframe_idx": None}
_UNIT_USED = {"enabled", "image", "input_image", "mask", "mask_image", "module", "model", "weight",
              "resize_mode", "processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end",
              "guidance", "control_mode", "pixel_perfect", "guessmode", "save_detected_map", "hr_option"}


def _unit(u, i: int, catalog: Catalog, decode: Decoder, img2img: bool, has_mask: bool,
          ignored: dict) -> tuple[dict, np.ndarray | None, bool] | None:
    """One unit -> (control dict for request_from_dict, its image, append its map) or None (disabled)."""
    where = f"controlnet.args[{i}]"
    if isinstance(u, bool) or u is None:
        return None  # the "[False]" some clients send to switch the script off
    if not isinstance(u, dict):
        raise ValueError(f"{where} must be an object")
    # A unit without "enabled" is on: clients written for sd-webui-controlnet before 1.1.44x
    # (where the API default was True) leave it out. An explicit false switches it off.
    if not _flag(u, "enabled", True):
        return None
    for k, v in u.items():
        if k not in _UNIT_USED and (k not in _UNIT_DEFAULTS or v != _UNIT_DEFAULTS[k]):
            if k in ("low_vram", "lowvram"):
                ignored[f"{where}.{k}"] = "a memory option; this server manages memory itself (same image)"
            else:
                ignored[f"{where}.{k}"] = "not supported by this server"
    module: A1111Module = resolve_module(u.get("module") or "none", f"{where}.module")
    model = u.get("model")
    if not isinstance(model, str) or not model or model.lower() == "none":
        raise ValueError(f"{where}.model: name a ControlNet; loaded: {', '.join(catalog.controlnets.values()) or 'none'}")
    key = catalog.controlnet_key(model, f"{where}.model")
    image, mask = _unit_images(u, i, decode)
    if module.annotator == "inpaint":
        if not (img2img and has_mask):
            raise ValueError(f"{where}: an inpaint unit works on img2img with a mask here (it is built from "
                             "the init image and the mask)")
        if image is not None or mask is not None:
            ignored[f"{where}.image"] = "an inpaint unit uses the init image and the request's mask"
        image = None
    elif mask is not None:
        ignored[f"{where}.mask"] = "unit masks are used only by inpaint units here"
    if image is None and not img2img and module.annotator != "inpaint":
        raise ValueError(f"{where} has no image (txt2img has no init image to use instead)")
    if module.note:
        ignored[f"{where}.module"] = module.note
    guess = u.get("guessmode")
    mode = _choice(CONTROL_MODES, u.get("control_mode", 0), f"{where}.control_mode")
    if guess not in (None, False, 0):
        mode = ControlMode.CONTROLNET  # legacy guess mode = "ControlNet is more important"
    start = _num(u, "guidance_start", float, 0.0, 1.0)
    end_key = "guidance_end" if "guidance_end" in u else "guidance"
    ctrl = {"model": key, "annotator": module.annotator, "annotator_params": module.params(u),
            "strength": _num(u, "weight", float, 0.0, 2.0) if u.get("weight") is not None else 1.0,
            "start": 0.0 if start is None else start,
            "end": 1.0 if u.get(end_key) is None else _num(u, end_key, float, 0.0, 1.0),
            "control_mode": mode.value, "pixel_perfect": _flag(u, "pixel_perfect"),
            "resize_mode": _choice(RESIZE_MODES, u.get("resize_mode", 1), f"{where}.resize_mode").value,
            "detect_resolution": None if _flag(u, "pixel_perfect") else module.resolution(u.get("processor_res")),
            "hr_option": _choice(HR_OPTIONS, u.get("hr_option", 0), f"{where}.hr_option").value}
    return ctrl, image, _flag(u, "save_detected_map", True)


def _controlnet_args(scripts, ignored: dict) -> list:
    if scripts is None:
        return []
    if not isinstance(scripts, dict):
        raise ValueError("alwayson_scripts must be an object")
    units = []
    for name, body in scripts.items():
        args = body.get("args", []) if isinstance(body, dict) else None
        if not isinstance(args, list):
            raise ValueError(f"alwayson_scripts.{name}.args must be a list")
        if name.lower() == "controlnet":  # A1111 matches script titles without case
            units = args
        elif any(a not in (False, None) for a in args):
            ignored[f"alwayson_scripts.{name}"] = "this script is not installed here"
    return units


def translate(body: dict, mode: str, catalog: Catalog, decode: Decoder, max_controls: int = 4) -> Translated:
    """An A1111 ``txt2img``/``img2img`` body -> :class:`Translated`.

    ``decode(b64, field)`` turns a base64 string (a ``data:`` prefix allowed) into an (H, W, C)
    uint8 array, raising on bad input. Raises ValueError naming the field for values out of range,
    unknown samplers/modules/models and fields refused by design; the request is also range-checked
    by ``GenerationRequest.validate`` in the caller (the server's limits).
    """
    from ctrlnet.generation.preprocess import fit_image
    from ctrlnet.interfaces.request_io import request_from_dict

    if mode not in ("txt2img", "img2img"):
        raise ValueError(f"mode must be txt2img or img2img, got {mode!r}")
    if not isinstance(body, dict):
        raise ValueError("the JSON body must be an object")
    img2img = mode == "img2img"
    ignored: dict[str, str] = {}
    if body.get("script_name"):
        # scripts (X/Y plot, SD upscale, ...) make other pictures or grids: refuse, do not ignore
        raise ValueError(f"script_name={body['script_name']!r}: scripts are not available on this server")
    for k in ("styles",):
        if body.get(k):
            ignored[k] = "prompt styles are not stored on this server"
    if _flag(body, "restore_faces"):
        ignored["restore_faces"] = "no face restoration model on this server"
    if _flag(body, "tiling"):
        ignored["tiling"] = "seamless (tileable) output is not implemented"
    if (_num(body, "subseed_strength") or 0) > 0:
        ignored["subseed_strength"] = "variation seeds are not implemented; the image uses the main seed only"
    if (_num(body, "seed_resize_from_w") or 0) > 0 or (_num(body, "seed_resize_from_h") or 0) > 0:
        ignored["seed_resize_from_w/h"] = "resizing the seed's noise is not implemented"
    if _num(body, "initial_noise_multiplier") not in (None, 1.0):
        ignored["initial_noise_multiplier"] = "not implemented (1 is used)"
    if img2img and body.get("image_cfg_scale") is not None:
        ignored["image_cfg_scale"] = "only instruct-pix2pix models use it (A1111 ignores it for others too)"
    if body.get("latent_mask"):
        ignored["latent_mask"] = "a separate latent mask is not implemented; the mask is used"
    if _flag(body, "save_images"):
        ignored["save_images"] = "this server keeps no images; they are in the response"
    if body.get("refiner_checkpoint"):
        ignored["refiner_checkpoint"] = "no refiner on this server"
    clip_skip, no_maps = _settings(body.get("override_settings"), catalog, ignored)
    sampler, schedule, eta = _sampler(body, ignored)

    width, height = _num(body, "width", int, 64, 8192), _num(body, "height", int, 64, 8192)
    for side, v in (("width", width), ("height", height)):
        if v % 8:  # A1111 draws latents of side // 8, so its picture is the multiple of 8 below
            ignored[side] = f"{v} is not a multiple of 8: {v // 8 * 8} px, as A1111's latent size makes it"
    width, height = width // 8 * 8, height // 8 * 8
    batch, n_iter = _num(body, "batch_size", int, 1, 64), _num(body, "n_iter", int, 1, 64)
    data = {"prompt": _text(body, "prompt"), "added_prompt": "", "negative_prompt": _text(body, "negative_prompt"),
            "seed": _num(body, "seed", int), "steps": _num(body, "steps", int), "guidance_scale": _num(body, "cfg_scale"),
            "width": width, "height": height, "resolution": min(width, height),  # unused with a size; in range
            "num_images": batch * n_iter, "sampler": sampler,
            "schedule": schedule, "eta": eta, "clip_skip": clip_skip}
    if data["seed"] < -1:
        data["seed"] = -1  # A1111 treats any negative seed as "random"

    init = mask = None
    if img2img:
        inits = body.get("init_images")
        if not isinstance(inits, list) or not inits:
            raise ValueError("init_images must be a list with at least one base64 image")
        if len(inits) > 1:
            ignored["init_images"] = f"only the first of {len(inits)} init images is used"
        init = decode(inits[0], "init_images[0]")
        if body.get("mask"):
            mask = decode(body["mask"], "mask")
            if _num(body, "inpainting_mask_invert", int, 0, 1):
                mask = 255 - np.asarray(mask, dtype=np.uint8) if np.asarray(mask).dtype == np.uint8 else 1 - mask
        data["denoising_strength"] = _num(body, "denoising_strength", float, 0.0, 1.0)
        only_masked = mask is not None and _flag(body, "inpaint_full_res", True)
        if mask is not None:
            data.update(mask_blur=float(_num(body, "mask_blur", float, 0, 64)),
                        inpaint_fill=INPAINT_FILLS[_num(body, "inpainting_fill", int, 0, 3)],
                        only_masked=only_masked,
                        only_masked_padding=_num(body, "inpaint_full_res_padding", int, 0, 256))
        resize = _choice(RESIZE_MODES, body.get("resize_mode", 0), "resize_mode")
        if not only_masked:
            # A1111 fits the init image (and mask) to width x height with resize_mode before encoding
            init = fit_image(init, (height, width), resize)
            if mask is not None:
                mask = fit_image(mask, (height, width), resize)
            if resize is ResizeMode.RESIZE_AND_FILL and init.shape[:2] != (height, width):
                ignored["resize_mode"] = "the empty area is filled with the border's median colour, not stretched"
    hires = not img2img and _flag(body, "enable_hr")
    if hires:
        data.update(_hires(body, width, height, ignored))

    units_raw = _controlnet_args(body.get("alwayson_scripts"), ignored)
    live = [u for u in units_raw if isinstance(u, dict) and _flag(u, "enabled", True)]
    if len(live) > max_controls:  # before any image is decoded
        raise ValueError(f"{len(live)} ControlNet units; the limit is {max_controls}")
    controls, images, append = [], [], []
    for i, u in enumerate(units_raw):
        got = _unit(u, i, catalog, decode, img2img, mask is not None, ignored)
        if got is not None:
            controls.append(got[0])
            images.append(got[1])
            append.append(got[2] and not no_maps)
    data["controls"] = controls
    req = request_from_dict(data, images, init_image=init, mask=mask)
    echo = {k: v for k, v in body.items()}
    if img2img and not _flag(body, "include_init_images"):
        echo["init_images"], echo["mask"] = None, None  # as A1111 does
    return Translated(req, ignored, append, _flag(body, "send_images", True), echo, mode)


def _hires(body: dict, width: int, height: int, ignored: dict) -> dict:
    """A1111 hires fix -> our hires fields. A target size must keep the aspect (a crop is refused)."""
    rx, ry = _num(body, "hr_resize_x", int, 0, 8192) or 0, _num(body, "hr_resize_y", int, 0, 8192) or 0
    if rx or ry:
        sx, sy = (rx / width if rx else None), (ry / height if ry else None)
        scale = sx or sy
        if sx and sy and abs(sx - sy) * min(width, height) > 8:
            raise ValueError(f"hr_resize_x/y={rx}x{ry} changes the aspect of {width}x{height}; this server "
                             "does not crop in hires fix: give one side, or hr_scale")
    else:
        scale = _num(body, "hr_scale", float, 1.0, 8.0)
    up = body.get("hr_upscaler") or "Latent"
    if not isinstance(up, str):
        raise ValueError("hr_upscaler must be a name")
    if up.lower() == "latent":
        upscaler = "latent"
    elif up.lower().startswith("latent"):
        upscaler = "latent"
        ignored["hr_upscaler"] = f"{up!r}: bilinear latent upscaling is used"
    else:
        upscaler = "lanczos"
        if up.lower() != "lanczos":
            ignored["hr_upscaler"] = f"{up!r} is not installed; Lanczos is used"
    for k in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        v = body.get(k)
        if v and not (k == "hr_prompt" and v == body.get("prompt")) and \
                not (k == "hr_negative_prompt" and v == body.get("negative_prompt")) and v != "Use same checkpoint" \
                and v != "Use same sampler" and v != "Use same scheduler":
            ignored[k] = "the hires pass uses the first pass's model, sampler and prompts"
    return {"hires_scale": float(scale), "hires_steps": _num(body, "hr_second_pass_steps", int, 0, 10000),
            "hires_denoising_strength": _num(body, "denoising_strength", float, 0.0, 1.0)
            if body.get("denoising_strength") is not None else 0.7, "hires_upscaler": upscaler}


def response(result, t: Translated, catalog: Catalog, png_b64: Callable, version: str = "") -> dict:
    """A1111's ``TextToImageResponse``/``ImageToImageResponse``: ``images`` (base64 PNGs with the
    ``parameters`` infotext, then the control maps of units that keep them), ``parameters`` (the
    body as sent, init images left out unless asked), ``info`` (a JSON string with A1111's keys,
    plus ``ctrlnet_ignored`` and ``ctrlnet_request``; for an interrupted run's images so far also
    ``ctrlnet_interrupted`` and ``ctrlnet_interrupted_at_step``)."""
    r = result.request
    model = _bare(catalog.base_title)
    model_hash = catalog.base_title.split(" [", 1)[-1].rstrip("]") if " [" in catalog.base_title else ""
    texts = [result.parameters_text(catalog.base_title.split(" [", 1)[0], k, model_hash)
             for k in range(len(result.images))]
    images = []
    if t.send_images:
        images = [png_b64(im, {"parameters": texts[k]}) for k, im in enumerate(result.images)]
        images += [png_b64(m) for m, keep in zip(result.control_maps, t.append_maps) if keep]
    h, w = result.size or (result.images[0].shape[:2] if result.images else (r.height, r.width))  # first pass
    prompt = r.prompt + (f", {r.added_prompt}" if r.added_prompt else "")
    from ctrlnet.sampling.names import a1111_name

    n = len(result.images)
    info = {"prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": r.negative_prompt or "",
            "all_negative_prompts": [r.negative_prompt or ""] * n, "seed": result.seed, "all_seeds": list(result.seeds),
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": w, "height": h,
            "sampler_name": a1111_name(r.sampler, r.schedule), "cfg_scale": r.guidance_scale, "steps": r.steps,
            "batch_size": t.echo.get("batch_size") or 1, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model, "sd_model_hash": model_hash or None, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": r.denoising_strength if r.init_image is not None else
            (r.hires_denoising_strength if r.hires_scale > 1 else None),
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
            "job_timestamp": t.timestamp, "clip_skip": r.clip_skip, "is_using_inpainting_conditioning": False,
            "version": version, "ctrlnet_ignored": dict(t.ignored), "ctrlnet_request": r.to_dict()}
    if result.interrupted_at is not None:  # an interrupted run's images so far
        info.update(ctrlnet_interrupted=True, ctrlnet_interrupted_at_step=result.interrupted_at)
    return {"images": images, "parameters": t.echo, "info": json.dumps(info)}
