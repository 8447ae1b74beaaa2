"""What a state dict holds, decided from sentinel keys (never from the file name), and the
architecture parameters its tensor shapes imply."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ctrlnet.config import TextEncoderConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

_HINT_SENTINEL = "input_hint_block.0.weight"
_DIFFUSERS_CONTROL_SENTINEL = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class Layout:
    """Which parts a checkpoint holds and under which key prefix."""

    unet: str | None = None  # prefix of the UNet keys
    control: str | None = None  # prefix of the ControlNet keys ("" for a bare control-only file)
    vae: str | None = None
    text: str | None = None
    text_kind: str | None = None  # "clip" | "openclip"
    diffusers_control: bool = False  # a diffusers-layout ControlNet in one file

    @property
    def kind(self) -> str:
        if self.diffusers_control:
            return "diffusers-controlnet"
        if self.unet is not None and self.control is not None:
            return "sd+control"
        if self.unet is not None:
            return "sd"
        if self.control is not None:
            return "control"
        return "unknown"


def detect_layout(sd: Mapping[str, torch.Tensor]) -> Layout:
    """Find the parts of an original-layout (or diffusers ControlNet) state dict."""
    if _DIFFUSERS_CONTROL_SENTINEL in sd:
        return Layout(control="", diffusers_control=True)
    unet = UNET_PREFIX if UNET_PREFIX + "input_blocks.0.0.weight" in sd else None
    control = None
    if CONTROL_PREFIX + _HINT_SENTINEL in sd:
        control = CONTROL_PREFIX
    elif _HINT_SENTINEL in sd:
        control = ""
    vae = VAE_PREFIX if VAE_PREFIX + "decoder.conv_in.weight" in sd else None
    text = kind = None
    if CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in sd:
        text, kind = CLIP_PREFIX, "clip"
    elif CLIP_PREFIX + "embeddings.token_embedding.weight" in sd:  # older transformers saved no text_model.
        text, kind = CLIP_PREFIX, "clip-old"
    elif OPENCLIP_PREFIX + "token_embedding.weight" in sd:
        text, kind = OPENCLIP_PREFIX, "openclip"
    return Layout(unet=unet, control=control, vae=vae, text=text, text_kind=kind)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with it removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_params(sd: Mapping[str, torch.Tensor], kind: str = "unet") -> dict:
    """UNet/ControlNet constructor params from a (prefix-stripped) state dict's shapes.

    Head counts are not visible in weights; they follow the SD families: 768-wide context ->
    8 heads (SD1), otherwise 64-channel heads (SD2). Files we write store the exact config.
    """
    w0 = sd["input_blocks.0.0.weight"]  # (C, in, 3, 3)
    mc, in_ch = w0.shape[0], w0.shape[1]
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")
    down = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    n_levels = len(down) + 1
    bounds = [0] + down + [max(blocks) + 1]
    nrb, mult, attn = [], [], []
    for level in range(n_levels):
        res = [i for i in blocks if bounds[level] < i < bounds[level + 1] and f"input_blocks.{i}.0.in_layers.2.weight" in sd]
        if not res:
            raise ValueError(f"cannot infer the UNet layout: level {level} has no ResBlocks")
        nrb.append(len(res))
        mult.append(sd[f"input_blocks.{res[0]}.0.in_layers.2.weight"].shape[0] // mc)
        if f"input_blocks.{res[0]}.1.proj_in.weight" in sd:
            attn.append(2**level)
    mid_t = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if mid_t not in sd:
        raise ValueError("cannot infer the UNet layout: no middle-block cross-attention found")
    context_dim = sd[mid_t].shape[1]
    use_linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    depth = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if context_dim == 768:
        heads, head_ch = 8, -1
    else:
        heads, head_ch = -1, 64
    p = dict(
        in_channels=in_ch, model_channels=mc, attention_resolutions=tuple(attn),
        num_res_blocks=nrb[0] if len(set(nrb)) == 1 else tuple(nrb), channel_mult=tuple(mult),
        num_heads=heads, num_head_channels=head_ch, use_spatial_transformer=True,
        use_linear_in_transformer=use_linear, transformer_depth=depth, context_dim=context_dim, legacy=False,
    )
    if kind == "unet":
        check_head_rule(p)
        out = sd.get("out.2.weight")
        p["out_channels"] = out.shape[0] if out is not None else in_ch  # a broken file is reported by the loader
    else:
        p["hint_channels"] = sd[_HINT_SENTINEL].shape[1]
    return p


def check_head_rule(p: dict) -> None:
    """Raise ValueError when the SD head rule that :func:`infer_unet_params` applied cannot fit the
    block widths (small custom models): better refused than built with zero-width heads."""
    mc, mult = p["model_channels"], p["channel_mult"]
    attn = p["attention_resolutions"]
    widths = sorted({mc * mult[lvl] for lvl in range(len(mult)) if 2**lvl in attn} | {mc * mult[-1]})
    unit = p["num_heads"] if p["num_head_channels"] == -1 else p["num_head_channels"]
    if any(w % unit or w < unit for w in widths):
        rule = f"{unit} heads" if p["num_head_channels"] == -1 else f"{unit}-channel heads"
        raise ValueError(
            f"attention head counts cannot be read from weights, and the SD rule for a {p['context_dim']}-wide "
            f"context ({rule}) does not fit the block widths {widths}; use a file with a stored config "
            "(ctrlnet convert ... --base) or a diffusers folder, or load it with its base model"
        )


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """VAE config from a (prefix-stripped) AutoencoderKL state dict."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    nrb = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    resolution = 256
    attn_res = tuple(resolution // 2**i for i in attn_levels)
    z2 = sd["encoder.conv_out.weight"].shape[0]
    z = sd["decoder.conv_in.weight"].shape[1]
    return VAEConfig(
        embed_dim=sd["quant_conv.weight"].shape[0] // 2, double_z=z2 == 2 * z, z_channels=z, resolution=resolution,
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch=ch, ch_mult=mult, num_res_blocks=nrb, attn_resolutions=attn_res,
    )


def infer_text_config(sd: Mapping[str, torch.Tensor], kind: str) -> TextEncoderConfig:
    """Text tower config from a (prefix-stripped) state dict; heads are width // 64 as in CLIP."""
    if kind == "clip":
        emb = sd["text_model.embeddings.token_embedding.weight"]
        pos = sd["text_model.embeddings.position_embedding.weight"]
        layers = len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\."))
        mlp = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        width = emb.shape[1]
        return TextEncoderConfig(kind="clip", vocab_size=emb.shape[0], max_length=pos.shape[0], width=width,
                                 layers=layers, heads=max(1, width // 64), mlp_ratio=mlp // width)
    if kind == "openclip":
        emb = sd["token_embedding.weight"]
        width = emb.shape[1]
        layers = len(_indices(sd, r"transformer\.resblocks\.(\d+)\."))
        mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        proj = sd.get("text_projection")
        return TextEncoderConfig(kind="openclip", vocab_size=emb.shape[0], max_length=sd["positional_embedding"].shape[0],
                                 width=width, layers=layers, heads=max(1, width // 64), mlp_ratio=mlp // width,
                                 act="gelu", layer="penultimate",
                                 projection_dim=proj.shape[1] if proj is not None else width)
    raise ValueError(f"unknown text encoder kind {kind!r}")
