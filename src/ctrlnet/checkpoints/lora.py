"""LoRA files: reading the kohya/A1111 and diffusers/PEFT formats, and naming the weights they change.

Formats read (``.safetensors``, or a pickle through the same safe reader as checkpoints):

- kohya / A1111 (sd-scripts, LyCORIS' plain LoRA/LoCon): ``lora_unet_<module>``, ``lora_te_<module>``
  with ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and ``.alpha``;
  ``<module>`` is a module path with ``_`` for ``.``, in diffusers' names (what sd-scripts writes)
  or in the original ones (``input_blocks_1_1_...``). LoCon conv layers are ordinary entries whose
  ``lora_down`` is a 3x3 (or 1x1) convolution.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<...>``
  (``save_lora_weights``), ``alpha`` from the ``lora_adapter_metadata`` JSON in the safetensors
  metadata (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) or ``<module>.alpha`` keys; the older
  ``<module>.lora.down.weight`` / ``.lora.up.weight`` and ``.processor.to_q_lora.down.weight`` forms.
- ControlNet entries where a file has them: ``lora_controlnet_<module>``, ``control_model.<module>.*``
  or ``controlnet.<module>.*``.

Refused with a message: SDXL files (``lora_te1_``/``lora_te2_``, ``text_encoder_2.``), LyCORIS
LoHa/LoKr/Tucker (``hada_``, ``lokr_``, ``lora_mid``) and DoRA (``dora_scale``) layers, and any key
this module does not understand (the first few are named): nothing is skipped silently.

The change a layer makes is ``delta = scale * up @ down`` with ``scale = alpha / rank`` (1 when a
file has no alpha, as kohya and diffusers assume; ``alpha / sqrt(rank)`` for rsLoRA), computed in
fp32; :func:`resolve` maps file module names to parameters of our modules (original key layout).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint

Tensor = torch.Tensor

_KOHYA = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2|lora_controlnet)_(.+?)\."
                    r"(lora_down\.weight|lora_up\.weight|alpha|lora_mid\.weight|dora_scale"
                    r"|hada_\w+|lokr_\w+)$")
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2|controlnet|control_model)\.(.+?)\."
                        r"(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|lora\.down\.weight|lora\.up\.weight"
                        r"|lora_down\.weight|lora_up\.weight|alpha|lora_magnitude_vector(?:\.default)?"
                        r"|lora_embedding_A|lora_embedding_B)$")
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PART = {"lora_unet": "unet", "lora_te": "text", "lora_controlnet": "controlnet", "unet": "unet",
         "text_encoder": "text", "controlnet": "controlnet", "control_model": "controlnet"}
_FIELD = {"lora_down.weight": "down", "lora_up.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "lora_A.weight": "down", "lora_B.weight": "up", "lora_A.default.weight": "down",
          "lora_B.default.weight": "up", "alpha": "alpha"}
PARTS = ("unet", "text", "controlnet")


class LoRAError(CheckpointError):
    """A LoRA file that cannot be used (unknown keys, unsupported layer kinds, shapes that do not fit)."""


@dataclass
class LoRALayer:
    """One low-rank update: ``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]), optional ``alpha``."""

    part: str  # "unet" | "text" | "controlnet"
    module: str  # the module name as the file writes it (underscored for kohya files)
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, shape: torch.Size, device=None) -> Tensor:
        """``scale * up @ down`` in fp32 on ``device``, reshaped to ``shape`` (the weight it updates):
        (out, in) for linear layers, (out, in, kh, kw) for convolutions (3x3 LoCon included)."""
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * self.scale  # (out, in*kh*kw)
        if d.numel() != math.prod(shape):
            raise LoRAError(f"LoRA layer {self.module}: update of shape {tuple(up.shape[:1]) + tuple(down.shape[1:])} "
                            f"does not fit the weight {tuple(shape)}; the LoRA is for another model")
        return d.reshape(shape)


@dataclass
class LoRAFile:
    """A parsed LoRA file. ``layers`` by ``(part, module name in the file)``."""

    path: Path
    format: str  # "kohya" | "diffusers"
    layers: dict[tuple[str, str], LoRALayer] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def parts(self) -> set[str]:
        return {p for p, _ in self.layers}


def _refuse_kinds(path: Path, keys: list[str]) -> None:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        raise LoRAError(f"{path}: an SDXL LoRA (it has lora_te1_/lora_te2_ or text_encoder_2 keys); ctrlnet runs "
                        "SD1.x/SD2.x models, which SDXL LoRAs do not fit")
    for marker, what in (("hada_", "LyCORIS LoHa"), ("lokr_", "LyCORIS LoKr"), ("lora_mid", "LyCORIS Tucker (lora_mid)"),
                         ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA")):
        hits = [k for k in keys if marker in k]
        if hits:
            raise LoRAError(f"{path}: {what} layers are not supported (only plain LoRA/LoCon); e.g. {hits[0]}")


def _peft_alphas(meta: dict[str, str]) -> dict[str, dict]:
    """``{"unet": {...}, "text": {...}}`` from diffusers' ``lora_adapter_metadata`` JSON."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items():
        prefix, _, name = k.partition(".")
        if prefix in _PART and name:
            out.setdefault(_PART[prefix], {})[name] = v
    return out


