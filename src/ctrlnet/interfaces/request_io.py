"""Requests from untrusted dicts (JSON bodies, PNG chunks): typed, range-checked, path-free.

The web UI, the HTTP API and ``ctrlnet generate --from-png`` all turn a plain dict into a
:class:`~ctrlnet.pipeline.GenerationRequest` here, so the rules are written once.
"""

from __future__ import annotations

import inspect
import types
import typing
from enum import Enum
from dataclasses import fields
from functools import lru_cache

from ctrlnet.pipeline import ControlSpec, GenerationRequest

# Annotator keywords that name files, folders or devices: set by the operator, never by a client.
_PRIVATE_PARAMS = {"device", "dtype", "depth", "mask", "soft_edge"}
_PRIVATE_SUFFIXES = ("_dir", "_path", "_file", "_folder")
_SCALAR = (bool, int, float, str)


@lru_cache(maxsize=None)
def public_params(annotator: str) -> dict[str, object]:
    """The parameters of an annotator a user may set, with their defaults (from its signature).

    Only keywords whose default is a bool, number or string count; weight folders, devices and
    array inputs are left out, so a client cannot point the server at a file.
    """
    from ctrlnet.annotators import get_annotator

    out = {}
    for name, p in inspect.signature(get_annotator(annotator)).parameters.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is inspect.Parameter.empty:
            continue
        if name in _PRIVATE_PARAMS or name.endswith(_PRIVATE_SUFFIXES):
            continue
        if isinstance(p.default, _SCALAR):
            out[name] = p.default
    return out


def check_annotator_params(annotator: str | None, params: dict, where: str = "annotator_params") -> dict:
    """Keep ``params`` only if every key is a public parameter of ``annotator`` with a fitting type."""
    if not params:
        return {}
    if annotator is None or annotator == "none":
        raise ValueError(f"{where}: parameters given but no annotator is used")
    allowed = public_params(annotator)
    out = {}
    for k, v in params.items():
        if k not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"{where}: {annotator!r} has no settable parameter {k!r} (settable: {known})")
        default = allowed[k]
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok and isinstance(default, int) and not isinstance(default, bool) and float(v).is_integer():
                v = int(v)
        else:
            ok = isinstance(v, str) and len(v) <= 64
        if not ok:
            raise ValueError(f"{where}.{k}={v!r} has the wrong type; expected {type(default).__name__}")
        out[k] = v
    return out


