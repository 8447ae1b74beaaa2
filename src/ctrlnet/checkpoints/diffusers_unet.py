"""Key and config conversion between our UNet/ControlNet and diffusers' ``UNet2DConditionModel`` /
``ControlNetModel``.

The map is computed from the architecture parameters, block by block, so it holds for any
SD-layout config (SD1.x, SD2.x, our tiny and demo models), not only for 320-channel ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}


def _levels(params: Mapping) -> tuple[list[int], list[bool]]:
    mult = list(params["channel_mult"])
    nrb = params["num_res_blocks"]
    nrb = [nrb] * len(mult) if isinstance(nrb, int) else list(nrb)
    attn = [2**i in tuple(params["attention_resolutions"]) for i in range(len(mult))]
    return nrb, attn


def module_map(params: Mapping, kind: str = "unet") -> dict[str, str]:
    """Our module prefix -> diffusers module prefix, for ``kind`` "unet" or "controlnet"."""
    nrb, attn = _levels(params)
    n_levels = len(nrb)
    m: dict[str, str] = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
    }
    idx = 1
    for level in range(n_levels):
        for j in range(nrb[level]):
            m[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.resnets.{j}"
            if attn[level]:
                m[f"input_blocks.{idx}.1"] = f"down_blocks.{level}.attentions.{j}"
            idx += 1
        if level != n_levels - 1:
            m[f"input_blocks.{idx}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            idx += 1
    n_inputs = idx
    if kind == "unet":
        m["out.0"] = "conv_norm_out"
        m["out.2"] = "conv_out"
        idx = 0
        for up, level in enumerate(reversed(range(n_levels))):
            for j in range(nrb[level] + 1):
                m[f"output_blocks.{idx}.0"] = f"up_blocks.{up}.resnets.{j}"
                sub = 1
                if attn[level]:
                    m[f"output_blocks.{idx}.1"] = f"up_blocks.{up}.attentions.{j}"
                    sub = 2
                if level and j == nrb[level]:
                    m[f"output_blocks.{idx}.{sub}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
                idx += 1
    elif kind == "controlnet":
        m["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
        for k in range(6):
            m[f"input_hint_block.{2 * k + 2}"] = f"controlnet_cond_embedding.blocks.{k}"
        m["input_hint_block.14"] = "controlnet_cond_embedding.conv_out"
        for k in range(n_inputs):
            m[f"zero_convs.{k}.0"] = f"controlnet_down_blocks.{k}"
        m["middle_block_out.0"] = "controlnet_mid_block"
    else:
        raise ValueError(f"kind must be 'unet' or 'controlnet', not {kind!r}")
    return m


def _convert_key(key: str, prefixes: dict[str, str], resnet: dict[str, str]) -> str | None:
    # Longest matching module prefix wins; inner ResBlock names are renamed in a second step.
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            tail = ".".join(parts[cut:])
            for a, b in resnet.items():
                if tail.startswith(a + "."):
                    tail = b + tail[len(a):]
                    break
            return f"{prefixes[head]}.{tail}"
    return None


def _rename_all(sd: Mapping[str, torch.Tensor], prefixes: dict[str, str], resnet: dict[str, str],
                what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for k, v in sd.items():
        nk = _convert_key(k, prefixes, resnet)
        if nk is None:
            unknown.append(k)
        else:
            out[nk] = v
    if unknown:
        raise KeyError(f"{what}: {unknown[:10]}")
    return out


def to_diffusers(sd: Mapping[str, torch.Tensor], params: Mapping, kind: str = "unet") -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers keys. Raises on any key the map does not cover."""
    return _rename_all(sd, module_map(params, kind), _RESNET, "keys with no diffusers equivalent")


