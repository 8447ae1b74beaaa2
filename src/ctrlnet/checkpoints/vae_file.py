"""Stand-alone VAE files, as users swap them in (A1111's ``--vae``, ComfyUI's VAELoader).

Accepted: a single file in the original layout (``vae-ft-mse-840000-ema-pruned.safetensors``/``.ckpt``:
``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, possibly under ``state_dict``
and/or the ``first_stage_model.`` prefix, with ``model_ema.*``/``loss.*`` bookkeeping that is dropped),
the same in diffusers key names (``diffusion_pytorch_model.safetensors`` of an ``AutoencoderKL``),
a diffusers VAE folder (``config.json`` + weights) or a pipeline folder's ``vae/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctrlnet.checkpoints import detect
from ctrlnet.checkpoints import diffusers_vae as dv
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.config import VAEConfig
from ctrlnet.models.vae import HARMLESS_PREFIXES, AutoencoderKL

# fields a VAE file decides (its shapes); the others (scale factor, group count) come from the base
_ARCH_FIELDS = ("embed_dim", "z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                "attn_resolutions")


def _vae_tensors(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The VAE tensors of a file in our (original) key names, bookkeeping dropped."""
    if any(k.startswith(detect.VAE_PREFIX) for k in sd):
        sd = detect.strip_prefix(sd, detect.VAE_PREFIX)  # a VAE cut from (or still in) a full checkpoint
    sd = {k: v for k, v in sd.items() if not k.startswith(HARMLESS_PREFIXES)}
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        shown = ", ".join(sorted(sd)[:5])
        raise CheckpointError(f"{path}: not a VAE (no encoder.*/decoder.* weights; keys start with: {shown})")
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        try:
            return dv.vae_from_diffusers(sd)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: diffusers-layout VAE keys that do not map to the SD VAE ({e})") from None
    return sd


def _infer(sd: dict[str, torch.Tensor], path: Path) -> VAEConfig:
    try:
        return detect.infer_vae_config(sd)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot infer the VAE architecture from its weights (no {e})") from None


def load_vae(path, config: VAEConfig | None = None, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE from a file or diffusers folder, on the CPU in ``dtype``, in eval mode.

    ``config``: the base model's VAE config. The file must have the same architecture (compared
    field by field; a mismatch raises :class:`CheckpointError` naming the fields), and the result
    keeps the base's ``scale_factor`` and group count, which a weights file cannot state. Without
    ``config`` the architecture is the file's (folder: its ``config.json``) with SD's defaults.
    Keys are checked strictly: missing or unexpected ones are named.
    """
    from ctrlnet.checkpoints.diffusers_folder import read_weights, vae_config_from_diffusers
    from ctrlnet.checkpoints.load import _meta, load_into

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        import json

        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder}: not a diffusers VAE folder (config.json: {e})") from None
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{folder}: config.json describes a {raw.get('_class_name')}, not an AutoencoderKL")
        try:
            own = vae_config_from_diffusers(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
        sd = _vae_tensors(read_weights(folder), folder)
        where = folder
    else:
        sd = _vae_tensors(read_checkpoint(path).state_dict, path)
        own = _infer(sd, path)
        where = path
    if config is not None:
        diff = [f"{f}: file {getattr(own, f)} vs base {getattr(config, f)}" for f in _ARCH_FIELDS
                if getattr(own, f) != getattr(config, f)]
        if diff:
            raise CheckpointError(f"{where}: this VAE has another architecture than the base model's VAE "
                                  f"({'; '.join(diff)})")
        cfg = config
    else:
        cfg = own
    vae = load_into(_meta(lambda: AutoencoderKL(**cfg.kwargs()), where), sd, "VAE", where, dtype=dtype)
    return vae.eval()

