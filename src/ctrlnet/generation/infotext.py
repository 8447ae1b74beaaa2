"""Reading an A1111 ``parameters`` infotext back into request fields (the inverse of
:meth:`ctrlnet.generation.result.GenerationResult.parameters_text`).

The text is what A1111 (and sd-webui-controlnet) write into PNGs and show under images::

    a prompt, possibly over several lines
    Negative prompt: a negative prompt
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768,
    Denoising strength: 0.5, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b],
    Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: 0, Guidance End: 1,
    Pixel Perfect: False, Control Mode: Balanced"

Parsing follows A1111's ``parse_generation_parameters`` in its conventions (the last line holding
``Steps:`` is the settings line; values may be double-quoted and then hold commas; ``Size`` is
the first pass's size; with hires fix and no init image, ``Denoising strength`` is the hires
pass's). The result is a plain dict for :func:`ctrlnet.interfaces.request_io.request_from_dict`
(which checks types and names) plus notes on what had no equivalent, so nothing is dropped silently.
"""

from __future__ import annotations

import json
import re

# key: value pairs of the settings line; a value is a quoted string (with \" escapes) or runs to
# the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

_CONTROL_MODES = {"balanced": "balanced", "my prompt is more important": "prompt",
                  "controlnet is more important": "controlnet", "prompt": "prompt", "controlnet": "controlnet"}
_RESIZE_MODES = {"just resize": "just_resize", "crop and resize": "crop_and_resize",
                 "resize and fill": "resize_and_fill", "envelope (outer fit)": "crop_and_resize",
                 "inner fit (scale to fit)": "crop_and_resize", "outer fit (shrink to fit)": "resize_and_fill"}
_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}
# Settings that describe the run but are not inputs (model hashes, versions, timing).
_IGNORED = {"model hash", "vae hash", "version", "vae", "model", "ti hashes", "lora hashes", "hashes",
            "schedule max sigma", "schedule min sigma", "schedule rho", "token merging ratio"}


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v[1:-1]
    return v


def _number(text: str, key: str, kind=float):
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"infotext: {key}: {text!r} is not a number") from None
    if kind is int:
        if not x.is_integer():
            raise ValueError(f"infotext: {key}: {text!r} is not a whole number")
        return int(x)
    return x


def _pairs(line: str) -> list[tuple[str, str]]:
    return [(k.strip(), _unquote(v)) for k, v in _PAIR.findall(line) if k.strip()]


