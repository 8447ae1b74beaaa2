"""The reference colorization ControlNet: grayscale target through the hint encoder, colour
reference as VAE latents concatenated with the noisy latent at the network's input.

It is a :class:`~ctrlnet.models.controlnet.ControlNet` whose first convolution
(``input_blocks.0.0``) takes ``latent + reference`` channels (4 + 4 for SD). The state-dict keys
are the original ``control_model.*`` layout; only ``input_blocks.0.0.weight`` is wider. A fresh
model copies the UNet encoder and starts the extra input weights at zero, so (with the zero
convolutions) it leaves Stable Diffusion's output unchanged.

Two ways to give the reference latent:

- ``forward(x, hint, t, context, latent_cond=ref)``: sampling (``ControlInput.latent_cond``).
- a *packed hint* ``(B, hint_channels + ref_channels, H, W)`` whose last channels hold the
  reference latent repeated over each 8x8 pixel cell (:func:`pack_hint`): the unmodified training
  loop passes one ``hint`` tensor, so training data sets give the reference this way.

A colorizer file may also carry its own autoencoder (``first_stage_model.*``): a base VAE trained
on other pictures (the demo's learnt flat fill50k colours) cannot represent the colours to be
predicted, so the recipe fine-tunes it on the colorizer's frames and ships it with the net.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctrlnet.config import ModelConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL

FIRST_CONV = "input_blocks.0.0.weight"
KIND_KEY = "ctrlnet_colorize"  # safetensors metadata: the model kind ("reference")


def pack_hint(hint: torch.Tensor, ref_latent: torch.Tensor) -> torch.Tensor:
    """``hint`` (B, C, H, W) and ``ref_latent`` (B, R, H/f, W/f) -> (B, C + R, H, W): the latent is
    repeated over each f x f cell (nearest upsampling), so :func:`unpack_hint` recovers it exactly."""
    f = hint.shape[-1] // ref_latent.shape[-1]
    if hint.shape[-2] != ref_latent.shape[-2] * f or hint.shape[-1] != ref_latent.shape[-1] * f:
        raise ValueError(f"hint {tuple(hint.shape[-2:])} is not a multiple of the latent {tuple(ref_latent.shape[-2:])}")
    up = ref_latent.to(hint.dtype).repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)
    return torch.cat([hint, up], dim=1)


def unpack_hint(packed: torch.Tensor, hint_channels: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_hint`: (hint (B, C, H, W), reference latent (B, R, H/f, W/f))."""
    return packed[:, :hint_channels], packed[:, hint_channels:, ::factor, ::factor]


class ReferenceControlNet(ControlNet):
    """ControlNet with ``ref_channels`` extra input channels for a reference latent.

    ``in_channels`` is the latent width (4); the first conv takes ``in_channels + ref_channels``.
    """

    def __init__(self, in_channels: int = 4, ref_channels: int = 4, **params):
        super().__init__(in_channels=in_channels + ref_channels, **params)
        self.latent_channels = in_channels
        self.ref_channels = ref_channels
        self._params["in_channels"] = in_channels
        self._params["ref_channels"] = ref_channels

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None, timesteps: torch.Tensor, context: torch.Tensor,
                latent_cond: torch.Tensor | None = None,
                guided_hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residuals for the UNet. ``x``: (B, 4, h, w); ``latent_cond``: (B, ref_channels, h, w)
        scaled reference latents, or None when ``hint`` is packed (see :func:`pack_hint`).
        ``guided_hint``: :meth:`encode_hint` of the (unpacked) hint, computed once per image."""
        if latent_cond is None:
            if hint is None:
                raise ValueError("the reference ControlNet needs latent_cond when the hint is not given")
            if hint.shape[1] != self.hint_channels + self.ref_channels:
                raise ValueError(
                    f"the reference ControlNet needs latent_cond or a packed hint of "
                    f"{self.hint_channels}+{self.ref_channels} channels; got a hint of {hint.shape[1]}")
            hint, latent_cond = unpack_hint(hint, self.hint_channels, hint.shape[-1] // x.shape[-1])
        if latent_cond.shape[0] != x.shape[0] or latent_cond.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"latent_cond {tuple(latent_cond.shape)} does not match latents {tuple(x.shape)}")
        x = torch.cat([x, latent_cond.to(x.dtype)], dim=1)  # (B, 4 + R, h, w)
        return super().forward(x, hint, timesteps, context, guided_hint=guided_hint)

    def weights_from_unet(self, unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet encoder's tensors, with the first conv widened: new reference channels start at zero."""
        copied = super().weights_from_unet(unet_sd)
        first = unet_sd[FIRST_CONV]  # (C, 4, 3, 3)
        wide = torch.zeros_like(self.state_dict()[FIRST_CONV])
        wide[:, : first.shape[1]] = first
        copied[FIRST_CONV] = wide
        return copied

    @classmethod
    def from_unet(cls, unet: UNetModel, hint_channels: int = 3, ref_channels: int = 4) -> "ReferenceControlNet":
        """A new model: the UNet encoder copied, the extra input weights and the zero convs at zero."""
        return super().from_unet(unet, hint_channels=hint_channels, ref_channels=ref_channels)


