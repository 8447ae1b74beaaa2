"""Key maps between our VAE (= original ``first_stage_model.*`` names) and diffusers' AutoencoderKL.

Differences handled:

- ``down.{i}.block.{j}`` <-> ``down_blocks.{i}.resnets.{j}``; ``down.{i}.downsample.conv`` <->
  ``down_blocks.{i}.downsamplers.0.conv``; ``*.attn.{j}`` <-> ``*.attentions.{j}``;
- decoder levels run the other way: ``decoder.up.{i}`` <-> ``decoder.up_blocks.{n-1-i}``, and
  ``up.{i}.upsample.conv`` <-> ``up_blocks.{n-1-i}.upsamplers.0.conv``;
- ``mid.block_{1,2}`` <-> ``mid_block.resnets.{0,1}``, ``mid.attn_1`` <-> ``mid_block.attentions.0``;
- ``nin_shortcut`` <-> ``conv_shortcut``, ``norm_out`` <-> ``conv_norm_out``;
- attention: ``norm/q/k/v/proj_out`` (1x1 conv weights, 4-D) <-> ``group_norm/to_q/to_k/to_v/to_out.0``
  (linear weights, 2-D). Reading also accepts the pre-0.14 diffusers names
  ``query/key/value/proj_attn`` and 4-D attention weights.
"""

from __future__ import annotations

import re

import torch

# our attention sub-module -> (new diffusers name, old diffusers name)
_ATTN = {"norm": ("group_norm", "group_norm"), "q": ("to_q", "query"), "k": ("to_k", "key"),
         "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn")}
_ATTN_FROM_DIFFUSERS = {new: ours for ours, (new, _) in _ATTN.items()}
_ATTN_FROM_DIFFUSERS.update({old: ours for ours, (_, old) in _ATTN.items()})
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_RESNET_FROM_DIFFUSERS = {v: k for k, v in _RESNET.items()}
_ATTN_TO_DIFFUSERS = {ours: new for ours, (new, _) in _ATTN.items()}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_TOP_FROM_DIFFUSERS = {v: k for k, v in _TOP.items()}
_PLAIN = ("quant_conv.", "post_quant_conv.")


def _num_levels(keys, pattern: str) -> int:
    """Number of decoder levels (needed to reverse their order); 0 without decoder keys."""
    return max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1) + 1


def _sub(mapping: dict[str, str], rest: str) -> tuple[str, str]:
    """Split ``rest`` into a leading module name found in ``mapping`` and the remaining suffix."""
    for name in sorted(mapping, key=len, reverse=True):  # longest first: no name shadows a longer one
        if rest.startswith(name + "."):
            return mapping[name], rest[len(name) + 1:]
    raise KeyError(rest)


def _is_attn_linear(ours_name: str, suffix: str) -> bool:
    """Attention projections are 1x1 convs for us and linear layers in diffusers."""
    return suffix == "weight" and ours_name in ("q", "k", "v", "proj_out")


def _key_to_diffusers(key: str, n: int) -> tuple[str, bool]:
    """Our key -> (diffusers key, whether the tensor is an attention weight to flatten to 2-D)."""
    if key.startswith(_PLAIN):
        return key, False
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(key)
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", rest)
    if m:
        kind, i, part, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        blk = f"down_blocks.{i}" if kind == "down" else f"up_blocks.{n - 1 - i}"
        if part in ("downsample", "upsample"):
            return f"{side}.{blk}.{part}rs.0.{tail}", False
        j, _, tail = tail.partition(".")
        if part == "block":
            name, suffix = _sub(_RESNET, tail)
            return f"{side}.{blk}.resnets.{j}.{name}.{suffix}", False
        name, suffix = _sub(_ATTN_TO_DIFFUSERS, tail)
        is_attn = _is_attn_linear(tail.partition(".")[0], suffix)
        return f"{side}.{blk}.attentions.{j}.{name}.{suffix}", is_attn
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest)
    if m:
        part, tail = m.groups()
        if part == "attn_1":
            name, suffix = _sub(_ATTN_TO_DIFFUSERS, tail)
            return (f"{side}.mid_block.attentions.0.{name}.{suffix}",
                    _is_attn_linear(tail.partition(".")[0], suffix))
        name, suffix = _sub(_RESNET, tail)
        return f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{name}.{suffix}", False
    name, suffix = _sub(_TOP, rest)
    return f"{side}.{name}.{suffix}", False