def _bool(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def _control(text: str, index: int, notes: list[str]) -> dict:
    """One sd-webui-controlnet unit ("Module: canny, Model: x [hash], Weight: 1, ...") -> a controls[] dict."""
    from ctrlnet.annotators import list_annotators

    c: dict = {}
    for k, v in _pairs(text):
        key = k.lower()
        if key == "module":
            if v.lower() in ("none", ""):
                c["annotator"] = None
            elif v in list_annotators():
                c["annotator"] = v
            else:
                notes.append(f"ControlNet {index}: preprocessor {v!r} is not one of ours; the unit uses none")
                c["annotator"] = None
        elif key == "model":
            name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", v)  # A1111 appends the short hash
            c["model"] = None if name.lower() in ("none", "default", "") else name
        elif key == "weight":
            c["strength"] = _number(v, f"ControlNet {index} weight")
        elif key == "guidance start":
            c["start"] = _number(v, f"ControlNet {index} guidance start")
        elif key == "guidance end":
            c["end"] = _number(v, f"ControlNet {index} guidance end")
        elif key == "pixel perfect":
            c["pixel_perfect"] = _bool(v)
        elif key == "processor res":
            res = _number(v, f"ControlNet {index} processor res", int)
            c["detect_resolution"] = res if res >= 64 else None  # A1111 writes -1 for "unused"
        elif key == "control mode":
            mode = _CONTROL_MODES.get(v.lower())
            if mode is None:
                notes.append(f"ControlNet {index}: control mode {v!r} is unknown; balanced is used")
            c["control_mode"] = mode or "balanced"
        elif key == "resize mode":
            mode = _RESIZE_MODES.get(v.lower(), v if v in ("just_resize", "crop_and_resize", "resize_and_fill")
                                     else None)
            if mode is None:
                notes.append(f"ControlNet {index}: resize mode {v!r} is unknown; crop and resize is used")
            c["resize_mode"] = mode or "crop_and_resize"
        elif key == "hr option":
            opt = v.strip().lower().replace(" ", "_")
            if opt not in ("both", "low_res_only", "high_res_only"):
                notes.append(f"ControlNet {index}: Hr Option {v!r} is unknown; both passes are used")
                opt = "both"
            c["hr_option"] = opt
        elif key not in ("low vram", "threshold a", "threshold b", "save detected map"):
            notes.append(f"ControlNet {index}: {k} has no equivalent here and is ignored")
    return c


def parse_parameters(text: str) -> tuple[dict, list[str]]:
    """An infotext -> (request fields as :meth:`GenerationRequest.to_dict` names them, notes).

    The dict holds only what the text says (``prompt``, ``negative_prompt``, ``steps``,
    ``sampler``, ``schedule``, ``guidance_scale``, ``seed``, ``width``/``height``, ``eta``,
    ``clip_skip``, ``denoising_strength``, ``mask_blur``, hires fields, ``controls``, ``loras``);
    ``notes`` lists every setting that has no equivalent. Raises ValueError when the text has no
    settings line or a number does not parse.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("infotext: the text is empty")
    lines = text.strip().splitlines()
    settings_at = max((i for i, ln in enumerate(lines) if re.match(r"\s*Steps:\s*\d", ln)), default=None)
    if settings_at is None:
        raise ValueError("infotext: no settings line (one starting with 'Steps:') was found")
    head, settings = lines[:settings_at], " ".join(lines[settings_at:])
    prompt, negative, in_negative = [], [], False
    for ln in head:
        if ln.startswith("Negative prompt:"):
            in_negative = True
            ln = ln[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(ln)
    d: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    notes: list[str] = []
    controls: dict[int, dict] = {}
    denoise, hires = None, False
    for k, v in _pairs(settings):
        key = k.lower()
        if key == "steps":
            d["steps"] = _number(v, k, int)
        elif key == "sampler":
            d["sampler"] = v
        elif key == "schedule type":
            d["schedule"] = v
        elif key == "cfg scale":
            d["guidance_scale"] = _number(v, k)
        elif key == "seed":
            d["seed"] = _number(v, k, int)
        elif key == "size":
            m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", v)
            if not m:
                raise ValueError(f"infotext: Size: {v!r} is not WIDTHxHEIGHT")
            d["width"], d["height"] = int(m.group(1)), int(m.group(2))
        elif key == "eta":
            d["eta"] = _number(v, k)
        elif key == "clip skip":
            d["clip_skip"] = _number(v, k, int)
        elif key == "denoising strength":
            denoise = _number(v, k)
        elif key == "mask blur":
            d["mask_blur"] = _number(v, k)
        elif key == "hires upscale":
            d["hires_scale"], hires = _number(v, k), True
        elif key == "hires steps":
            d["hires_steps"] = _number(v, k, int)
        elif key == "hires upscaler":
            up = _UPSCALERS.get(v.lower().split()[0] if v.strip() else "")
            if up is None:
                notes.append(f"Hires upscaler {v!r} is not available; latent is used")
            d["hires_upscaler"] = up or "latent"
        elif key == "lora":
            name, _, w = v.rpartition(":")
            d.setdefault("loras", []).append([name, _number(w, k)])
        elif (m := re.fullmatch(r"controlnet (\d+)", key)) is not None:
            controls[int(m.group(1))] = _control(v, int(m.group(1)), notes)
        elif key not in _IGNORED:
            notes.append(f"{k} has no equivalent here and is ignored")
    if denoise is not None:
        d["hires_denoising_strength" if hires else "denoising_strength"] = denoise
    if controls:
        d["controls"] = [controls[i] for i in sorted(controls)]
    return d, notes
