"""The modules a training run works on: build them from a config, load them from files, pick
which parameters train (the original tiers), and export the result in our file layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ctrlnet.checkpoints.save import PREFIXES, save_model_file
from ctrlnet.config import ModelConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import TextEncoder, build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL

Mode = Literal["controlnet", "base", "vae"]


@dataclass
class TrainModels:
    """UNet, VAE, text encoder and (for ControlNet training) the ControlNet, with their config."""

    config: ModelConfig
    unet: UNetModel | None
    vae: AutoencoderKL | None
    text: TextEncoder | None
    controlnet: ControlNet | None = None

    def modules(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae, "text": self.text, "controlnet": self.controlnet}
        return {k: m for k, m in parts.items() if m is not None}


def build_models(config: ModelConfig, seed: int = 0, with_controlnet: bool = False) -> TrainModels:
    """Randomly initialised models of ``config`` (base-model training from scratch)."""
    torch.manual_seed(seed)
    unet = UNetModel(**config.unet.kwargs())
    vae = AutoencoderKL(**config.vae.kwargs())
    text = build_text_encoder(config.text, device="cpu")
    cn = ControlNet.from_unet(unet, config.hint_channels) if with_controlnet else None
    return TrainModels(config, unet, vae, text, cn)


def load_models(base, controlnet=None, add_control: bool = True, seed: int | None = None) -> TrainModels:
    """Load a base checkpoint and either a ControlNet file (to resume) or a fresh copy of the
    UNet encoder (``add_control``, the original ``tool_add_control.py``). The fresh copy's hint
    block starts random: from ``seed`` when given (the same run in another process starts from
    the same weights), else from the global generator, which is left as it was either way."""
    from ctrlnet.checkpoints.load import load_base, load_controlnet

    b = load_base(base)
    if controlnet is not None:
        cn = load_controlnet(controlnet, base=b.config)
    elif add_control and seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cn = ControlNet.from_unet(b.unet, b.config.hint_channels)
    elif add_control:
        cn = ControlNet.from_unet(b.unet, b.config.hint_channels)
    else:
        cn = None
    return TrainModels(b.config, b.unet, b.vae, b.text_encoder, cn)


def load_model_file(path, with_controlnet: bool = False) -> TrainModels:
    """Rebuild the models of a file we wrote (config from its ``ctrlnet_config`` metadata); every
    part present in the file must load completely (strict)."""
    from safetensors.torch import load_file

    from ctrlnet.checkpoints.save import read_config

    config = read_config(path)
    if config is None:
        raise ValueError(f"{path} has no {'ctrlnet_config'} metadata; load it with ctrlnet.checkpoints")
    sd = load_file(str(path))
    models = TrainModels(config, None, None, None)
    builders = {
        "unet": lambda: UNetModel(**config.unet.kwargs()),
        "vae": lambda: AutoencoderKL(**config.vae.kwargs()),
        "text": lambda: build_text_encoder(config.text, device="cpu"),
        "controlnet": lambda: ControlNet(hint_channels=config.hint_channels,
                                         **{k: v for k, v in config.unet.kwargs().items() if k != "out_channels"}),
    }
    for part, prefix in PREFIXES.items():
        sub = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        if not sub:
            continue
        module = builders[part]()
        module.load_state_dict(sub, strict=True)
        setattr(models, part, module)
    if with_controlnet and models.controlnet is None:
        models.controlnet = ControlNet.from_unet(models.unet, config.hint_channels)
    return models


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch the ``use_checkpoint`` flag of every block (ResBlock, transformer blocks)."""
    for m in module.modules():
        if hasattr(m, "use_checkpoint"):
            m.use_checkpoint = enabled


def select_trainable(models: TrainModels, mode: Mode, sd_locked: bool = True, only_mid_control: bool = False,
                     train_text: bool = True, train_encoder: bool = True) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` per the training tier and return the trainable parameters by name.

    - ``controlnet``: the ControlNet (as ``ControlLDM.configure_optimizers``); with
      ``sd_locked=False`` also the UNet's ``output_blocks`` and ``out``. With ``only_mid_control``
      the encoder-side zero convs feed nothing, so they stay frozen (they would get no gradient).
    - ``base``: the UNet, and the text encoder when ``train_text``.
    - ``vae``: the autoencoder; without ``train_encoder`` only ``post_quant_conv`` and the decoder.
    """
    for m in models.modules().values():
        m.requires_grad_(False)
    chosen: dict[str, nn.Parameter] = {}

    def take(prefix: str, module: nn.Module, skip: tuple[str, ...] = ()):
        for n, p in module.named_parameters():
            if n.startswith(skip):
                continue
            p.requires_grad_(True)
            chosen[prefix + n] = p

    if mode == "controlnet":
        if models.controlnet is None:
            raise ValueError("ControlNet training needs a ControlNet (add-control or resume one)")
        take("controlnet.", models.controlnet, ("zero_convs.",) if only_mid_control else ())
        if not sd_locked:
            take("unet.output_blocks.", models.unet.output_blocks)
            take("unet.out.", models.unet.out)
    elif mode == "base":
        take("unet.", models.unet)
        if train_text:
            take("text.", models.text)
    elif mode == "vae":
        if train_encoder:
            take("vae.", models.vae)
        else:
            take("vae.post_quant_conv.", models.vae.post_quant_conv)
            take("vae.decoder.", models.vae.decoder)
    else:
        raise ValueError(f"unknown training mode {mode!r}; use controlnet, base or vae")
    return chosen


def export_models(models: TrainModels, path, mode: Mode, sd_locked: bool = True,
                  dtype: torch.dtype | None = None, metadata: dict | None = None,
                  overrides: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the trained parts in the single-file layout with the config in the metadata.

    ControlNet runs write ``control_model.*`` (plus the UNet when it was unlocked); base and VAE
    runs write the whole model. ``overrides`` replaces a part's state dict (EMA weights).
    """
    overrides = overrides or {}

    def sd(part: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return overrides.get(part) or module.state_dict()

    parts: dict[str, dict[str, torch.Tensor]] = {}
    if mode == "controlnet":
        parts[PREFIXES["controlnet"]] = sd("controlnet", models.controlnet)
        if not sd_locked:
            parts[PREFIXES["unet"]] = sd("unet", models.unet)
    else:
        for part, module in models.modules().items():
            if part != "controlnet":
                if models.config.text.kind == "openclip" and part == "text":
                    parts["cond_stage_model.model."] = sd(part, module)
                else:
                    parts[PREFIXES[part]] = sd(part, module)
    return save_model_file(path, parts, models.config, metadata, dtype=dtype)
