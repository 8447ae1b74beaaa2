"""The Stable Diffusion autoencoder (``AutoencoderKL``, the ``first_stage_model``).

Module names equal the original checkpoint keys with ``first_stage_model.`` stripped
(``encoder.down.1.block.0.nin_shortcut.weight``, ``decoder.up.3.upsample.conv.bias``,
``encoder.mid.attn_1.q.weight``, ``quant_conv.weight`` ...), so an official file loads after a prefix
strip. The arithmetic follows ``ldm/modules/diffusionmodules/model.py``: GroupNorm(32, eps=1e-6),
SiLU, Downsample with (0, 1, 0, 1) zero padding before a stride-2 conv, nearest Upsample then conv,
single-head self-attention written as 1x1 convs (computed here with SDPA).

Latent convention (the one every other part of ctrlnet uses):

- images are float tensors ``(B, 3, H, W)`` in ``[-1, 1]``;
- ``encode`` returns the *unscaled* posterior (what the original ``encode`` returns);
- ``encode_latents`` returns *scaled* latents ``z * scale_factor`` (what the UNet sees);
- ``decode`` takes *scaled* latents and divides by ``scale_factor`` itself.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.runtime.tiling import tiled_apply

# Keys that official VAE files may carry next to the weights and that a loader may drop:
# the training loss (LPIPS/discriminator, ``loss.logvar``) and EMA bookkeeping
# (``model_ema.decay``, ``model_ema.num_updates``; the EMA copies themselves are not used by the
# original ``AutoencoderKL`` at inference either).
HARMLESS_PREFIXES: tuple[str, ...] = ("loss.", "model_ema.")

NORM_GROUPS = 32  # every SD release; diffusers configs may set another ``norm_num_groups``


def _norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: x is always a fresh GroupNorm output here, and this
    # halves the peak memory of the full-resolution decoder stages.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = NORM_GROUPS):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        # Adding into h is autograd-safe: conv2 does not need its output for backward.
        h += self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)

        q, k, v = tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        del hn
        # SDPA's default scale is C ** -0.5, the original's.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        del q, k, v
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        out = self.proj_out(out)
        out += x
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding right and bottom only (the original's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{j}``, ``attn.{j}`` and an optional down/upsample."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int = NORM_GROUPS):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> moments ``(B, 2*z_channels, H/f, W/f)``."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels,
                 resolution, z_channels, double_z=True, norm_num_groups=NORM_GROUPS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        mults = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * mults[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, norm_num_groups)
        self.norm_out = _norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No skip connections in the autoencoder: unlike the original we keep no list of
        # intermediates, so each activation is freed as soon as the next one exists.
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` -> image ``(B, out_ch, h*f, w*f)``."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                 resolution, z_channels, norm_num_groups=NORM_GROUPS):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, norm_num_groups)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_num_groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        # up.{i} is indexed by resolution level (0 = full size) although it runs last to first.
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))``; ``moments`` is ``(B, 2*C, h, w)`` = mean ‖ logvar."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``; eps is drawn on the generator's device, so a CPU generator gives
        the same sample whatever device the model runs on."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over (C, h, w): shape (B,)."""
        var = torch.exp(self.logvar)
        return 0.5 * torch.sum(self.mean.pow(2) + var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Stable Diffusion; arguments equal ``VAEConfig`` fields.

    ``downscale`` (= 2 ** (len(ch_mult) - 1), 8 for SD) is the image-to-latent size ratio.
    """

    def __init__(self, *, embed_dim: int = 4, double_z: bool = True, z_channels: int = 4,
                 resolution: int = 256, in_channels: int = 3, out_ch: int = 3, ch: int = 128,
                 ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (), dropout: float = 0.0,
                 scale_factor: float = 0.18215, norm_num_groups: int = NORM_GROUPS):
        super().__init__()
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")
        g = norm_num_groups
        bad = sorted({ch * m for m in ch_mult if (ch * m) % g})
        if bad:
            raise ValueError(
                f"VAE channel counts must be divisible by {g} (norm_num_groups) for GroupNorm({g}): "
                f"ch={ch}, ch_mult={tuple(ch_mult)} gives {bad}"
            )
        common = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                      attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                      resolution=resolution, z_channels=z_channels, norm_num_groups=norm_num_groups)
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.scale_factor = float(scale_factor)
        self.downscale = 2 ** (len(ch_mult) - 1)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor, tile: int | None = None,
               overlap: int | None = None) -> DiagonalGaussian:
        """Image ``(B, 3, H, W)`` in ``[-1, 1]`` -> posterior over *unscaled* latents.

        ``tile`` (latent cells; 64 = 512 image pixels for SD) encodes overlapping tiles and
        blends their moments; ``overlap`` defaults to ``tile // 4``. Tiling needs H, W divisible
        by ``downscale``.
        """
        if tile is None:
            return DiagonalGaussian(self._moments(x))
        overlap = tile // 4 if overlap is None else overlap
        return DiagonalGaussian(tiled_apply(self._moments, x, tile, overlap, self.downscale, 1))

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = False, tile: int | None = None) -> torch.Tensor:
        """Image in ``[-1, 1]`` -> *scaled* latents ``z * scale_factor`` ``(B, embed_dim, H/f, W/f)``.

        ``sample=False`` takes the posterior mean; ``sample=True`` draws with ``generator``.
        """
        post = self.encode(x, tile=tile)
        z = post.sample(generator) if sample else post.mode()
        return z * self.scale_factor

    def decode(self, z: torch.Tensor, tile: int | None = None,
               overlap: int | None = None) -> torch.Tensor:
        """*Scaled* latents ``(B, embed_dim, h, w)`` -> image ``(B, 3, h*f, w*f)``, roughly in
        ``[-1, 1]`` (not clamped). Divides by ``scale_factor`` first.

        ``tile`` (latent cells) decodes overlapping tiles and cross-fades them; ``overlap``
        defaults to ``tile // 4``. Run under ``torch.no_grad()`` for inference.
        """
        z = z / self.scale_factor
        if tile is None:
            return self._decode_unscaled(z)
        overlap = tile // 4 if overlap is None else overlap
        return tiled_apply(self._decode_unscaled, z, tile, overlap, 1, self.downscale)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction for training, as the original: ``(decoded image, posterior)``."""
        post = self.encode(x)
        z = post.sample(generator) if sample_posterior else post.mode()
        return self._decode_unscaled(z), post