def _scalar_fields(cls) -> dict[str, type]:
    """Dataclass fields whose type is a scalar or an enum (``int``, ``float | None``, ``ControlMode``...),
    by name -> type.

    Taken from the type hints so fields added to the request later are accepted without edits here;
    arrays, lists and dicts are left out (images travel separately).
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if args and typing.get_origin(t) in (typing.Union, types.UnionType):
            t = args[0] if len(args) == 1 else t
        if t in (bool, int, float, str) or (isinstance(t, type) and issubclass(t, Enum)):
            out[f.name] = t
    return out


_TYPES = _scalar_fields(GenerationRequest)
_CONTROL_TYPES = _scalar_fields(ControlSpec)
_REQUEST_FIELDS = {**_TYPES, "controls": list, "loras": list}
_CONTROL_FIELDS = {*_CONTROL_TYPES, "annotator_params"}
# Fields the caller of generate() decides (noise device), not a client.
_SERVER_ONLY = {"noise_device"}


def _typed(name: str, value, kind):
    if value is None:
        return None
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is unknown; choose one of: "
                             f"{', '.join(m.value for m in kind)}") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} must be a number")
        if kind is int:
            if float(value) != int(value):
                raise ValueError(f"{name}={value!r} must be a whole number")
            return int(value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a string")
    return value


def control_from_dict(d: dict, index: int = 0, image=None) -> ControlSpec:
    """A ControlSpec from a dict (no image inside; ``image`` is passed separately)."""
    where = f"controls[{index}]"
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(d) - _CONTROL_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(_CONTROL_FIELDS)}")
    kw = {k: _typed(f"{where}.{k}", v, _CONTROL_TYPES[k]) for k, v in d.items() if k != "annotator_params"}
    ann = kw.get("annotator")
    if ann is not None and ann != "none":
        from ctrlnet.annotators import list_annotators

        if ann not in list_annotators():
            raise ValueError(f"{where}.annotator={ann!r} is unknown; known: {', '.join(list_annotators())}")
    params = d.get("annotator_params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}.annotator_params must be an object")
    kw["annotator_params"] = check_annotator_params(ann, params, f"{where}.annotator_params")
    if kw.get("annotator") == "none":
        kw["annotator"] = None
    for k in ("strength", "start", "end"):
        if kw.get(k) is None:
            kw.pop(k, None)
    return ControlSpec(image=image, **kw)


def _loras(items, names_only: bool = True) -> list[tuple[str, float]]:
    if not isinstance(items, list):
        raise ValueError("loras must be a list of [name, weight] pairs")
    out = []
    for i, it in enumerate(items):
        if not (isinstance(it, (list, tuple)) and len(it) == 2 and isinstance(it[0], str)
                and isinstance(it[1], (int, float)) and not isinstance(it[1], bool)):
            raise ValueError(f"loras[{i}] must be a [name, weight] pair")
        if not it[0] or names_only and (any(c in it[0] for c in "/\\:") or it[0].startswith(".")):
            raise ValueError(f"loras[{i}]: a LoRA is named, not given by path (the server looks it up)")
        out.append((it[0], float(it[1])))
    return out


# Request fields a model file may set defaults for (``Models.defaults``, from ``ctrlnet_defaults``).
MODEL_DEFAULT_FIELDS = ("resolution", "steps", "guidance_scale")


def with_model_defaults(d: dict, defaults: dict) -> dict:
    """``d`` with the model's resolution, steps and guidance where ``d`` leaves them out or null
    (a client that names them keeps its values). Other entries of ``defaults`` are ignored.

    A ``preset`` entry (a name in :data:`ctrlnet.generation.presets.PRESETS`, e.g. ``"fast"``) is
    taken out and fills sampler, schedule and steps first, so it wins over the model's steps and
    loses to the client's own values. ValueError for an unknown preset."""
    if not isinstance(d, dict):
        return d  # request_from_dict names the error
    from ctrlnet.generation.presets import apply_preset

    out = dict(d)
    preset = out.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"preset={preset!r} must be a string")
    out = apply_preset(out, preset)
    for k in MODEL_DEFAULT_FIELDS:
        if out.get(k) is None and k in defaults:
            out[k] = defaults[k]
    return out


def request_from_dict(d: dict, images=(), allow_server_fields: bool = False, init_image=None,
                      mask=None) -> GenerationRequest:
    """A GenerationRequest from a dict shaped like :meth:`GenerationRequest.to_dict`.

    ``images[i]`` becomes the image of ``controls[i]`` (None: the unit uses the init image);
    ``init_image`` (H, W, 3) and ``mask`` (H, W[, C]) uint8 arrays are the img2img/inpaint images
    (decoded by the caller, like the control images). Unknown fields and wrong types raise
    ValueError naming the field; ranges are checked by :meth:`GenerationRequest.validate`.
    ``allow_server_fields`` accepts ``noise_device`` too (a record we wrote ourselves).
    """
    if not isinstance(d, dict):
        raise ValueError("the request must be a JSON object")
    allowed = set(_REQUEST_FIELDS) if allow_server_fields else set(_REQUEST_FIELDS) - _SERVER_ONLY
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown request fields {unknown}")
    kw = {}
    for k, v in d.items():
        if k in ("controls", "loras"):
            continue
        t = _typed(k, v, _TYPES[k])
        if t is None and k not in ("added_prompt", "negative_prompt"):
            continue  # null = the default
        kw[k] = t
    kw["loras"] = _loras(d.get("loras") or [], names_only=not allow_server_fields)
    controls = d.get("controls") or []
    if not isinstance(controls, list):
        raise ValueError("controls must be a list")
    images = list(images)
    if len(images) > len(controls):
        controls = controls + [{}] * (len(images) - len(controls))
    kw["controls"] = [control_from_dict(c, i, images[i] if i < len(images) else None)
                      for i, c in enumerate(controls)]
    return GenerationRequest(**kw, init_image=init_image, mask=mask)