def from_diffusers(sd: Mapping[str, torch.Tensor], params: Mapping, kind: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers keys -> our state dict. Raises on any key the map does not cover."""
    prefixes = {v: k for k, v in module_map(params, kind).items()}
    resnet = {v: k for k, v in _RESNET.items()}
    return _rename_all(sd, prefixes, resnet, "diffusers keys with no equivalent in our layout")


def diffusers_config(params: Mapping, kind: str = "unet") -> dict:
    """A diffusers ``config.json`` dict equivalent to our constructor ``params``."""
    nrb, attn = _levels(params)
    mc = params["model_channels"]
    chans = [mc * m for m in params["channel_mult"]]
    nh, nhc = params.get("num_heads", -1), params.get("num_head_channels", -1)
    # diffusers calls the number of heads "attention_head_dim" (a historical misnomer).
    heads = [c // nhc for c in chans] if nhc != -1 else nh
    if params.get("legacy", False) and nhc != -1:
        raise ValueError("legacy=True with num_head_channels has no diffusers equivalent")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg = dict(
        in_channels=params["in_channels"],
        down_block_types=down,
        block_out_channels=chans,
        layers_per_block=nrb[0] if len(set(nrb)) == 1 else nrb,
        cross_attention_dim=params["context_dim"],
        attention_head_dim=heads,
        use_linear_projection=bool(params.get("use_linear_in_transformer", False)),
        transformer_layers_per_block=params.get("transformer_depth", 1),
        norm_num_groups=params.get("norm_num_groups", 32),
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        only_cross_attention=False,
        upcast_attention=False,
    )
    if kind == "unet":
        cfg.update(
            _class_name="UNet2DConditionModel",
            sample_size=params.get("image_size", 32) * 2,
            out_channels=params["out_channels"],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            center_input_sample=False,
        )
    else:
        cfg.update(
            _class_name="ControlNetModel",
            conditioning_embedding_out_channels=[16, 32, 96, 256],
            conditioning_channels=params["hint_channels"],
            controlnet_conditioning_channel_order="rgb",
        )
    return cfg


# diffusers config fields that change the network but that our SD layout does not model, with the
# values every SD1.x/SD2.x config has (None = field absent is fine too). A config with another
# value is refused naming the field, rather than loaded into a network that computes otherwise.
_FIXED_FIELDS = {
    "norm_eps": (1e-5,), "act_fn": ("silu",), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
    "class_embed_type": (None,), "addition_embed_type": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_class_embeds": (None,), "projection_class_embeddings_input_dim": (None,),
    "dual_cross_attention": (False,), "only_cross_attention": (False, [False]), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "center_input_sample": (False,),
    "time_embedding_dim": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "addition_time_embed_dim": (None,), "reverse_transformer_layers_per_block": (None,),
}


def check_supported(cfg: Mapping) -> None:
    """Refuse a diffusers UNet/ControlNet config whose fields would change the network beyond the
    SD layout (``ValueError`` naming the first such field and its value)."""
    for name, ok in _FIXED_FIELDS.items():
        if name in cfg and cfg[name] not in ok:
            raise ValueError(f"{name}={cfg[name]!r} is not supported (SD1.x/SD2.x use {ok[0]!r})")
    groups = cfg.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"norm_num_groups={groups!r} is not supported (a positive group count is needed)")
    bad = [c for c in cfg.get("block_out_channels", ()) if c % groups]
    if bad:
        raise ValueError(f"norm_num_groups={groups} does not divide block_out_channels {bad}")


def params_from_diffusers(cfg: Mapping, kind: str = "unet") -> dict:
    """Our constructor params from a diffusers ``config.json`` dict (``norm_num_groups`` carried;
    fields outside the SD layout refused by :func:`check_supported`)."""
    check_supported(cfg)
    chans = list(cfg["block_out_channels"])
    mc = chans[0]
    if any(c % mc for c in chans):
        raise ValueError(f"block_out_channels {chans} are not multiples of the first")
    attn_res = tuple(2**i for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        # per-level heads: SD2 style, a constant head width
        widths = {c // h for c, h in zip(chans, heads)}
        if len(widths) != 1:
            raise ValueError(f"attention heads {heads} are not a constant head width")
        nh, nhc = -1, widths.pop()
    else:
        nh, nhc = int(heads), -1
    ctx = cfg["cross_attention_dim"]
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ValueError("per-level transformer depth is not supported")
        depth = depth[0]
    p = dict(
        in_channels=cfg.get("in_channels", 4),
        model_channels=mc,
        attention_resolutions=attn_res,
        num_res_blocks=cfg.get("layers_per_block", 2),
        channel_mult=tuple(c // mc for c in chans),
        num_heads=nh,
        num_head_channels=nhc,
        use_spatial_transformer=True,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        transformer_depth=depth,
        context_dim=ctx,
        legacy=False,
        norm_num_groups=cfg.get("norm_num_groups", 32),
    )
    if kind == "unet":
        p["out_channels"] = cfg.get("out_channels", 4)
    else:
        p["hint_channels"] = cfg.get("conditioning_channels", 3)
    return p