def _key_from_diffusers(key: str, n: int) -> tuple[str, bool]:
    """Diffusers key (either attention naming) -> (our key, whether it is an attention weight)."""
    if key.startswith(_PLAIN):
        return key, False
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(key)
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers\.0|upsamplers\.0)\.(.+)", rest
    )
    if m:
        kind, i, part, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        lvl = f"down.{i}" if kind == "down" else f"up.{n - 1 - i}"
        if part.endswith("samplers.0"):
            return f"{side}.{lvl}.{part[:-len('rs.0')]}.{tail}", False
        j, _, tail = tail.partition(".")
        if part == "resnets":
            name, suffix = _sub(_RESNET_FROM_DIFFUSERS, tail)
            return f"{side}.{lvl}.block.{j}.{name}.{suffix}", False
        name, suffix = _sub(_ATTN_FROM_DIFFUSERS, tail)
        return f"{side}.{lvl}.attn.{j}.{name}.{suffix}", _is_attn_linear(name, suffix)
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        part, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions" and j == 0:
            name, suffix = _sub(_ATTN_FROM_DIFFUSERS, tail)
            return f"{side}.mid.attn_1.{name}.{suffix}", _is_attn_linear(name, suffix)
        if part == "resnets" and j in (0, 1):
            name, suffix = _sub(_RESNET_FROM_DIFFUSERS, tail)
            return f"{side}.mid.block_{j + 1}.{name}.{suffix}", False
        raise KeyError(key)
    name, suffix = _sub(_TOP_FROM_DIFFUSERS, rest)
    return f"{side}.{name}.{suffix}", False


def _convert(sd: dict[str, torch.Tensor], fn, n: int, to_2d: bool) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        try:
            new, is_attn = fn(key, n)
        except KeyError:
            unknown.append(key)
            continue
        if is_attn:
            # 1x1 conv (O, I, 1, 1) and linear (O, I) hold the same numbers.
            value = value.reshape(value.shape[0], value.shape[1]) if to_2d else \
                value.reshape(value.shape[0], value.shape[1], 1, 1)
        if new in out:
            raise ValueError(f"two keys map to {new!r} (is {key!r} present in both attention namings?)")
        out[new] = value
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(f"{len(unknown)} VAE keys have no mapping: {shown}")
    return out


def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our/original VAE state dict (no ``first_stage_model.`` prefix) -> diffusers AutoencoderKL keys
    (current naming: ``to_q``/``to_k``/``to_v``/``to_out.0`` with 2-D weights)."""
    n = _num_levels(sd, r"decoder\.up\.(\d+)\.")
    return _convert(sd, _key_to_diffusers, n, to_2d=True)


def vae_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict (either attention naming) -> our/original VAE keys."""
    n = _num_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    return _convert(sd, _key_from_diffusers, n, to_2d=False)


def diffusers_vae_config(cfg) -> dict:
    """The ``diffusers.AutoencoderKL`` constructor arguments equal to a ``VAEConfig``.

    Attention inside the levels (``attn_resolutions``) selects the ``Attn*`` block types at the
    same levels. Diffusers uses one ``latent_channels`` for ``z_channels`` and ``embed_dim``.
    """
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    n = len(cfg.ch_mult)
    attn_levels = [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(n)]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D"
                               for a in attn_levels),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                             for a in reversed(attn_levels)),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
        scaling_factor=cfg.scale_factor,
    )
