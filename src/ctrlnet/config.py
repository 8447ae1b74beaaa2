"""Model configurations as dataclasses, with named presets.

Field names equal the ``params`` of the original ``models/cldm_v15.yaml`` / ``cldm_v21.yaml`` so a
config maps one-to-one; ``UNetModel(**asdict(cfg))`` builds the module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal


@dataclass(frozen=True)
class _EncoderLayout:
    """The params the UNet and its ControlNet copy share."""

    image_size: int = 32  # unused, kept for one-to-one mapping
    in_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    use_spatial_transformer: bool = True
    use_linear_in_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int = 768
    legacy: bool = False
    use_checkpoint: bool = False
    norm_num_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups; 32 in every SD release)

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class UNetConfig(_EncoderLayout):
    """``unet_config.params`` of the original yaml files."""

    out_channels: int = 4


@dataclass(frozen=True)
class ControlNetConfig(_EncoderLayout):
    """``control_stage_config.params`` of the original yaml files."""

    hint_channels: int = 3

    @classmethod
    def from_unet(cls, unet: UNetConfig, hint_channels: int = 3) -> "ControlNetConfig":
        d = asdict(unet)
        d.pop("out_channels")
        return cls(hint_channels=hint_channels, **d)


@dataclass(frozen=True)
class VAEConfig:
    """``first_stage_config.params`` (``ddconfig`` flattened) of AutoencoderKL."""

    embed_dim: int = 4
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    scale_factor: float = 0.18215
    norm_num_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups; 32 in every SD release)

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The text tower. ``kind="clip"``: HF CLIPTextModel layout (SD1, ``cond_stage_model.transformer``);
    ``kind="openclip"``: open_clip layout (SD2, ``cond_stage_model.model``)."""

    kind: Literal["clip", "openclip"] = "clip"
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # which hidden state feeds the UNet: "last" (after final LN) or "penultimate" (SD2, and CLIP skip 2)
    layer: Literal["last", "penultimate"] = "last"
    projection_dim: int = 0  # OpenCLIP text_projection width (kept for key parity; unused for SD)

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScheduleConfig:
    """Diffusion schedule of the original LatentDiffusion configs."""

    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    parameterization: Literal["eps", "v"] = "eps"
    # where the loader took ``parameterization`` from (a file's metadata, a yaml beside it, ...);
    # informative only, so it is left out of comparisons
    parameterization_source: str = field(default="", compare=False)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one Stable Diffusion + ControlNet family."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    hint_channels: int = 3

    @property
    def controlnet(self) -> ControlNetConfig:
        return ControlNetConfig.from_unet(self.unet, self.hint_channels)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


SD15 = ModelConfig(
    name="sd15",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text=TextEncoderConfig(),
)

SD21 = ModelConfig(
    name="sd21",
    unet=UNetConfig(
        num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024
    ),
    vae=VAEConfig(),
    text=TextEncoderConfig(
        kind="openclip", width=1024, layers=24, heads=16, act="gelu", layer="penultimate",
        projection_dim=1024,
    ),
)

# SD2.x 768px checkpoints (v2-1_768-ema-pruned) predict v; same networks as SD21, which follows
# cldm_v21.yaml (eps, the 512px base the SD2.1 ControlNets were trained on).
SD21_V = SD21.with_(name="sd21-v", schedule=ScheduleConfig(parameterization="v"))

# The small model we train and ship (see ctrlnet.training.demo); 128px images, 16px latents.
DEMO = ModelConfig(
    name="demo",
    unet=UNetConfig(
        model_channels=96, attention_resolutions=(4, 2), channel_mult=(1, 1, 1, 1),
        num_heads=4, context_dim=48, num_res_blocks=1,
    ),
    # GroupNorm(32) with one channel a group would erase flat colours (it normalises each channel
    # over the image); 96 channels keep three a group at every level of the VAE and the UNet.
    vae=VAEConfig(ch=96, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=128),
    # the token embedding (49408 x width) dominates the text tower's size
    text=TextEncoderConfig(width=48, layers=3, heads=4),
)

# Tiny random configs of the real layouts, for tests.
TINY_SD1 = ModelConfig(
    name="tiny-sd1",
    unet=UNetConfig(
        model_channels=32, attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 2, 2),
        num_heads=2, context_dim=32, num_res_blocks=1,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    text=TextEncoderConfig(width=32, layers=2, heads=2),
)

TINY_SD2 = ModelConfig(
    name="tiny-sd2",
    unet=UNetConfig(
        model_channels=32, attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 2, 2),
        num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, context_dim=48,
        num_res_blocks=1,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    text=TextEncoderConfig(
        kind="openclip", width=48, layers=3, heads=3, act="gelu", layer="penultimate",
        projection_dim=48,
    ),
    schedule=ScheduleConfig(parameterization="v"),
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SD15, SD21, SD21_V, DEMO, TINY_SD1, TINY_SD2)
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