def _pattern_value(patterns: dict, module: str):
    # PEFT's rule: a pattern key matches a module whose name ends with it (at a dot boundary)
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def read_lora(sd: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> LoRAFile:
    """Parse a LoRA state dict (see the module docstring for the formats); raises :class:`LoRAError`."""
    keys = [k.removeprefix("base_model.model.") for k in sd]
    sd = dict(zip(keys, sd.values()))
    _refuse_kinds(path, keys)
    layers: dict[tuple[str, str], LoRALayer] = {}
    unknown: list[str] = []
    fmt = None
    for key, value in sd.items():
        m = _KOHYA.match(key)
        if m:
            part, module, fld = _PART[m.group(1)], m.group(2), _FIELD.get(m.group(3))
            fmt = fmt or "kohya"
        elif (p := _PROCESSOR.match(key)) is not None:
            top, _, rest = p.group(1).partition(".")
            if top not in _PART:
                unknown.append(key)
                continue
            name = {"to_out": "to_out.0"}.get(p.group(2), p.group(2))
            part, module, fld = _PART[top], f"{rest}.{name}", p.group(3)
            fmt = fmt or "diffusers"
        elif (m := _DIFFUSERS.match(key)) is not None:
            part, module, fld = _PART.get(m.group(1)), m.group(2), _FIELD.get(m.group(3))
            fmt = fmt or "diffusers"
        else:
            unknown.append(key)
            continue
        if fld is None or part is None:
            unknown.append(key)
            continue
        layer = layers.setdefault((part, module), LoRALayer(part, module))
        if fld == "alpha":
            layer.alpha = float(value.float().flatten()[0]) if value.numel() else None
        else:
            setattr(layer, fld, value)
    if unknown:
        raise LoRAError(f"{path}: {len(unknown)} keys are not LoRA weights this loader knows: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if not layers:
        raise LoRAError(f"{path}: no LoRA layers in the file")
    half = [f"{p}:{m}" for (p, m), v in layers.items() if v.down is None or v.up is None]
    if half:
        raise LoRAError(f"{path}: {len(half)} LoRA layers lack their down or up weight: {', '.join(half[:5])}")
    for (part, module), layer in layers.items():
        if layer.up.shape[1] != layer.down.shape[0]:
            raise LoRAError(f"{path}: LoRA layer {module}: up {tuple(layer.up.shape)} and down "
                            f"{tuple(layer.down.shape)} disagree on the rank")
    peft = _peft_alphas(metadata or {})
    for (part, module), layer in layers.items():
        conf = peft.get(part)
        if conf and layer.alpha is None:
            alpha = _pattern_value(conf.get("alpha_pattern"), module)
            layer.alpha = float(alpha if alpha is not None else conf.get("lora_alpha", layer.rank))
            layer.rslora = bool(conf.get("use_rslora", False))
    return LoRAFile(Path(path), fmt or "kohya", layers)


def load_lora(path) -> LoRAFile:
    """Read a LoRA ``.safetensors`` (or pickle) file; raises :class:`LoRAError`/:class:`CheckpointError`."""
    ckpt = read_checkpoint(path)
    return read_lora(ckpt.state_dict, Path(path), ckpt.metadata)


# --- naming: file module names -> our parameters --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The weight a LoRA layer updates: a parameter of one of our modules, or rows of it (the packed
    q/k/v ``in_proj_weight`` of the SD2 text tower)."""

    part: str
    param: str
    rows: tuple[int, int] | None = None


def _aliases(name: str) -> tuple[str, ...]:
    return (name, name.replace(".", "_"))


def _unet_names(module: nn.Module, kind: str) -> dict[str, Target]:
    from ctrlnet.checkpoints import diffusers_unet as du

    part = "unet" if kind == "unet" else "controlnet"
    params = module.config_params()
    prefixes = du.module_map(params, kind)
    table: dict[str, Target] = {}
    for key, p in module.named_parameters():
        if not key.endswith(".weight") or p.ndim < 2:
            continue
        ours = key[: -len(".weight")]
        target = Target(part, key)
        names = list(_aliases(ours))
        theirs = du._convert_key(key, prefixes, du._RESNET)
        if theirs is not None:
            names += _aliases(theirs[: -len(".weight")])
        for n in names:
            table[n] = target
    return table


def _text_names(module: nn.Module) -> dict[str, Target]:
    table: dict[str, Target] = {}
    if any(k.startswith("transformer.resblocks.") for k, _ in module.named_parameters()):  # SD2 OpenCLIP
        width = module.state_dict()["token_embedding.weight"].shape[1]
        for key, p in module.named_parameters():
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)[._]weight$", key)
            if m is None or p.ndim < 2:
                continue
            i, rest = m.groups()
            hf = f"text_model.encoder.layers.{i}."
            if rest == "attn.in_proj":  # the packed q/k/v of nn.MultiheadAttention: rows per projection
                for j, q in enumerate("qkv"):
                    t = Target("text", key, (j * width, (j + 1) * width))
                    for n in (*_aliases(f"{hf}self_attn.{q}_proj"), *_aliases(f"encoder.layers.{i}.self_attn.{q}_proj")):
                        table[n] = t
                continue
            hf_rest = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}.get(rest)
            t = Target("text", key)
            for n in _aliases(key[: -len(".weight")]):
                table[n] = t
            if hf_rest:
                for n in (*_aliases(hf + hf_rest), *_aliases(f"encoder.layers.{i}.{hf_rest}")):
                    table[n] = t
        return table
    for key, p in module.named_parameters():
        if not key.endswith(".weight") or p.ndim < 2 or "embedding" in key:
            continue
        t = Target("text", key)
        ours = key[: -len(".weight")]
        for n in (*_aliases(ours), *_aliases(ours.removeprefix("text_model."))):
            table[n] = t
    return table


def resolve(lora: LoRAFile, modules: dict[str, nn.Module | dict[str, nn.Module] | None]
            ) -> list[tuple[nn.Module, Target, LoRALayer]]:
    """Pair every layer of ``lora`` with the parameter it updates.

    ``modules``: ``{"unet": UNetModel, "text": TextEncoder, "controlnet": {name: ControlNet}}``
    (ControlNet layers update every ControlNet given). Raises :class:`LoRAError` naming the first
    few layers that match no parameter, or when the file has layers for a part not given.
    """
    tables: dict[str, dict[str, Target]] = {}
    if modules.get("unet") is not None:
        tables["unet"] = _unet_names(modules["unet"], "unet")
    if modules.get("text") is not None:
        tables["text"] = _text_names(modules["text"])
    nets = modules.get("controlnet") or {}
    net_tables = {name: _unet_names(net, "controlnet") for name, net in nets.items()} if any(
        p == "controlnet" for p, _ in lora.layers) else {}
    out: list[tuple[nn.Module, Target, LoRALayer]] = []
    unmatched: list[str] = []
    for (part, name), layer in lora.layers.items():
        if part == "controlnet":
            if not nets:
                raise LoRAError(f"{lora.path}: the LoRA has ControlNet layers ({name}, ...) but no ControlNet is loaded")
            for net_name, net in nets.items():
                t = net_tables[net_name].get(name)
                if t is None:
                    unmatched.append(f"controlnet:{name}")
                    break
                out.append((net, t, layer))
            continue
        table = tables.get(part)
        if table is None:
            raise LoRAError(f"{lora.path}: the LoRA has {part} layers but no {part} module was given")
        t = table.get(name)
        if t is None:
            unmatched.append(f"{part}:{name}")
            continue
        out.append((modules[part], t, layer))
    if unmatched:
        raise LoRAError(f"{lora.path}: {len(unmatched)} LoRA layers match no weight of this model (a LoRA for "
                        f"another model family?): {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
    return out