def build_from_state_dict(sd: dict[str, torch.Tensor], base: ModelConfig) -> ReferenceControlNet:
    """A :class:`ReferenceControlNet` shaped for ``sd`` (our ``control_model.*`` layout, no
    prefix) on a ``base`` architecture, loaded strictly (a partial load raises, naming keys)."""
    if FIRST_CONV not in sd or "input_hint_block.0.weight" not in sd:
        raise ValueError(f"not a ControlNet state dict (no {FIRST_CONV} / input_hint_block.0.weight)")
    in_total = sd[FIRST_CONV].shape[1]
    latent = base.unet.in_channels
    if in_total <= latent:
        raise ValueError(f"{FIRST_CONV} takes {in_total} channels: a plain ControlNet, not a reference "
                         f"colorizer (which takes more than the {latent} latent channels)")
    params = base.unet.kwargs()
    params.pop("out_channels")
    params.update(in_channels=latent, ref_channels=in_total - latent,
                  hint_channels=sd["input_hint_block.0.weight"].shape[1])
    with torch.device("meta"):
        net = ReferenceControlNet(**params)
    missing, unexpected = net.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"reference ControlNet: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, v in sd.items():
        if net.state_dict()[k].shape != v.shape:
            raise ValueError(f"reference ControlNet: {k} has shape {tuple(v.shape)}")
    return net.float().eval()


def load_reference_controlnet(path, base: ModelConfig | None = None) -> ReferenceControlNet:
    """Load a reference colorizer from one of our safetensors files (``control_model.*`` keys).

    ``base`` gives the architecture; by default the ``ctrlnet_config`` stored in the file.
    """
    from safetensors.torch import load_file

    from ctrlnet.checkpoints.save import PREFIXES, read_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no colorizer at {path}")
    config = base or read_config(path)
    if config is None:
        raise ValueError(f"{path} stores no model config; pass the base it was trained on")
    prefix = PREFIXES["controlnet"]
    sd = {k[len(prefix):]: v.float() for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{path} holds no {prefix}* weights")
    try:
        return build_from_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_reference_controlnet(net: ReferenceControlNet, path, config: ModelConfig,
                              dtype: torch.dtype | None = None, vae: torch.nn.Module | None = None,
                              metadata: dict[str, str] | None = None) -> Path:
    """Write ``control_model.*`` (and, with ``vae``, the colorizer's own ``first_stage_model.*``)
    with the base config, the model kind and ``metadata`` (e.g. ``ctrlnet_defaults``) in the metadata."""
    from ctrlnet.checkpoints.save import PREFIXES, save_model_file

    parts = {PREFIXES["controlnet"]: net.state_dict()}
    if vae is not None:
        parts[PREFIXES["vae"]] = vae.state_dict()
    return save_model_file(path, parts, config, {**(metadata or {}), KIND_KEY: "reference"}, dtype=dtype)


def load_reference_vae(path, base: ModelConfig) -> AutoencoderKL | None:
    """The autoencoder a colorizer file carries (fp32, eval, ``base``'s architecture and
    ``scale_factor``), or ``None`` when it uses the base model's own."""
    from safetensors import safe_open

    from ctrlnet.checkpoints.save import PREFIXES

    prefix = PREFIXES["vae"]
    with safe_open(str(path), framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    if not sd:
        return None
    vae = AutoencoderKL(**base.vae.kwargs())
    own = vae.state_dict()
    wrong = sorted(set(own) ^ set(sd)) + [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if wrong:
        raise ValueError(f"{path}: its autoencoder does not fit the base model ({len(wrong)} keys missing, "
                         f"unexpected or of another shape, e.g. {wrong[:3]})")
    vae.load_state_dict(sd)
    return vae.eval()
