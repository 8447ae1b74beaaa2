"""Diffusers-format folders (``model_index.json`` + component subfolders), read and written.

Reading converts every component's keys to ours; writing produces a folder diffusers can open.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ctrlnet.checkpoints import diffusers_clip as dc
from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.checkpoints import diffusers_vae as dv
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.config import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _component(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = _read_json(folder / "config.json")
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return cfg, read_checkpoint(folder / name).state_dict
    raise CheckpointError(f"{folder}: no weight file (looked for {', '.join(_WEIGHT_NAMES)})")


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    chans = list(cfg["block_out_channels"])
    return VAEConfig(
        embed_dim=cfg.get("latent_channels", 4), z_channels=cfg.get("latent_channels", 4),
        in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=chans[0],
        ch_mult=tuple(c // chans[0] for c in chans), num_res_blocks=cfg.get("layers_per_block", 2),
        scale_factor=cfg.get("scaling_factor", 0.18215),
    )


def _text(folder: Path) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    cfg, sd = _component(folder)
    width, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    common = dict(vocab_size=cfg.get("vocab_size", 49408), max_length=cfg.get("max_position_embeddings", 77),
                  width=width, heads=cfg.get("num_attention_heads", width // 64),
                  mlp_ratio=cfg.get("intermediate_size", 4 * width) // width)
    if cfg.get("hidden_act", "quick_gelu") == "quick_gelu":
        return TextEncoderConfig(kind="clip", layers=layers, **common), dc.clip_from_transformers(sd)
    # SD2: diffusers keeps the OpenCLIP tower minus its last block; rebuild the original layout.
    tcfg = TextEncoderConfig(kind="openclip", layers=layers + 1, act="gelu", layer="penultimate",
                             projection_dim=width, **common)
    ours, _filled = dc.openclip_fill_unrecoverable(dc.openclip_from_transformers(sd), tcfg)
    return tcfg, ours


def _schedule(root: Path, parameterization: str | None) -> ScheduleConfig:
    p = root / "scheduler" / "scheduler_config.json"
    sc = _read_json(p) if p.is_file() else {}
    pred = parameterization or {"epsilon": "eps", "v_prediction": "v"}.get(sc.get("prediction_type", "epsilon"))
    if pred is None:
        raise CheckpointError(f"{p}: unsupported prediction_type {sc.get('prediction_type')!r}")
    if sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise CheckpointError(f"{p}: only the scaled_linear beta schedule of SD is supported")
    return ScheduleConfig(linear_start=sc.get("beta_start", 0.00085), linear_end=sc.get("beta_end", 0.012),
                          timesteps=sc.get("num_train_timesteps", 1000), parameterization=pred)


def load_diffusers_base(root: Path, dtype: torch.dtype = torch.float32, parameterization: str | None = None):
    """A diffusers SD pipeline folder as our BaseModels."""
    from ctrlnet.checkpoints.load import BaseModels, _meta, load_into
    from ctrlnet.models.text_encoder import HARMLESS_KEYS, build_text_encoder
    from ctrlnet.models.unet import UNetModel
    from ctrlnet.models.vae import AutoencoderKL

    root = Path(root)
    if not (root / "unet").is_dir():
        raise CheckpointError(f"{root}: not a diffusers pipeline folder (no unet/ subfolder)")
    ucfg, usd = _component(root / "unet")
    uparams = du.params_from_diffusers(ucfg, "unet")
    unet_cfg = UNetConfig(**uparams)
    vcfg_raw, vsd = _component(root / "vae")
    vae_cfg = vae_config_from_diffusers(vcfg_raw)
    tcfg, tsd = _text(root / "text_encoder")
    cfg = ModelConfig(name=f"diffusers:{root.name}", unet=unet_cfg, vae=vae_cfg, text=tcfg,
                      schedule=_schedule(root, parameterization))
    unet = load_into(_meta(lambda: UNetModel(**unet_cfg.kwargs())), du.from_diffusers(usd, uparams), "UNet",
                     root / "unet", dtype=dtype)
    vae = load_into(_meta(lambda: AutoencoderKL(**vae_cfg.kwargs())), dv.vae_from_diffusers(vsd), "VAE",
                    root / "vae", dtype=dtype)
    text = load_into(build_text_encoder(tcfg, device="meta"), tsd, "text encoder", root / "text_encoder",
                     harmless=HARMLESS_KEYS, dtype=dtype)
    return BaseModels(cfg, unet.eval(), vae.eval(), text.eval(), str(root))


def load_diffusers_controlnet(root: Path, base: ModelConfig | None = None, dtype: torch.dtype = torch.float32):
    """A diffusers ControlNetModel folder as our ControlNet."""
    from ctrlnet.checkpoints.load import _meta, check_fits, load_into
    from ctrlnet.models.controlnet import ControlNet

    cfg, sd = _component(Path(root))
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{root}: config.json describes a {cfg.get('_class_name')}, not a ControlNetModel")
    params = du.params_from_diffusers(cfg, "controlnet")
    if base is not None:
        check_fits(params, base, root)
    net = load_into(_meta(lambda: ControlNet(**params)), du.from_diffusers(sd, params, "controlnet"), "ControlNet",
                    root, dtype=dtype)
    return net.eval()


def _write_component(folder: Path, config: dict, sd: dict[str, torch.Tensor], weights: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, folder / weights)


def save_diffusers_controlnet(net, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write our ControlNet as a diffusers ControlNetModel folder."""
    params = net.config_params()
    sd = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    _write_component(Path(out), du.diffusers_config(params, "controlnet"), du.to_diffusers(sd, params, "controlnet"),
                     "diffusion_pytorch_model.safetensors")
    return Path(out)


