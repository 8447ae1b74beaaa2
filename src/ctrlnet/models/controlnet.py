"""ControlNet (``control_model.*``): a trainable copy of the UNet encoder joined by zero convolutions.

``ControlNet(**params)`` takes the ``control_stage_config.params`` of the original yaml files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrlnet.models.layers import TimestepEmbedSequential, zero_module
from ctrlnet.models.unet import Encoder, UNetModel, check_extra_params

# Channels of the hint encoder's convolutions; each stride-2 conv halves the size (3 of them: /8).
_HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
_HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


class ControlNet(Encoder):
    """Returns, for a hint image, the residuals the UNet adds: one per input block + the middle."""

    def __init__(self, in_channels: int = 4, hint_channels: int = 3, model_channels: int = 320,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_res_blocks: int | Sequence[int] = 2,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_heads: int = -1, num_head_channels: int = -1,
                 use_spatial_transformer: bool = True, use_linear_in_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | None = 768, legacy: bool = True,
                 use_checkpoint: bool = False, dropout: float = 0.0, norm_num_groups: int = 32, **extra):
        check_extra_params("ControlNet", extra)
        params = {k: v for k, v in locals().items() if k not in ("self", "extra", "__class__")}
        super().__init__(in_channels, model_channels, attention_resolutions, num_res_blocks, channel_mult,
                         num_heads, num_head_channels, use_spatial_transformer, use_linear_in_transformer,
                         transformer_depth, context_dim, legacy, use_checkpoint, dropout, norm_num_groups)
        self._params = params
        self.in_channels = in_channels
        self.hint_channels = hint_channels
        # input_hint_block: conv, SiLU, conv, SiLU, ... , zero conv (indices 0, 2, ..., 14 hold weights).
        layers: list[nn.Module] = []
        prev = hint_channels
        for ch, stride in zip(_HINT_CHANNELS, _HINT_STRIDES):
            layers += [nn.Conv2d(prev, ch, 3, padding=1, stride=stride), nn.SiLU()]
            prev = ch
        layers.append(zero_module(nn.Conv2d(prev, model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        self.zero_convs = nn.ModuleList([self._zero_conv(c) for c in self.input_block_chans])
        self.middle_block_out = self._zero_conv(self.out_ch)

    @staticmethod
    def _zero_conv(channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(nn.Conv2d(channels, channels, 1)))

    @property
    def num_control_residuals(self) -> int:
        return len(self.zero_convs) + 1

    def encode_hint(self, hint: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The hint encoder (``input_hint_block``) alone: (B, hint_channels, 8h, 8w) -> (B, model_channels,
        h, w) in ``dtype`` (default: the weights'). It depends on neither the latent nor the timestep,
        so a sampling loop computes it once per image and passes it to :meth:`forward` as
        ``guided_hint`` (the same numbers as running it every step)."""
        dtype = dtype or self.input_hint_block[0].weight.dtype
        return self.input_hint_block(hint.to(dtype), None, None)

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor,
                context: torch.Tensor, guided_hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals for the UNet, in the original order (input blocks 0..N-1, then middle).

        ``x``: noisy latents (B, C, h, w); ``hint``: control image (B, hint_channels, 8h, 8w) in [0, 1];
        or ``guided_hint``: :meth:`encode_hint`'s output for it, (B, model_channels, h, w) (``hint``
        is then not used and may be None).
        """
        if guided_hint is None:
            if hint is None:
                raise ValueError("ControlNet.forward needs a hint or its guided_hint")
            if hint.shape[-2] != x.shape[-2] * 8 or hint.shape[-1] != x.shape[-1] * 8:
                raise ValueError(
                    f"hint of size {tuple(hint.shape[-2:])} does not match latents {tuple(x.shape[-2:])} "
                    "(the hint must be 8x the latent size)"
                )
            guided_hint = self.encode_hint(hint, x.dtype)  # (B, C, h, w)
        elif guided_hint.shape[0] != x.shape[0] or guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"guided_hint {tuple(guided_hint.shape)} does not match latents {tuple(x.shape)}")
        emb = self.embed_time(timesteps, x.dtype)
        outs = []
        h = x
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs

    def weights_from_unet(self, unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet tensors this network starts from: every key it shares with the same shape."""
        own = self.state_dict()
        return {k: v for k, v in unet_sd.items() if k in own and own[k].shape == v.shape}

    @classmethod
    def from_unet(cls, unet: UNetModel, hint_channels: int = 3, **overrides) -> "ControlNet":
        """A new ControlNet whose encoder copies ``unet``'s weights (``tool_add_control.py``).

        Zero convs and the last hint conv start at zero, so the UNet's output is unchanged.
        """
        params = dict(unet.config_params())
        params.pop("out_channels")
        params.update(hint_channels=hint_channels, **overrides)
        net = cls(**params)
        p = next(unet.parameters())
        net.to(device=p.device, dtype=p.dtype)
        copied = net.weights_from_unet(unet.state_dict())
        missing = [k for k in net.state_dict() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))
                   and k not in copied]
        if missing:
            raise ValueError(f"UNet does not match the ControlNet encoder; missing {missing[:5]}")
        net.load_state_dict(copied, strict=False)
        return net
