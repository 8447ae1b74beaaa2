"""Writing model files in our single-file layout, with the model config in the metadata.

A file holds tensors under the original checkpoint prefixes (``model.diffusion_model.``,
``control_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``) and, under the
metadata key ``ctrlnet_config``, the :class:`~ctrlnet.config.ModelConfig` as JSON, so a loader can
rebuild unusual shapes (the demo model) exactly instead of guessing them from tensor shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from ctrlnet.atomic import atomic_path
from ctrlnet.config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig

CONFIG_KEY = "ctrlnet_config"

# Prefixes of the original single-file layout, by part.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "controlnet": "control_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.transformer.",  # SD1-style CLIP text tower
}


def config_to_json(cfg: ModelConfig) -> str:
    """``ModelConfig`` -> JSON text (``dataclasses.asdict``; tuples become lists)."""
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_json(text: str | Mapping) -> ModelConfig:
    """JSON text (or its parsed dict) -> ``ModelConfig``; lists become tuples again."""
    d = json.loads(text) if isinstance(text, str) else dict(text)

    def fields(cls, x: Mapping) -> dict:
        known = cls.__dataclass_fields__
        unknown = sorted(set(x) - set(known))
        if unknown:
            raise ValueError(f"{CONFIG_KEY}: unknown {cls.__name__} fields {unknown}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

    try:
        return ModelConfig(
            name=d.get("name", "custom"),
            unet=UNetConfig(**fields(UNetConfig, d["unet"])),
            vae=VAEConfig(**fields(VAEConfig, d["vae"])),
            text=TextEncoderConfig(**fields(TextEncoderConfig, d["text"])),
            schedule=ScheduleConfig(**fields(ScheduleConfig, d.get("schedule", {}))),
            hint_channels=int(d.get("hint_channels", 3)),
        )
    except KeyError as e:
        raise ValueError(f"{CONFIG_KEY} lacks the {e.args[0]!r} section") from None


def save_model_file(path, state_dicts_by_prefix: Mapping[str, Mapping[str, torch.Tensor]],
                    config: ModelConfig | None = None, metadata: Mapping[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``{prefix + key: tensor}`` for each ``prefix -> state_dict`` as one safetensors file.

    The write is atomic (temp file in the same folder, then ``os.replace``): a reader never sees a
    half-written file and a failed write leaves an existing file untouched. ``dtype`` casts
    floating tensors (e.g. ``torch.float16`` for shipping).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, sd in state_dicts_by_prefix.items():
        for k, v in sd.items():
            name = prefix + k
            if name in tensors:
                raise ValueError(f"duplicate tensor name {name!r}")
            t = v.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if config is not None:
        meta[CONFIG_KEY] = config_to_json(config)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # the temp file is private; the model file is for everyone to read
    return path


def read_config(path) -> ModelConfig | None:
    """The ``ctrlnet_config`` stored in a safetensors file, or None if it has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return config_from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
