"""The Stable Diffusion UNet (``model.diffusion_model.*``) that adds ControlNet residuals.

``UNetModel(**params)`` takes the ``unet_config.params`` of the original ``cldm_v15.yaml`` /
``cldm_v21.yaml``. The encoder half (``time_embed``, ``input_blocks``, ``middle_block``) is built by
:func:`build_encoder`, which the ControlNet shares, so the trainable copy has the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrlnet.models.layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)

# Keys of the original yaml params that we accept but that change nothing for SD1.x/SD2.x.
_IGNORED = {"image_size", "use_fp16", "conv_resample", "dims", "num_heads_upsample"}
_UNSUPPORTED_DEFAULTS = {
    "use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
    "n_embed": None, "disable_self_attentions": None, "num_attention_blocks": None,
    "disable_middle_self_attn": False,
}


def check_extra_params(cls_name: str, extra: dict) -> None:
    """Accept the original yaml's no-op params; refuse ones that would change the network."""
    for k, v in extra.items():
        if k in _IGNORED:
            continue
        if k in _UNSUPPORTED_DEFAULTS:
            if v != _UNSUPPORTED_DEFAULTS[k] and v not in ((), []):
                raise ValueError(f"{cls_name}: {k}={v!r} is not supported (only SD1.x/SD2.x layouts)")
            continue
        raise TypeError(f"{cls_name}: unexpected parameter {k!r}")


def attention_heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool) -> tuple[int, int]:
    """(heads, dim_head) for a block of ``ch`` channels, following the original rules."""
    if num_head_channels == -1:
        if num_heads <= 0:
            raise ValueError("either num_heads or num_head_channels must be set")
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads
    return heads, dim_head


class Encoder(nn.Module):
    """``time_embed`` + ``input_blocks`` + ``middle_block``: the half that ControlNet copies."""

    def __init__(self, in_channels: int, model_channels: int, attention_resolutions: Sequence[int],
                 num_res_blocks: int | Sequence[int], channel_mult: Sequence[int], num_heads: int = -1,
                 num_head_channels: int = -1, use_spatial_transformer: bool = True,
                 use_linear_in_transformer: bool = False, transformer_depth: int = 1,
                 context_dim: int | None = None, legacy: bool = True, use_checkpoint: bool = False,
                 dropout: float = 0.0, norm_num_groups: int = 32):
        super().__init__()
        # GroupNorm group count of every norm (32 in all SD checkpoints; diffusers configs may differ)
        self.norm_num_groups = norm_num_groups
        if not use_spatial_transformer or context_dim is None:
            raise ValueError("only the SD layout (use_spatial_transformer=True with context_dim) is supported")
        if isinstance(context_dim, (list, tuple)):
            context_dim = context_dim[0]
        nrb = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(nrb) != len(channel_mult):
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        self.model_channels = model_channels
        self.num_res_blocks = nrb
        self.channel_mult = tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint
        self._attn = dict(num_heads=num_heads, num_head_channels=num_head_channels, legacy=legacy,
                          depth=transformer_depth, context_dim=context_dim, use_linear=use_linear_in_transformer,
                          use_checkpoint=use_checkpoint)
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        self.input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(nrb[level]):
                layers: list[nn.Module] = [
                    ResBlock(ch, emb_dim, dropout, mult * model_channels, use_checkpoint, norm_num_groups)
                ]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self.make_attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, use_checkpoint=use_checkpoint, norm_groups=norm_num_groups),
            self.make_attention(ch),
            ResBlock(ch, emb_dim, dropout, use_checkpoint=use_checkpoint, norm_groups=norm_num_groups),
        )
        self.out_ch = ch
        self.out_ds = ds

    def make_attention(self, ch: int) -> SpatialTransformer:
        a = self._attn
        heads, dim_head = attention_heads(ch, a["num_heads"], a["num_head_channels"], a["legacy"])
        return SpatialTransformer(ch, heads, dim_head, depth=a["depth"], context_dim=a["context_dim"],
                                  use_linear=a["use_linear"], use_checkpoint=a["use_checkpoint"],
                                  norm_groups=self.norm_num_groups)

    def config_params(self) -> dict:
        """The constructor arguments, to build a twin (e.g. ``ControlNet.from_unet``)."""
        return dict(self._params)

    def embed_time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)  # (B, C)
        return self.time_embed(t_emb)  # (B, 4C)


class UNetModel(Encoder):
    """The locked SD UNet; ``forward`` adds ControlNet residuals like ``ControlledUnetModel``."""

    def __init__(self, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_res_blocks: int | Sequence[int] = 2,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_heads: int = -1, num_head_channels: int = -1,
                 use_spatial_transformer: bool = True, use_linear_in_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | None = 768, legacy: bool = True,
                 use_checkpoint: bool = False, dropout: float = 0.0, norm_num_groups: int = 32, **extra):
        check_extra_params("UNetModel", extra)
        params = {k: v for k, v in locals().items() if k not in ("self", "extra", "__class__")}
        super().__init__(in_channels, model_channels, attention_resolutions, num_res_blocks, channel_mult,
                         num_heads, num_head_channels, use_spatial_transformer, use_linear_in_transformer,
                         transformer_depth, context_dim, legacy, use_checkpoint, dropout, norm_num_groups)
        self._params = params
        self.in_channels = in_channels
        self.out_channels = out_channels
        emb_dim = model_channels * 4
        chans = list(self.input_block_chans)
        ch, ds = self.out_ch, self.out_ds
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = chans.pop()
                layers: list[nn.Module] = [
                    ResBlock(ch + ich, emb_dim, dropout, model_channels * mult, use_checkpoint, norm_num_groups)
                ]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self.make_attention(ch))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch, norm_num_groups), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    @property
    def num_control_residuals(self) -> int:
        return len(self.input_blocks) + 1

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: Sequence[torch.Tensor] | None = None, only_mid_control: bool = False) -> torch.Tensor:
        """Predict eps (or v) for latents ``x`` (B, C, h, w).

        ``control`` holds the ControlNet residuals in the original order: one per input block, then
        the middle block (13 for SD). They are added to the skip connections and the middle output.
        """
        if control is not None and len(control) != self.num_control_residuals:
            raise ValueError(f"expected {self.num_control_residuals} control residuals, got {len(control)}")
        emb = self.embed_time(timesteps, x.dtype)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1]
        for i, module in enumerate(self.output_blocks):
            skip = hs.pop()
            if control is not None and not only_mid_control:
                skip = skip + control[len(hs)]
            # latent sides that are not multiples of 8 (SD) round up on the way down: upsample to the
            # next skip's size so any multiple-of-8 image works
            h = module(torch.cat([h, skip], dim=1), emb, context, hs[-1].shape[-2:] if hs else None)
        return self.out(h)
