"""Build modules on the ``meta`` device and fill them from checkpoint files with ``assign=True``.

A missing or unexpected key is an error that names the keys; only documented harmless keys
(``position_ids`` buffers, VAE loss/EMA bookkeeping, EMA copies of the UNet) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctrlnet.checkpoints import detect
from ctrlnet.checkpoints.io import Checkpoint, CheckpointError, read_checkpoint
from ctrlnet.checkpoints.keys import key_problems
from ctrlnet.checkpoints.save import config_from_json
from ctrlnet.config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import HARMLESS_KEYS as TEXT_HARMLESS
from ctrlnet.models.text_encoder import TextEncoder, build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import HARMLESS_PREFIXES as VAE_HARMLESS
from ctrlnet.models.vae import AutoencoderKL


@dataclass
class BaseModels:
    """The Stable Diffusion parts of one checkpoint."""

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    source: str = ""


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, path,
              harmless: tuple[str, ...] = (), dtype: torch.dtype | None = None) -> nn.Module:
    """Load ``sd`` into a meta-built ``module`` (assign=True); name missing/unexpected keys."""
    own = module.state_dict()
    problems = key_problems(own, sd, harmless=harmless)
    if problems:
        raise CheckpointError(f"{path}: the {what} weights do not fit the {what} architecture: " + "; ".join(problems))
    tensors = {k: _aligned(v.to(dtype or own[k].dtype) if v.is_floating_point() else v)
               for k, v in sd.items() if k in own}
    module.load_state_dict(tensors, strict=False, assign=True)
    # non-persistent buffers built on meta need real storage
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"{path}: buffer {name} of the {what} was not loaded")
    return module


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # Tensors memory-mapped from a safetensors file can start at any byte; CPU kernels then take
    # other SIMD paths and round differently from the same weights in fresh memory. Copy those.
    return t.clone() if t.data_ptr() % 64 else t


def _meta(factory):
    with torch.device("meta"):
        return factory()


def _unet_config(params: dict) -> UNetConfig:
    fields = UNetConfig.__dataclass_fields__
    return UNetConfig(**{k: v for k, v in params.items() if k in fields})


def infer_model_config(ckpt: Checkpoint, layout: detect.Layout, parameterization: str | None = None) -> ModelConfig:
    """The stored config if the file has one, else one inferred from the tensor shapes."""
    stored = ckpt.config
    if stored is not None:
        cfg = config_from_json(stored)
    else:
        sd = ckpt.state_dict
        try:
            unet = _unet_config(detect.infer_unet_params(detect.strip_prefix(sd, layout.unet)))
            vae = detect.infer_vae_config(detect.strip_prefix(sd, layout.vae))
            text = _text_sd_and_config(sd, layout, ckpt.path)[1]
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot infer the model architecture from its weights ({e})") from None
        cfg = ModelConfig(name=f"checkpoint:{Path(ckpt.path).name}", unet=unet, vae=vae, text=text)
    if parameterization:
        cfg = cfg.with_(schedule=ScheduleConfig(parameterization=parameterization))
    return cfg


def _text_sd_and_config(sd, layout: detect.Layout, path) -> tuple[dict, TextEncoderConfig]:
    if layout.text is None:
        raise CheckpointError(f"{path}: no text encoder found (cond_stage_model.*)")
    tsd = detect.strip_prefix(sd, layout.text)
    kind = layout.text_kind
    if kind == "clip-old":
        tsd = {"text_model." + k: v for k, v in tsd.items()}
        kind = "clip"
    return tsd, detect.infer_text_config(tsd, kind)


def load_base(path, config: ModelConfig | None = None, parameterization: str | None = None,
              dtype: torch.dtype = torch.float32) -> BaseModels:
    """Load a single-file SD checkpoint (or a control_sd15_* file, or a diffusers folder) on the CPU."""
    path = Path(path)
    if path.is_dir():
        from ctrlnet.checkpoints.diffusers_folder import load_diffusers_base

        return load_diffusers_base(path, dtype=dtype, parameterization=parameterization)
    ckpt = read_checkpoint(path)
    layout = detect.detect_layout(ckpt.state_dict)
    missing = [n for n, p in (("UNet", layout.unet), ("VAE", layout.vae), ("text encoder", layout.text)) if p is None]
    if missing:
        hint = " It looks like a ControlNet-only file; pass it as a ControlNet, not a base model." if layout.control is not None else ""
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no {', '.join(missing)} weights found).{hint}")
    cfg = config or infer_model_config(ckpt, layout, parameterization)
    sd = ckpt.state_dict
    unet = load_into(_meta(lambda: UNetModel(**cfg.unet.kwargs())), detect.strip_prefix(sd, layout.unet),
                     "UNet", path, dtype=dtype)
    vae = load_into(_meta(lambda: AutoencoderKL(**cfg.vae.kwargs())), detect.strip_prefix(sd, layout.vae),
                    "VAE", path, harmless=VAE_HARMLESS, dtype=dtype)
    tsd, _ = _text_sd_and_config(sd, layout, path)
    text = load_into(build_text_encoder(cfg.text, device="meta"), tsd, "text encoder", path,
                     harmless=TEXT_HARMLESS, dtype=dtype)
    return BaseModels(cfg, unet.eval(), vae.eval(), text.eval(), str(path))


def controlnet_state_dict(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """The ControlNet part of a file (our layout, no prefix) and its constructor params."""
    sd = ckpt.state_dict
    layout = detect.detect_layout(sd)
    if layout.control is None:
        kind = "a Stable Diffusion base checkpoint" if layout.unet else "not a ControlNet"
        raise CheckpointError(f"{ckpt.path}: no ControlNet weights found ({kind})")
    if layout.diffusers_control:
        from ctrlnet.checkpoints import diffusers_unet as du

        params = _diffusers_control_params(sd)
        return du.from_diffusers(sd, params, "controlnet"), params
    csd = detect.strip_prefix(sd, layout.control) if layout.control else dict(sd)
    stored = ckpt.config
    if stored is not None:
        hint_channels = csd["input_hint_block.0.weight"].shape[1]
        params = config_from_json(stored).unet.kwargs()
        params.pop("out_channels")
        params["hint_channels"] = hint_channels
    else:
        try:
            params = detect.infer_unet_params(csd, kind="controlnet")
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot infer the ControlNet architecture ({e})") from None
    return csd, params


def _diffusers_control_params(sd) -> dict:
    # A bare diffusers ControlNet file has no config; rebuild one via our own layout inference.
    from ctrlnet.checkpoints import diffusers_unet as du

    mc = sd["conv_in.weight"].shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
    chans = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in blocks]
    types = ["CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in sd else "DownBlock2D" for i in blocks]
    ctx = sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    lpb = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
    cfg = dict(block_out_channels=chans, down_block_types=types, cross_attention_dim=ctx, layers_per_block=lpb,
               in_channels=sd["conv_in.weight"].shape[1],
               conditioning_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
               use_linear_projection=sd["mid_block.attentions.0.proj_in.weight"].ndim == 2,
               attention_head_dim=8 if ctx == 768 else [c // 64 for c in chans])
    del mc
    return du.params_from_diffusers(cfg, "controlnet")


def check_fits(params: Mapping, base: ModelConfig, path) -> None:
    """Refuse a ControlNet whose encoder cannot pair with the base UNet, saying why."""
    u = base.unet
    checks = [
        ("context_dim", params.get("context_dim"), u.context_dim,
         "text context width (768 = SD1.x, 1024 = SD2.x)"),
        ("model_channels", params.get("model_channels"), u.model_channels, "UNet width"),
        ("channel_mult", tuple(params.get("channel_mult", ())), tuple(u.channel_mult), "UNet levels"),
        ("in_channels", params.get("in_channels"), u.in_channels, "latent channels"),
        ("use_linear_in_transformer", params.get("use_linear_in_transformer"), u.use_linear_in_transformer,
         "transformer projection type (linear = SD2.x)"),
    ]
    for name, got, want, what in checks:
        if got != want:
            fam = {768: "SD1.x", 1024: "SD2.x"}
            extra = ""
            if name == "context_dim":
                extra = f" (a {fam.get(got, str(got))} ControlNet on a {fam.get(want, str(want))} base)"
            raise CheckpointError(
                f"{path}: this ControlNet does not fit the base model: {what} differs, "
                f"{name}={got} in the ControlNet vs {want} in the base{extra}"
            )


def load_controlnet(path, base: ModelConfig | None = None, dtype: torch.dtype = torch.float32) -> ControlNet:
    """Load a ControlNet from a control-only file, a control_sd15_* file or a diffusers folder/file."""
    path = Path(path)
    if path.is_dir():
        from ctrlnet.checkpoints.diffusers_folder import load_diffusers_controlnet

        return load_diffusers_controlnet(path, base=base, dtype=dtype)
    ckpt = read_checkpoint(path)
    csd, params = controlnet_state_dict(ckpt)
    if base is not None:
        check_fits(params, base, path)
        # head counts cannot be read from weights: take them from the base it runs with
        params.update(num_heads=base.unet.num_heads, num_head_channels=base.unet.num_head_channels)
    net = load_into(_meta(lambda: ControlNet(**params)), csd, "ControlNet", path, dtype=dtype)
    return net.eval()
