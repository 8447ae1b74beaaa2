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

_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANTS = ("", "fp16", "bf16", "fp32")  # "" first: a folder with both uses the full-precision files


def weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of one diffusers component, in the order diffusers looks for them.

    Safetensors before ``.bin``, plain before variants (``*.fp16.safetensors``, ``*.fp16.bin``);
    a sharded save (``*.safetensors.index[.fp16].json`` + ``*-0000N-of-0000M.*``) gives all its
    shards. Raises :class:`CheckpointError` if there is none or a shard named by the index is missing.
    """
    for ext in ("safetensors", "bin"):
        for variant in _VARIANTS:
            dot = f".{variant}" if variant else ""
            for stem in _STEMS:
                single = folder / f"{stem}{dot}.{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}.{ext}.index{dot}.json"
                if index.is_file():
                    wmap = _read_json(index).get("weight_map")
                    if not isinstance(wmap, dict) or not wmap:
                        raise CheckpointError(f"{index}: no weight_map in the shard index")
                    shards = [folder / name for name in dict.fromkeys(wmap.values())]
                    missing = [p.name for p in shards if not p.is_file()]
                    if missing:
                        raise CheckpointError(f"{index}: {len(missing)} of {len(shards)} shards are missing: "
                                              f"{', '.join(missing[:5])}; download them again")
                    return shards
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: no weight file (looked for {'/'.join(_STEMS)}[.fp16].safetensors|.bin and their shard "
        f"indexes; the folder holds: {', '.join(present[:10]) or 'nothing'})"
    )


def read_weights(folder: Path, sources: list | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one diffusers component, merging shards (a key in two shards is an error).

    ``sources``: a list to which each shard's :class:`~ctrlnet.checkpoints.io.MappedFile` is
    appended, for :func:`~ctrlnet.checkpoints.load.load_into` to read the tensors through."""
    sd: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        ckpt = read_checkpoint(path)
        part = ckpt.state_dict
        if sources is not None:
            sources.append(ckpt.mapped)
        twice = sorted(set(part) & set(sd))
        if twice:
            raise CheckpointError(f"{path}: keys also in another shard: {', '.join(twice[:5])}")
        sd.update(part)
    return sd


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder is missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _component(folder: Path, sources: list | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    if not folder.is_dir():
        raise CheckpointError(f"diffusers folder is missing the {folder.name}/ component ({folder})")
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / 'config.json'}: not a JSON object")
    return cfg, read_weights(folder, sources)


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """A ``VAEConfig`` from a diffusers ``AutoencoderKL`` config (``norm_num_groups`` carried;
    attention levels and 1x1 quant convs are the SD layout, others are refused)."""
    chans = list(cfg["block_out_channels"])
    for name, ok in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                     ("mid_block_add_attention", True), ("force_upcast", None)):
        if ok is not None and name in cfg and cfg[name] != ok:
            raise CheckpointError(f"VAE config: {name}={cfg[name]!r} is not supported (SD uses {ok!r})")
    attn = [t.startswith("Attn") for t in cfg.get("down_block_types", ())]
    return VAEConfig(
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        attn_resolutions=tuple(256 // 2**i for i, a in enumerate(attn) if a),
        embed_dim=cfg.get("latent_channels", 4), z_channels=cfg.get("latent_channels", 4),
        in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=chans[0],
        ch_mult=tuple(c // chans[0] for c in chans), num_res_blocks=cfg.get("layers_per_block", 2),
        scale_factor=cfg.get("scaling_factor", 0.18215),
    )


def _text(folder: Path, sources: list | None = None) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    cfg, sd = _component(folder, sources)
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
    if parameterization:
        pred, source = parameterization, "given by the caller"
    else:
        pred = {"epsilon": "eps", "v_prediction": "v"}.get(sc.get("prediction_type", "epsilon"))
        source = f"{p.relative_to(root)} prediction_type" if "prediction_type" in sc else "default (eps)"
    if pred is None:
        raise CheckpointError(f"{p}: unsupported prediction_type {sc.get('prediction_type')!r}")
    if sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise CheckpointError(f"{p}: only the scaled_linear beta schedule of SD is supported")
    return ScheduleConfig(linear_start=sc.get("beta_start", 0.00085), linear_end=sc.get("beta_end", 0.012),
                          timesteps=sc.get("num_train_timesteps", 1000), parameterization=pred,
                          parameterization_source=source)


def _checked(where: Path, fn, *args):
    # the converters raise ValueError/KeyError on configs or keys outside the SD layout
    try:
        return fn(*args)
    except (ValueError, KeyError, TypeError) as e:
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise CheckpointError(f"{where}: {msg}") from None


def load_diffusers_base(root: Path, dtype: torch.dtype = torch.float32, parameterization: str | None = None,
                        vae_dtype: torch.dtype | None = None, memory_format: torch.memory_format | None = None):
    """A diffusers SD pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``) as our
    BaseModels; sharded and ``fp16``-variant weights are read, ``norm_num_groups`` is carried.
    ``dtype``, ``vae_dtype``, ``memory_format``: as :func:`~ctrlnet.checkpoints.load.load_base`."""
    from ctrlnet.checkpoints.load import BaseModels, _meta, load_into
    from ctrlnet.models.text_encoder import HARMLESS_KEYS, build_text_encoder
    from ctrlnet.models.unet import UNetModel
    from ctrlnet.models.vae import AutoencoderKL

    root = Path(root)
    if not (root / "unet").is_dir():
        raise CheckpointError(f"{root}: not a diffusers pipeline folder (no unet/ subfolder)")
    usrc, vsrc, tsrc = [], [], []
    ucfg, usd = _component(root / "unet", usrc)
    uparams = _checked(root / "unet" / "config.json", du.params_from_diffusers, ucfg, "unet")
    unet_cfg = UNetConfig(**uparams)
    vcfg_raw, vsd = _component(root / "vae", vsrc)
    vae_cfg = _checked(root / "vae" / "config.json", vae_config_from_diffusers, vcfg_raw)
    tcfg, tsd = _checked(root / "text_encoder", _text, root / "text_encoder", tsrc)
    cfg = ModelConfig(name=f"diffusers:{root.name}", unet=unet_cfg, vae=vae_cfg, text=tcfg,
                      schedule=_schedule(root, parameterization))
    unet = load_into(_meta(lambda: UNetModel(**unet_cfg.kwargs()), root / "unet"),
                     _checked(root / "unet", du.from_diffusers, usd, uparams), "UNet", root / "unet", dtype=dtype,
                     memory_format=memory_format, sources=usrc)
    vae = load_into(_meta(lambda: AutoencoderKL(**vae_cfg.kwargs()), root / "vae"),
                    _checked(root / "vae", dv.vae_from_diffusers, vsd), "VAE", root / "vae", dtype=vae_dtype or dtype,
                    sources=vsrc)
    text = load_into(_meta(lambda: build_text_encoder(tcfg, device="meta"), root), tsd, "text encoder",
                     root / "text_encoder", harmless=HARMLESS_KEYS, dtype=dtype, sources=tsrc)
    return BaseModels(cfg, unet.eval(), vae.eval(), text.eval(), str(root))


def is_pipeline_folder(path: Path) -> bool:
    """A diffusers pipeline folder (``model_index.json`` or a ``unet/`` component)."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def pipeline_controlnets(root: Path) -> dict[str, Path]:
    """The ControlNet components of a diffusers pipeline folder, in order: ``controlnet/``, then
    ``controlnet_1``, ``controlnet_2``, ... (how diffusers saves a ``MultiControlNetModel``) or
    ``controlnet_0..N``. Names are ``controlnet``, ``controlnet_1``, ...; empty if there are none."""
    root = Path(root)
    found: dict[int, Path] = {}
    if (root / "controlnet" / "config.json").is_file():
        found[0] = root / "controlnet"
    for sub in root.glob("controlnet_*"):
        tail = sub.name.split("_", 1)[1]
        if tail.isdigit() and (sub / "config.json").is_file():
            i = int(tail)
            if i in found:
                raise CheckpointError(f"{root}: both {found[i].name}/ and {sub.name}/ claim ControlNet number {i}")
            found[i] = sub
    return {("controlnet" if i == 0 else f"controlnet_{i}"): found[i] for i in sorted(found)}


def load_diffusers_controlnet(root: Path, base: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
                              memory_format: torch.memory_format | None = None):
    """A diffusers ControlNetModel folder as our ControlNet.

    A pipeline folder with exactly one ControlNet (``controlnet/``) stands for it; with several,
    :class:`CheckpointError` names the subfolders to choose from.
    """
    from ctrlnet.checkpoints.load import _meta, check_fits, load_into
    from ctrlnet.models.controlnet import ControlNet

    root = Path(root)
    if is_pipeline_folder(root):
        nets = pipeline_controlnets(root)
        if len(nets) != 1:
            which = ", ".join(str(p) for p in nets.values())
            raise CheckpointError(f"{root}: a diffusers pipeline folder with "
                                  + (f"{len(nets)} ControlNets; pass one of {which}" if nets else "no controlnet/ subfolder"))
        root = next(iter(nets.values()))
    src: list = []
    cfg, sd = _component(root, src)
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{root}: config.json describes a {cfg.get('_class_name')}, not a ControlNetModel")
    emb = list(cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    if emb != [16, 32, 96, 256]:
        raise CheckpointError(f"{root / 'config.json'}: conditioning_embedding_out_channels={emb} is not supported "
                              "(the ControlNet hint encoder has [16, 32, 96, 256])")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"{root / 'config.json'}: controlnet_conditioning_channel_order="
                              f"{cfg['controlnet_conditioning_channel_order']!r} is not supported (rgb)")
    params = _checked(root / "config.json", du.params_from_diffusers, cfg, "controlnet")
    if base is not None:
        check_fits(params, base, root)
    net = load_into(_meta(lambda: ControlNet(**params), root), _checked(root, du.from_diffusers, sd, params, "controlnet"),
                    "ControlNet", root, dtype=dtype, memory_format=memory_format, sources=src)
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


def save_diffusers_base(base, out: Path, dtype: torch.dtype | None = None, controlnets: dict | None = None) -> Path:
    """Write BaseModels as a diffusers pipeline folder that ``from_pretrained`` opens with no extra
    argument: UNet, VAE, text encoder, tokenizer, DDIM scheduler and a complete ``model_index.json``;
    with ``controlnets`` a ``StableDiffusionControlNetPipeline`` (``controlnet/``, ``controlnet_1/``, ...)."""
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
    from ctrlnet.checkpoints.diffusers_tokenizer import write_tokenizer

    write_tokenizer(out / "tokenizer", base.text_encoder.pad, t.max_length)
    nets = list((controlnets or {}).values())
    for i, net in enumerate(nets):
        save_diffusers_controlnet(net, out / ("controlnet" if i == 0 else f"controlnet_{i}"), dtype)
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:  # diffusers is not needed to write the folder
        diffusers_version = "0.25.0"
    # every component StableDiffusion(ControlNet)Pipeline.__init__ takes, so from_pretrained needs no
    # extra argument: the optional ones are null, and no safety checker is required
    index = dict(_class_name="StableDiffusionControlNetPipeline" if nets else "StableDiffusionPipeline",
                 _diffusers_version=diffusers_version,
                 unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
                 text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                 scheduler=["diffusers", "DDIMScheduler"], safety_checker=[None, None],
                 feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
    if nets:
        index["controlnet"] = ["diffusers", "ControlNetModel" if len(nets) == 1 else "MultiControlNetModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
