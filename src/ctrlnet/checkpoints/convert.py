"""Converting model files between the original single-file layout and diffusers folders.

Single files are written with the original prefixes (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.transformer.`` for SD1 CLIP or ``cond_stage_model.model.`` for SD2 OpenCLIP,
``control_model.``), so the original code, A1111 and ComfyUI read them; the model config goes into
the safetensors metadata (``ctrlnet_config``) so shapes that cannot be inferred (head counts) survive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.atomic import atomic_path
from ctrlnet.checkpoints import detect
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.checkpoints.load import BaseModels, load_base, load_controlnet
from ctrlnet.checkpoints.save import config_to_json
from ctrlnet.config import ModelConfig

TEXT_PREFIX = {"clip": detect.CLIP_PREFIX, "openclip": detect.OPENCLIP_PREFIX}


@dataclass
class Converted:
    part: str  # "base" | "controlnet"
    layout: str  # "single" | "diffusers"
    path: Path
    tensors: int
    dtype: str = ""


def detect_part(path) -> str:
    """``"base"`` or ``"controlnet"``: what a file or folder mainly holds.

    A ``control_sd15_*`` file holds both; it counts as a ControlNet (the SD weights in it are the
    stock base model).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return "base"
        if (path / "config.json").is_file():
            return "controlnet"
        raise CheckpointError(f"{path}: a folder without model_index.json or config.json is not a diffusers model")
    layout = detect.detect_layout(read_checkpoint(path).state_dict)
    if layout.control is not None:
        return "controlnet"
    if layout.unet is not None:
        return "base"
    raise CheckpointError(f"{path}: neither a Stable Diffusion base model nor a ControlNet (no known keys)")


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in sd.items()}


def base_state_dict(base: BaseModels) -> dict[str, torch.Tensor]:
    """BaseModels -> one state dict in the original single-file layout."""
    out: dict[str, torch.Tensor] = {}
    parts = ((detect.UNET_PREFIX, base.unet), (detect.VAE_PREFIX, base.vae),
             (TEXT_PREFIX[base.config.text.kind], base.text_encoder))
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            out[prefix + k] = v
    return out


def controlnet_state_dict(net) -> dict[str, torch.Tensor]:
    """A ControlNet -> its state dict under ``control_model.``."""
    return {detect.CONTROL_PREFIX + k: v for k, v in net.state_dict().items()}


def write_single_file(sd: dict[str, torch.Tensor], out, config: ModelConfig | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a state dict as ``.safetensors`` (with the config in its metadata) or, for ``.ckpt``/``.pth``,
    as a pickle ``{"state_dict": ..., "ctrlnet_config": "<json>"}`` (a plain string, which
    ``weights_only`` loading reads; without it a model whose head counts the weights do not tell
    could not be loaded back). Atomic: a temp file in the same folder is renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = _cast(sd, dtype)
    if out.suffix not in (".safetensors", ".ckpt", ".pth", ".pt"):
        raise CheckpointError(f"{out}: unknown output type; use .safetensors (or .ckpt/.pth)")
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {"format": "pt"}
            if config is not None:
                meta["ctrlnet_config"] = config_to_json(config)
            save_file(sd, str(tmp), metadata=meta)
        else:
            obj = {"state_dict": sd}
            if config is not None:
                obj["ctrlnet_config"] = config_to_json(config)
            torch.save(obj, tmp)
    return out


def source_dtype(path) -> torch.dtype:
    """The floating dtype holding most of the weights of a file or diffusers folder (``torch.float32``
    when there are none): what ``convert`` writes unless told otherwise."""
    from collections import Counter

    from ctrlnet.checkpoints.diffusers_folder import read_weights

    path = Path(path)
    if path.is_dir():
        sub = path / "unet" if (path / "unet").is_dir() else path
        sd = read_weights(sub)
    else:
        sd = read_checkpoint(path).state_dict
    count = Counter()
    for v in sd.values():
        if v.is_floating_point():
            count[v.dtype] += v.numel()
    return count.most_common(1)[0][0] if count else torch.float32


def convert(src, out, to: str | None = None, part: str = "auto", dtype: torch.dtype | None = None,
            base_config_from=None, controlnets=()) -> Converted:
    """Convert ``src`` (single file or diffusers folder) to ``to`` = ``"single"`` or ``"diffusers"``.

    ``to=None`` picks from ``out``: a name ending in ``.safetensors``/``.ckpt``/``.pth`` is a single
    file, anything else a diffusers folder. ``part`` (``auto``/``base``/``controlnet``/``all``) chooses
    what to take from a file that holds both (``all``: a diffusers ControlNet pipeline of both).
    ``dtype`` (e.g. ``torch.float16``) casts floating tensors; ``None`` keeps the source's dtype
    (:func:`source_dtype`). ``base_config_from`` is a base model whose config a ControlNet is
    checked against and takes its head counts from (needed for small custom models whose heads
    cannot be read from the weights). ``controlnets``: ControlNet files/folders to add to a base
    converted to diffusers (``controlnet/``, ``controlnet_1/``, ...: a ``StableDiffusionControlNetPipeline``).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"no model at {src}")
    if to is None:
        to = "single" if out.suffix in (".safetensors", ".ckpt", ".pth", ".pt") else "diffusers"
    if to not in ("single", "diffusers"):
        raise ValueError(f"to={to!r}: must be 'single' or 'diffusers'")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output would overwrite the input")
    part = detect_part(src) if part == "auto" else part
    if dtype is None:
        dtype = source_dtype(src)
    if controlnets and (part != "base" or to != "diffusers"):
        raise ValueError("controlnets can only be added to a base model converted to a diffusers folder")
    if part in ("base", "all"):
        base = load_base(src)
        nets = {}
        if part == "all":
            nets["controlnet"] = load_controlnet(src, base=base.config, base_unet=base.unet)
        for i, p in enumerate(controlnets):
            nets[f"controlnet_{i}"] = load_controlnet(p, base=base.config, base_unet=base.unet)
        if to == "single":
            if nets:
                raise ValueError("part='all' writes a diffusers folder; a single file holds one part")
            path = write_single_file(base_state_dict(base), out, base.config, dtype)
        else:
            from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base

            path = save_diffusers_base(base, out, dtype, controlnets=nets)
        n = sum(len(m.state_dict()) for m in (base.unet, base.vae, base.text_encoder, *nets.values()))
    elif part == "controlnet":
        ref = load_base(base_config_from) if base_config_from is not None else None
        cfg = ref.config if ref is not None else None
        # a "difference" ControlNet is written whole: the base UNet is added back on loading
        net = load_controlnet(src, base=cfg, base_unet=ref.unet if ref is not None else None)
        if to == "single":
            path = write_single_file(controlnet_state_dict(net), out, cfg, dtype)
        else:
            from ctrlnet.checkpoints.diffusers_folder import save_diffusers_controlnet

            path = save_diffusers_controlnet(net, out, dtype)
        n = len(net.state_dict())
    else:
        raise ValueError(f"part={part!r}: must be 'auto', 'base', 'controlnet' or 'all'")
    return Converted(part, to, Path(path), n, str(dtype).replace("torch.", ""))
