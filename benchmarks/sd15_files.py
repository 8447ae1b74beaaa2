"""Full-size SD1.5 + ControlNet files with random weights, for the loading and generation benchmarks.

Writes (once; kept between runs) into a folder:

  sd15.safetensors            base model, original single-file layout (``model.diffusion_model.``,
                              ``first_stage_model.``, ``cond_stage_model.transformer.text_model.``), fp16,
                              no ``ctrlnet_config`` metadata (like the files people download)
  control_sd15.safetensors    ControlNet, ``control_model.`` keys, fp16
  diffusers/                  the same weights as a StableDiffusionControlNetPipeline folder (fp16)

Weights are random but shaped and scaled so that a whole image runs without overflow: matrices
N(0, (0.5/sqrt(fan_in))^2), norm scales 1, biases 0 (what ``random_base`` does), the ControlNet's
zero convolutions non-zero so that it acts. Nothing here is a benchmark by itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

BASE = "sd15.safetensors"
CONTROL = "control_sd15.safetensors"
FOLDER = "diffusers"


def _random_state_dict(module: torch.nn.Module, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    # the module is built on meta: only names and shapes are read, one tensor is made at a time
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            # the text encoder's position_ids, which real files carry too
            out[k] = torch.arange(v.shape[-1], dtype=v.dtype).expand(v.shape).contiguous()
        elif v.ndim > 1:
            fan_in = math.prod(v.shape[1:])
            out[k] = (torch.randn(v.shape, generator=g) * (0.5 / fan_in**0.5)).to(dtype)
        else:
            out[k] = (torch.ones if k.endswith("weight") else torch.zeros)(v.shape, dtype=dtype)
    return out


def ensure_files(folder, preset: str = "sd15") -> dict[str, Path]:
    """Write the files (if missing) and return their paths ``{"base", "control", "diffusers"}``.

    Needs about 4 GB of memory while writing; hold the big-memory lock. Another ``preset``
    (``tiny-sd1``: seconds, for trying the benchmarks out) stores its config in the files, since
    its head counts cannot be read from the weights."""
    from ctrlnet.checkpoints import detect
    from ctrlnet.config import get_preset
    from ctrlnet.models.controlnet import ControlNet
    from ctrlnet.models.text_encoder import build_text_encoder
    from ctrlnet.models.unet import UNetModel
    from ctrlnet.models.vae import AutoencoderKL

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"base": folder / BASE, "control": folder / CONTROL, "diffusers": folder / FOLDER}
    from safetensors.torch import save_file

    from ctrlnet.atomic import atomic_path

    from ctrlnet.checkpoints.save import config_to_json

    cfg = get_preset(preset)
    meta = {"format": "pt"} if preset == "sd15" else {"format": "pt", "ctrlnet_config": config_to_json(cfg)}
    with torch.device("meta"):
        unet = UNetModel(**cfg.unet.kwargs())
        vae = AutoencoderKL(**cfg.vae.kwargs())
        net = ControlNet(**cfg.controlnet.kwargs())
    text = build_text_encoder(cfg.text, device="meta")
    if not paths["base"].is_file():
        sd = {}
        for i, (prefix, m) in enumerate(((detect.UNET_PREFIX, unet), (detect.VAE_PREFIX, vae),
                                         (detect.CLIP_PREFIX, text))):
            sd.update({prefix + k: v for k, v in _random_state_dict(m, seed=i).items()})
        with atomic_path(paths["base"]) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        del sd
    if not paths["control"].is_file():
        sd = {detect.CONTROL_PREFIX + k: v for k, v in _random_state_dict(net, seed=3).items()}
        for k in sd:  # zero convs, random: the net must act on the image
            if ".zero_convs." in k or "middle_block_out" in k or "input_hint_block.14." in k:
                if sd[k].ndim > 1:
                    sd[k] = (torch.randn(sd[k].shape, generator=torch.Generator().manual_seed(len(k))) * 0.05).half()
        with atomic_path(paths["control"]) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        del sd
    if not (paths["diffusers"] / "model_index.json").is_file():
        from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base
        from ctrlnet.checkpoints.load import load_base, load_controlnet

        base = load_base(paths["base"], dtype=torch.float16)
        cn = load_controlnet(paths["control"], base=base.config, dtype=torch.float16)
        save_diffusers_base(base, paths["diffusers"], dtype=torch.float16, controlnets={"control": cn})
    return paths


if __name__ == "__main__":
    import sys

    print(ensure_files(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ctrlnet-sd15",
                       sys.argv[2] if len(sys.argv) > 2 else "sd15"))