def save_diffusers_base(base, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write BaseModels as a diffusers StableDiffusionPipeline folder (UNet, VAE, text encoder, scheduler)."""
    out = Path(out)

    def cast(sd):
        return {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in sd.items()}

    cfg = base.config
    uparams = base.unet.config_params()
    _write_component(out / "unet", du.diffusers_config(uparams), du.to_diffusers(cast(base.unet.state_dict()), uparams),
                     "diffusion_pytorch_model.safetensors")
    vcfg = dv.diffusers_vae_config(cfg.vae)
    vcfg.update(_class_name="AutoencoderKL", scaling_factor=cfg.vae.scale_factor)
    _write_component(out / "vae", vcfg, dv.vae_to_diffusers(cast(base.vae.state_dict())),
                     "diffusion_pytorch_model.safetensors")
    t = cfg.text
    tsd = cast(base.text_encoder.state_dict())
    if t.kind == "clip":
        tsd, layers, act = dc.clip_to_transformers(tsd), t.layers, t.act
    else:
        tsd, layers, act = dc.openclip_to_transformers(tsd, drop_last_layer=True), t.layers - 1, "gelu"
    tcfg = dict(_class_name="CLIPTextModel", architectures=["CLIPTextModel"], model_type="clip_text_model",
                hidden_size=t.width, num_hidden_layers=layers, num_attention_heads=t.heads,
                intermediate_size=t.width * t.mlp_ratio, hidden_act=act, vocab_size=t.vocab_size,
                max_position_embeddings=t.max_length, projection_dim=t.projection_dim or t.width,
                layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    _write_component(out / "text_encoder", tcfg, tsd, "model.safetensors")
    s = cfg.schedule
    sched = dict(_class_name="DDIMScheduler", beta_start=s.linear_start, beta_end=s.linear_end,
                 beta_schedule="scaled_linear", num_train_timesteps=s.timesteps, clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1,
                 prediction_type={"eps": "epsilon", "v": "v_prediction"}[s.parameterization])
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index = dict(_class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                 vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                 scheduler=["diffusers", "DDIMScheduler"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
