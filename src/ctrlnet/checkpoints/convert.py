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
    as a pickle ``{"state_dict": ...}``. Atomic: a temp file in the same folder is renamed into place."""
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
            torch.save({"state_dict": sd}, tmp)
    return out


def convert(src, out, to: str | None = None, part: str = "auto", dtype: torch.dtype | None = None,
            base_config_from=None) -> Converted:
    """Convert ``src`` (single file or diffusers folder) to ``to`` = ``"single"`` or ``"diffusers"``.

    ``to=None`` picks from ``out``: a name ending in ``.safetensors``/``.ckpt``/``.pth`` is a single
    file, anything else a diffusers folder. ``part`` (``auto``/``base``/``controlnet``) chooses what to
    take from a file that holds both. ``dtype`` (e.g. ``torch.float16``) casts floating tensors.
    ``base_config_from`` is a base model whose config a ControlNet is checked against and takes its
    head counts from (needed for small custom models whose heads cannot be read from the weights).
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
    if part == "base":
        base = load_base(src)
        if to == "single":
            path = write_single_file(base_state_dict(base), out, base.config, dtype)
        else:
            from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base

            path = save_diffusers_base(base, out, dtype)
        n = sum(len(m.state_dict()) for m in (base.unet, base.vae, base.text_encoder))
    elif part == "controlnet":
        cfg = load_base(base_config_from).config if base_config_from is not None else None
        net = load_controlnet(src, base=cfg)
        if to == "single":
            path = write_single_file(controlnet_state_dict(net), out, cfg, dtype)
        else:
            from ctrlnet.checkpoints.diffusers_folder import save_diffusers_controlnet

            path = save_diffusers_controlnet(net, out, dtype)
        n = len(net.state_dict())
    else:
        raise ValueError(f"part={part!r}: must be 'auto', 'base' or 'controlnet'")
    return Converted(part, to, Path(path), n)
