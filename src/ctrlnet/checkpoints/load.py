"""Build modules on the ``meta`` device and fill them from checkpoint files with ``assign=True``.

A missing or unexpected key is an error that names the keys; only documented harmless keys
(``position_ids`` buffers, VAE loss/EMA bookkeeping, EMA copies of the UNet) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ctrlnet.checkpoints import detect
from ctrlnet.checkpoints.io import Checkpoint, CheckpointError, MappedFile, all_finite, read_checkpoint
from ctrlnet.checkpoints.keys import key_problems
from ctrlnet.checkpoints.save import config_from_json
from ctrlnet.config import ModelConfig, TextEncoderConfig, UNetConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import HARMLESS_KEYS as TEXT_HARMLESS
from ctrlnet.models.text_encoder import TextEncoder, build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import HARMLESS_PREFIXES as VAE_HARMLESS
from ctrlnet.models.vae import AutoencoderKL


@dataclass
class BaseModels:
    """The Stable Diffusion parts of one checkpoint."""

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    source: str = ""


def load_into(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, path,
              harmless: tuple[str, ...] = (), dtype: torch.dtype | None = None,
              memory_format: torch.memory_format | None = None,
              sources: Sequence[MappedFile | None] = ()) -> nn.Module:
    """Load ``sd`` into a meta-built ``module`` (``assign=True``), each floating tensor made once,
    directly in ``dtype`` (default: the module's) and, for 4-D weights, in ``memory_format``.

    No full-precision copy of the model is ever made: a tensor is cast while it is read, one at a
    time. Tensors already in the asked dtype and layout stay views into the file's memory map;
    others are read through ``sources`` (the files' :class:`MappedFile`), so the map's pages do not
    add to the peak resident memory. Raises :class:`CheckpointError` naming missing, unexpected and
    mis-shaped keys, non-floating tensors where weights belong, NaN/inf tensors, unloaded buffers.
    """
    own = module.state_dict()
    problems = key_problems(own, sd, harmless=harmless)
    if problems:
        raise CheckpointError(f"{path}: the {what} weights do not fit the {what} architecture: " + "; ".join(problems))
    wrong = [f"{k} ({v.dtype})" for k, v in sd.items() if k in own and own[k].is_floating_point()
             and not v.is_floating_point()]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} {what} weights are not floating-point numbers: "
                              f"{', '.join(wrong[:5])}; the file is damaged or not a model of this kind")
    sources = [s for s in sources if s is not None]

    def make(k: str) -> tuple[torch.Tensor, bool]:
        v = sd[k]
        if not v.is_floating_point():
            return v, True
        return _materialize(v, dtype or own[k].dtype, memory_format if v.ndim == 4 else None, sources)

    keys = [k for k in sd if k in own]
    # Reading, casting and the page faults of fresh memory are many small pieces of work; tensors
    # in parallel (one per thread; each is read and cast in cache-sized pieces, MappedFile.read_into)
    # load 2-3x faster than one after another on a busy 2-core machine.
    workers = min(len(keys), torch.get_num_threads())
    try:
        if workers <= 1:
            made = [make(k) for k in keys]
        else:
            with ThreadPoolExecutor(workers) as pool:
                made = list(pool.map(make, keys))
    finally:
        for s in sources:
            s.release()
    tensors = {k: v for k, (v, _) in zip(keys, made)}
    bad = [k for k, (_, finite) in zip(keys, made) if not finite]
    if bad:
        # NaN/inf weights can only give NaN images (black in most UIs); refuse before any work
        raise CheckpointError(f"{path}: {len(bad)} {what} tensors hold NaN or infinite values ({', '.join(bad[:5])}); "
                              "the file is damaged (or was saved after training diverged)")
    module.load_state_dict(tensors, strict=False, assign=True)
    # non-persistent buffers built on meta need real storage
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"{path}: buffer {name} of the {what} was not loaded")
    return module


def _materialize(v: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format | None,
                 sources: Sequence[MappedFile]) -> tuple[torch.Tensor, bool]:
    """``v`` in ``dtype`` and ``memory_format``, and whether all its values are finite."""
    layout_ok = memory_format is None or v.is_contiguous(memory_format=memory_format)
    # Tensors memory-mapped from a safetensors file can start at any byte; CPU kernels then take
    # other SIMD paths and round differently from the same weights in fresh memory. Copy those.
    if v.dtype == dtype and layout_ok and v.data_ptr() % 64 == 0:
        return v, all_finite(v)
    out = torch.empty_like(v, dtype=dtype, device="cpu",
                           memory_format=memory_format or torch.contiguous_format)
    for s in sources:
        finite = s.read_into(v, out)
        if finite is not None:
            return out, finite
    out.copy_(v)
    return out, all_finite(out)


class SkipInitOnMeta(TorchFunctionMode):
    """Inside it, ``torch.nn.init`` functions and in-place random/fill ops on ``meta`` tensors
    return their tensor untouched. They compute nothing there anyway, but each goes through torch's
    Python decompositions (a few hundred microseconds; an SD1.5 UNet makes about 1,000 calls), so
    building a model skeleton to load into costs half as much without them. Real tensors are
    initialised as usual."""

    _SKIP = frozenset({
        *(getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                                              "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                                              "kaiming_normal_", "orthogonal_")),
        torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SKIP:
            t = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _meta(factory, path=None):
    # a config that cannot be built (group counts that do not divide, ...) is the file's problem
    try:
        with torch.device("meta"), SkipInitOnMeta():
            return factory()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path or 'model file'}: the model it describes cannot be built ({e})") from None


def _unet_config(params: dict) -> UNetConfig:
    fields = UNetConfig.__dataclass_fields__
    return UNetConfig(**{k: v for k, v in params.items() if k in fields})


_V_WORDS = {"v": "v", "v_prediction": "v", "v-prediction": "v", "eps": "eps", "epsilon": "eps"}


def _yaml_parameterization(path: Path) -> tuple[str, str] | None:
    # A1111's convention: ``model.yaml`` beside ``model.safetensors`` with ``parameterization: "v"``.
    # Read as text (one key, no yaml objects constructed, nothing executed).
    import re

    for cand in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if cand.is_file():
            try:
                text = cand.read_text(errors="replace")[:1_000_000]
            except OSError:
                continue
            for line in text.splitlines():
                m = re.match(r"""\s*parameterization\s*:\s*["']?([\w-]+)["']?\s*(#.*)?$""", line)
                if m and m.group(1) in _V_WORDS:
                    return _V_WORDS[m.group(1)], f"{cand.name} beside the file (parameterization: {m.group(1)})"
    return None


def prediction_type(ckpt: Checkpoint, stored: ModelConfig | None = None,
                    parameterization: str | None = None) -> tuple[str, str]:
    """``("eps" | "v", where it came from)`` for a base checkpoint.

    In this order: the caller's choice; our stored ``ctrlnet_config``; the safetensors metadata
    ``modelspec.prediction_type`` then ``modelspec.architecture`` (kohya's trainers, the SAI model
    spec: ``stable-diffusion-v2-768-v``); a ``v_pred`` key (ComfyUI's marker); a yaml beside the
    file with ``parameterization: "v"`` (A1111); else eps, the default of every SD1.x file.
    """
    if parameterization:
        return parameterization, "given by the caller"
    if stored is not None:
        return stored.schedule.parameterization, "ctrlnet_config metadata"
    meta = ckpt.metadata
    pt = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if pt in _V_WORDS:
        return _V_WORDS[pt], f"safetensors metadata modelspec.prediction_type={pt}"
    arch = str(meta.get("modelspec.architecture", "")).strip().lower()
    if arch:
        family = arch.split("/")[0]
        if family.endswith("-v"):
            return "v", f"safetensors metadata modelspec.architecture={arch}"
        if family.startswith(("stable-diffusion-v1", "stable-diffusion-v2-512")):
            return "eps", f"safetensors metadata modelspec.architecture={arch}"
    if "v_pred" in ckpt.state_dict or "v_pred" in meta:
        return "v", "v_pred key in the file"
    found = _yaml_parameterization(Path(ckpt.path))
    if found is not None:
        return found
    return "eps", "default (eps; no marker in or beside the file)"


def infer_model_config(ckpt: Checkpoint, layout: detect.Layout, parameterization: str | None = None) -> ModelConfig:
    """The stored config if the file has one, else one inferred from the tensor shapes; the
    prediction type from :func:`prediction_type` (its source in ``schedule.parameterization_source``)."""
    stored = ckpt.config
    if stored is not None:
        try:
            cfg = config_from_json(stored)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    else:
        sd = ckpt.state_dict
        try:
            unet = _unet_config(detect.infer_unet_params(detect.strip_prefix(sd, layout.unet)))
            vae = detect.infer_vae_config(detect.strip_prefix(sd, layout.vae))
            text = _text_sd_and_config(sd, layout, ckpt.path)[1]
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot infer the model architecture from its weights ({e})") from None
        cfg = ModelConfig(name=f"checkpoint:{Path(ckpt.path).name}", unet=unet, vae=vae, text=text)
    pred, source = prediction_type(ckpt, cfg if stored is not None else None, parameterization)
    return cfg.with_(schedule=replace(cfg.schedule, parameterization=pred, parameterization_source=source))


def _text_sd_and_config(sd, layout: detect.Layout, path) -> tuple[dict, TextEncoderConfig]:
    if layout.text is None:
        raise CheckpointError(f"{path}: no text encoder found (cond_stage_model.*)")
    tsd = detect.strip_prefix(sd, layout.text)
    kind = layout.text_kind
    if kind == "clip-old":
        tsd = {"text_model." + k: v for k, v in tsd.items()}
        kind = "clip"
    try:
        return tsd, detect.infer_text_config(tsd, kind)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: the text encoder weights are incomplete (no {e})") from None


def load_base(path, config: ModelConfig | None = None, parameterization: str | None = None,
              dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
              memory_format: torch.memory_format | None = None) -> BaseModels:
    """Load a single-file SD checkpoint (or a control_sd15_* file, or a diffusers folder) on the CPU.

    Weights are made directly in ``dtype`` (the VAE in ``vae_dtype``, default ``dtype``), the
    UNet's 4-D weights in ``memory_format`` (e.g. ``torch.channels_last``): see :func:`load_into`.
    """
    path = Path(path)
    if path.is_dir():
        from ctrlnet.checkpoints.diffusers_folder import load_diffusers_base

        return load_diffusers_base(path, dtype=dtype, parameterization=parameterization, vae_dtype=vae_dtype,
                                   memory_format=memory_format)
    ckpt = read_checkpoint(path)
    layout = detect.detect_layout(ckpt.state_dict)
    missing = [n for n, p in (("UNet", layout.unet), ("VAE", layout.vae), ("text encoder", layout.text)) if p is None]
    if missing:
        hint = " It looks like a ControlNet-only file; pass it as a ControlNet, not a base model." if layout.control is not None else ""
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (no {', '.join(missing)} weights found).{hint}")
    cfg = config or infer_model_config(ckpt, layout, parameterization)
    sd, src = ckpt.state_dict, [ckpt.mapped]
    unet = load_into(_meta(lambda: UNetModel(**cfg.unet.kwargs()), path), detect.strip_prefix(sd, layout.unet),
                     "UNet", path, dtype=dtype, memory_format=memory_format, sources=src)
    vae = load_into(_meta(lambda: AutoencoderKL(**cfg.vae.kwargs()), path), detect.strip_prefix(sd, layout.vae),
                    "VAE", path, harmless=VAE_HARMLESS, dtype=vae_dtype or dtype, sources=src)
    tsd, _ = _text_sd_and_config(sd, layout, path)
    text = load_into(_meta(lambda: build_text_encoder(cfg.text, device="meta"), path), tsd, "text encoder", path,
                     harmless=TEXT_HARMLESS, dtype=dtype, sources=src)
    return BaseModels(cfg, unet.eval(), vae.eval(), text.eval(), str(path))


def controlnet_state_dict(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """The ControlNet part of a file (our layout, no prefix) and its constructor params."""
    sd = ckpt.state_dict
    layout = detect.detect_layout(sd)
    if layout.control is None:
        kind = "a Stable Diffusion base checkpoint" if layout.unet else "not a ControlNet"
        raise CheckpointError(f"{ckpt.path}: no ControlNet weights found ({kind})")
    if layout.diffusers_control:
        from ctrlnet.checkpoints import diffusers_unet as du

        try:
            params = _diffusers_control_params(sd)
            return du.from_diffusers(sd, params, "controlnet"), params
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"{ckpt.path}: a diffusers-layout ControlNet whose keys do not fit the SD layout "
                                  f"({e})") from None
    csd = detect.strip_prefix(sd, layout.control) if layout.control else dict(sd)
    stored = ckpt.config
    if stored is not None:
        hint_channels = csd["input_hint_block.0.weight"].shape[1]
        try:
            params = config_from_json(stored).unet.kwargs()
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        params.pop("out_channels")
        params["hint_channels"] = hint_channels
    else:
        try:
            params = detect.infer_unet_params(csd, kind="controlnet")
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"{ckpt.path}: cannot infer the ControlNet architecture ({e})") from None
    return csd, params


def _diffusers_control_params(sd) -> dict:
    # A bare diffusers ControlNet file has no config; rebuild one via our own layout inference.
    from ctrlnet.checkpoints import diffusers_unet as du

    mc = sd["conv_in.weight"].shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
    chans = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in blocks]
    types = ["CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in sd else "DownBlock2D" for i in blocks]
    ctx = sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    lpb = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
    cfg = dict(block_out_channels=chans, down_block_types=types, cross_attention_dim=ctx, layers_per_block=lpb,
               in_channels=sd["conv_in.weight"].shape[1],
               conditioning_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
               use_linear_projection=sd["mid_block.attentions.0.proj_in.weight"].ndim == 2,
               attention_head_dim=8 if ctx == 768 else [c // 64 for c in chans])
    del mc
    return du.params_from_diffusers(cfg, "controlnet")


def check_fits(params: Mapping, base: ModelConfig, path) -> None:
    """Refuse a ControlNet whose encoder cannot pair with the base UNet, saying why."""
    u = base.unet
    checks = [
        ("context_dim", params.get("context_dim"), u.context_dim,
         "text context width (768 = SD1.x, 1024 = SD2.x)"),
        ("model_channels", params.get("model_channels"), u.model_channels, "UNet width"),
        ("channel_mult", tuple(params.get("channel_mult", ())), tuple(u.channel_mult), "UNet levels"),
        # an inpainting base (in_channels 9 = latents + masked-image latents + mask) pairs with the
        # ordinary 4-channel ControlNets, which see the noisy latents only
        ("in_channels", params.get("in_channels"),
         params.get("in_channels") if params.get("in_channels") in (u.in_channels, u.out_channels) else u.out_channels,
         "latent channels"),
        # files in the original layout cannot say their group count; the base's is used for them
        ("norm_num_groups", params.get("norm_num_groups", u.norm_num_groups), u.norm_num_groups, "GroupNorm groups"),
        ("use_linear_in_transformer", params.get("use_linear_in_transformer"), u.use_linear_in_transformer,
         "transformer projection type (linear = SD2.x)"),
    ]
    for name, got, want, what in checks:
        if got != want:
            fam = {768: "SD1.x", 1024: "SD2.x"}
            extra = ""
            if name == "context_dim":
                extra = f" (a {fam.get(got, str(got))} ControlNet on a {fam.get(want, str(want))} base)"
            raise CheckpointError(
                f"{path}: this ControlNet does not fit the base model: {what} differs, "
                f"{name}={got} in the ControlNet vs {want} in the base{extra}"
            )


DIFFERENCE_KEY = "difference"


def is_difference(ckpt: Checkpoint) -> bool:
    """sd-webui-controlnet's "difference" ControlNets: ``control_model.*`` holds ControlNet minus
    base UNet for the tensors they share, flagged by a top-level ``difference`` key."""
    return DIFFERENCE_KEY in ckpt.state_dict or DIFFERENCE_KEY in ckpt.metadata


def add_base_back(csd: Mapping[str, torch.Tensor], unet_sd: Mapping[str, torch.Tensor],
                  path) -> dict[str, torch.Tensor]:
    """Undo a difference file: every ControlNet tensor whose name the UNet has gets the UNet's
    tensor added (in fp32, then back to the file's dtype), as sd-webui-controlnet does."""
    out = {}
    for k, v in csd.items():
        base = unet_sd.get(k)
        if base is None:
            out[k] = v
            continue
        if tuple(base.shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: difference ControlNet tensor {k} has shape {tuple(v.shape)}, the base "
                                  f"UNet's has {tuple(base.shape)}; it was made from another base model")
        out[k] = (v.float() + base.detach().to("cpu", torch.float32)).to(v.dtype)
    return out


def load_controlnet(path, base: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
                    base_unet: UNetModel | None = None,
                    memory_format: torch.memory_format | None = None) -> ControlNet:
    """Load a ControlNet from a control-only file, a control_sd15_* file, a diffusers folder/file,
    or a diffusers pipeline folder holding one ``controlnet/``.

    ``base``: the base config the net must fit (checked, and head counts taken from it).
    ``base_unet``: the base UNet, needed by "difference" files (their weights are stored minus the
    base UNet's); a difference file without it raises :class:`CheckpointError`.
    ``dtype``/``memory_format``: what the weights are made in, as they are read (:func:`load_into`).
    """
    path = Path(path)
    if path.is_dir():
        from ctrlnet.checkpoints.diffusers_folder import load_diffusers_controlnet

        return load_diffusers_controlnet(path, base=base, dtype=dtype, memory_format=memory_format)
    ckpt = read_checkpoint(path)
    csd, params = controlnet_state_dict(ckpt)
    if base is not None:
        check_fits(params, base, path)
        # head counts cannot be read from weights: take them from the base it runs with
        params.update(num_heads=base.unet.num_heads, num_head_channels=base.unet.num_head_channels,
                      norm_num_groups=base.unet.norm_num_groups)
    elif not ckpt.config and not detect.detect_layout(ckpt.state_dict).diffusers_control:
        try:
            detect.check_head_rule(params)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if is_difference(ckpt):
        if base_unet is None:
            raise CheckpointError(
                f"{path}: a \"difference\" ControlNet (stored minus its base UNet) needs the base model it was "
                "made from, and none was given; load it together with that base model"
            )
        csd = add_base_back({k: v for k, v in csd.items() if k != DIFFERENCE_KEY}, base_unet.state_dict(), path)
    try:
        net = _meta(lambda: ControlNet(**params))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build this ControlNet ({e})") from None
    net = load_into(net, csd, "ControlNet", path, dtype=dtype, memory_format=memory_format, sources=[ckpt.mapped])
    return net.eval()
