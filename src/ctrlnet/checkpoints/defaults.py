"""Sampling defaults a model file carries: the resolution it was trained at, the steps and
guidance it was measured with, and (fill50k models) its colour vocabulary.

They live in the safetensors metadata under :data:`DEFAULTS_KEY` as JSON, written by the recipes
that ship a model (``ctrlnet.training.demo ship``, ``ctrlnet.colorize.recipe ship``), so every
surface (CLI, web UI, HTTP API, colorization) starts from settings that suit the model instead of
SD's 512 px / 20 steps / guidance 9. Files without the key (official checkpoints, ``.ckpt``) have
no defaults; the surfaces fall back to SD's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

DEFAULTS_KEY = "ctrlnet_defaults"

# name -> (type, check, what the check means); anything else in the metadata is refused.
_FIELDS = {
    "resolution": (int, lambda v: 64 <= v <= 2048 and v % 8 == 0, "a multiple of 8 between 64 and 2048"),
    "steps": (int, lambda v: 1 <= v <= 1000, "between 1 and 1000"),
    "guidance_scale": (float, lambda v: 0.0 <= v <= 50.0, "between 0 and 50"),
    "vocabulary": (str, lambda v: 0 < len(v) <= 32, "a short name"),
}

# What the demo files shipped before this key existed were trained and measured at
# (128 px, fill50k benchmark at 20 DDIM steps and guidance 5, the 20-colour vocabulary).
LEGACY_DEMO_DEFAULTS = {"resolution": 128, "steps": 20, "guidance_scale": 5.0, "vocabulary": "basic20"}
# The shipped colorizer before the key: guidance 1 (no classifier-free guidance), 20 steps.
LEGACY_COLORIZER_DEFAULTS = {"resolution": 128, "steps": 20, "guidance_scale": 1.0}


def check_defaults(d: Mapping, where: str = DEFAULTS_KEY) -> dict:
    """Typed, range-checked copy of a defaults dict; ValueError naming the first bad entry."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if k not in _FIELDS:
            raise ValueError(f"{where}: unknown default {k!r}; known: {', '.join(_FIELDS)}")
        kind, ok, rule = _FIELDS[k]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) or not ok(v):
            raise ValueError(f"{where}: {k}={v!r} must be {kind.__name__}, {rule}")
        out[k] = v
    return out


def defaults_metadata(d: Mapping) -> dict[str, str]:
    """The metadata entry that stores ``d`` (checked) in a safetensors file."""
    return {DEFAULTS_KEY: json.dumps(check_defaults(d), sort_keys=True)}


def read_defaults(path) -> dict:
    """The defaults stored in a safetensors file's metadata; ``{}`` for a file without them or
    another format. Reads the header only. ValueError for malformed JSON or bad values."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    text = meta.get(DEFAULTS_KEY)
    if text is None:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {DEFAULTS_KEY} metadata is not JSON ({e.msg})") from None
    return check_defaults(d, f"{path}: {DEFAULTS_KEY}")


def model_defaults(base, controlnets=(), legacy: Mapping | None = None) -> dict:
    """Defaults for a base file and its ControlNet files: the base's, then each ControlNet's on top
    (a ControlNet knows the steps and guidance it was measured with). ``legacy`` fills in when no
    file carries any (the embedded files shipped before :data:`DEFAULTS_KEY`). Paths that are not
    files (``random:...``, folders) add nothing."""
    out: dict = {}
    for p in (base, *controlnets):
        if p is not None:
            out.update(read_defaults(p))
    if not out and legacy:
        out = dict(legacy)
    return out
