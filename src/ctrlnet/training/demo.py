"""The recipe of the embedded default model: fill50k-style data over the CSS colour vocabulary ->
VAE -> latent-diffusion base (UNet and text encoder, from scratch) -> ControlNet on the frozen
base, resumable at any point.

    python -m ctrlnet.training.demo build runs/demo --resume --accelerator   # one GPU: minutes
    python -m ctrlnet.training.demo build runs/demo --resume --threads 2     # 2-core CPU: hours, resumable
    python -m ctrlnet.training.demo ship runs/demo            # -> src/ctrlnet/assets/demo

Each stage keeps its own run folder with checkpoints; a finished stage writes ``DONE.json`` and
is skipped on ``--resume``; an unfinished one continues from its newest checkpoint, so a killed
process loses at most ``checkpoint_every`` steps. The data are the 140 CSS/X11 colour names
(:mod:`ctrlnet.training.colors`) in pairs at least Delta E 40 apart, minus the held-out pairs
``benchmarks/fidelity.py`` scores; the text encoder (CLIP layout, BPE vocabulary, 3 layers of
width 48) trains from scratch with the UNet, so it learns every colour word from the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ctrlnet.config import DEMO, ModelConfig
from ctrlnet.training.builders import make_fill50k
from ctrlnet.training.colors import VOCABULARIES, basic20_pairs, color_pairs, split_pairs, vocabulary
from ctrlnet.training.data import LatentDataset, collate, prompt_json_dataset
from ctrlnet.training.loop import TrainConfig, export_result, train
from ctrlnet.training.models import TrainModels, build_models, load_model_file
from ctrlnet.training.run_folder import prepare_build_dir

BASE_FILE = "demo_base.safetensors"
CONTROL_FILE = "demo_control_fill50k.safetensors"


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and schedules of the demo build.

    Sized for one GPU with ``--accelerator`` (about 9 minutes on an H100/H200, estimated from the
    colorizer recipe's measured 75-82 ms a step there; the stages here have the same per-step
    overheads). On a 2-core CPU the same recipe takes many hours (the 20-colour recipe's
    15,000 smaller steps took 2.5 hours); it resumes across restarts.
    """

    vocabulary: str = "css"  # ctrlnet.training.colors.VOCABULARIES
    n_train: int = 10000
    n_heldout: int = 50
    size: int = 128
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_crop: int = 64
    vae_kl: float = 1e-6
    latents: str = "mean"  # the base and ControlNet train on posterior means ("sample": samples)
    # v-prediction: at high noise the eps target hides the image (sqrt(alpha_bar) ~ 0.07), so an eps
    # base learns to read colours off the noisy latent instead of the prompt; v's target there is
    # the clean latent itself, which has to come from the prompt
    parameterization: str = "v"
    # 140 names: each appears in about 1 prompt in 70, so the base sees ~7,000 uses of each
    # (the 20-colour recipe: 5000 x 32 samples, ~16,000 each of 20 names)
    base_steps: int = 4000
    base_batch: int = 128
    base_lr: float = 3e-4
    base_prompt_dropout: float = 0.1
    base_ema: float = 0.999
    cn_steps: int = 1500
    cn_batch: int = 64
    cn_lr: float = 1e-4
    cn_prompt_dropout: float = 0.5
    cn_ema: float = 0.99
    checkpoint_every: int = 100
    milestone_every: int = 250  # ControlNet checkpoints kept for the IoU-against-steps curve
    sample_every: int = 500
    threads: int = 1
    cpu: bool = True  # False: train on the accelerator (CUDA, MPS) where there is one
    # sampling defaults written into the shipped files (ctrlnet_defaults): what the benchmark uses
    sample_steps: int = 20
    guidance_scale: float = 5.0

    def quick(self) -> "DemoRecipe":
        """A minutes-long smoke version of the same recipe."""
        return replace(self, n_train=64, n_heldout=8, vae_steps=4, base_steps=4, cn_steps=4,
                       vae_batch=2, base_batch=4, cn_batch=4, checkpoint_every=2, milestone_every=2,
                       sample_every=4)

    def defaults(self) -> dict:
        """The ``ctrlnet_defaults`` the shipped files carry."""
        return {"resolution": self.size, "steps": self.sample_steps, "guidance_scale": self.guidance_scale,
                "vocabulary": self.vocabulary}


def _done(stage_dir: Path) -> dict | None:
    f = stage_dir / "DONE.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _mark_done(stage_dir: Path, info: dict) -> None:
    tmp = stage_dir / ".DONE.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, stage_dir / "DONE.json")


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recipe_pairs(r: DemoRecipe) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]:
    """(colours, training pairs, held-out pairs) of the recipe's vocabulary. The 20-colour
    vocabulary keeps its first recipe's pairs (all of them train) so that build is reproduced."""
    colors = vocabulary(r.vocabulary)
    if r.vocabulary == "basic20":
        pairs = basic20_pairs()
        return colors, pairs, pairs
    train_pairs, held_pairs = split_pairs(color_pairs(colors))
    return colors, train_pairs, held_pairs


def stage_data(out: Path, r: DemoRecipe) -> tuple[Path, Path]:
    """Training examples from the training pairs; the previews' held-out examples from the
    held-out pairs (another seed)."""
    train_dir, held_dir = out / "data" / "train", out / "data" / "heldout"
    colors, train_pairs, held_pairs = recipe_pairs(r)
    if not (train_dir / "prompt.json").is_file():
        _log(f"writing {r.n_train} training examples at {r.size}px: {len(colors)} colours, "
             f"{len(train_pairs)} training pairs ({len(held_pairs)} held out)")
        make_fill50k(train_dir, r.n_train, r.size, seed=r.seed, colors=colors, pairs=train_pairs,
                     resume=True)  # the build's own folder
    if not (held_dir / "prompt.json").is_file():
        make_fill50k(held_dir, r.n_heldout, r.size, seed=r.seed + 100_003, colors=colors, pairs=held_pairs,
                     resume=True)
    return train_dir, held_dir


def preview_batch(held_dir: Path, n: int = 4) -> dict:
    ds = prompt_json_dataset(held_dir, random_crop=False)
    return collate([ds[i] for i in range(min(n, len(ds)))])


@torch.no_grad()
def latent_scale(models: TrainModels, data_dir: Path, n: int = 256) -> float:
    """1 / std of the VAE's latents, as LDM sets ``scale_factor`` (unit-variance latents)."""
    ds = prompt_json_dataset(data_dir, random_crop=False)
    xs = collate([ds[i] for i in range(min(n, len(ds)))])["jpg"].permute(0, 3, 1, 2)
    z = torch.cat([models.vae.encode(xs[i:i + 32]).sample(torch.Generator().manual_seed(i))
                   for i in range(0, len(xs), 32)])
    return float(1.0 / z.flatten().std())


def reconstruction_error(vae, data_dir: Path, n: int = 50) -> float:
    """Mean absolute error of the VAE's round trip on ``data_dir``'s targets, in 0-255 levels."""
    ds = prompt_json_dataset(data_dir, random_crop=False)
    errs = []
    with torch.no_grad():
        for i in range(min(n, len(ds))):
            x = torch.as_tensor(ds[i]["jpg"]).permute(2, 0, 1)[None]
            y = vae.decode(vae.encode(x).mode() * vae.scale_factor).clamp(-1, 1)
            errs.append(float((y - x).abs().mean()) * 127.5)
    return sum(errs) / len(errs)


def stage_vae(out: Path, r: DemoRecipe, train_dir: Path, held_dir: Path, config: ModelConfig,
              resume: bool) -> Path:
    """The autoencoder, on native-scale crops (cheap steps); its encoder fixes the latent space."""
    sdir = out / "vae"
    target = sdir / "vae.safetensors"
    if _done(sdir) and target.is_file():
        return target
    ds = prompt_json_dataset(train_dir, crop_size=r.vae_crop)
    models = build_models(config, seed=r.seed)
    models.unet = None  # the VAE stage needs only the VAE; the text tower is built for the file
    cfg = TrainConfig(mode="vae", steps=r.vae_steps, batch_size=r.vae_batch, lr=r.vae_lr, kl_weight=r.vae_kl,
                      warmup_steps=50, lr_decay="cosine", checkpoint_every=r.checkpoint_every, keep_last=2,
                      sample_every=r.sample_every, seed=r.seed, cpu=r.cpu)
    _log(f"VAE: {cfg.steps} steps of {cfg.batch_size} {r.vae_crop}px crops")
    res = train(models, ds, cfg, sdir, resume=resume, preview_batch=preview_batch(held_dir))
    if res.step < cfg.steps:
        raise SystemExit(f"VAE stage stopped at step {res.step}; rerun with --resume")
    models.vae.cpu().eval()  # the measurements below run on the CPU
    # a new latent space: unit-variance latents, as LDM sets ``scale_factor``
    scale = latent_scale(models, train_dir)
    config = config.with_(vae=replace(config.vae, scale_factor=round(scale, 5)))
    models.config = config
    models.vae.scale_factor = config.vae.scale_factor
    from ctrlnet.checkpoints.save import save_model_file

    save_model_file(target, {"first_stage_model.": models.vae.state_dict()}, config)
    err = reconstruction_error(models.vae, held_dir)
    _mark_done(sdir, {"step": res.step, "loss": res.last_loss, "scale_factor": config.vae.scale_factor,
                      "heldout_error_levels": round(err, 2)})
    _log(f"VAE done: loss {res.last_loss:.4f}, scale_factor {config.vae.scale_factor}, "
         f"held-out round-trip error {err:.1f} levels")
    return target


def _load_vae(path: Path):
    from safetensors.torch import load_file

    from ctrlnet.checkpoints.save import read_config
    from ctrlnet.models.vae import AutoencoderKL

    config = read_config(path)
    vae = AutoencoderKL(**config.vae.kwargs())
    sd = load_file(str(path))
    vae.load_state_dict({k[len("first_stage_model."):]: v for k, v in sd.items()}, strict=True)
    return config, vae.eval()


@torch.no_grad()
def stage_cache(out: Path, train_dir: Path, vae_file: Path, cpu: bool = True) -> Path:
    """Encode every training target once: moments, gray hints and prompts in one file."""
    from ctrlnet.runtime.device import resolve_device

    cache = out / "latents.pt"
    if cache.is_file():
        return cache
    _, vae = _load_vae(vae_file)
    dev = resolve_device("cpu" if cpu else "auto")
    vae.to(dev)
    ds = prompt_json_dataset(train_dir, random_crop=False)
    moments, hints, prompts = [], [], []
    _log(f"encoding {len(ds)} targets on {dev}")
    for i in range(0, len(ds), 64):
        b = collate([ds[j] for j in range(i, min(i + 64, len(ds)))])
        moments.append(vae.quant_conv(vae.encoder(b["jpg"].permute(0, 3, 1, 2).to(dev))).half().cpu())
        hints.append((b["hint"][..., 0] * 255).round().to(torch.uint8))  # the hint is gray
        prompts += b["txt"]
    from ctrlnet.training.state import atomic_torch_save

    atomic_torch_save({"moments": torch.cat(moments), "hints": torch.cat(hints), "prompts": prompts}, cache)
    return cache


def _latent_dataset(cache: Path) -> LatentDataset:
    c = torch.load(cache, map_location="cpu")
    return LatentDataset(c["moments"], c["hints"], c["prompts"])


def stage_base(out: Path, r: DemoRecipe, cache: Path, held_dir: Path, vae_file: Path, resume: bool,
               config: ModelConfig = DEMO) -> Path:
    sdir = out / "base"
    target = sdir / BASE_FILE
    if _done(sdir) and target.is_file():
        return target
    vae_config, vae = _load_vae(vae_file)
    config = config.with_(vae=vae_config.vae)  # the trained VAE with its measured scale_factor
    models = build_models(config, seed=r.seed + 1)
    models.vae = vae
    cfg = TrainConfig(mode="base", steps=r.base_steps, batch_size=r.base_batch, lr=r.base_lr, warmup_steps=200,
                      lr_decay="cosine", prompt_dropout=r.base_prompt_dropout, ema_decay=r.base_ema,
                      max_grad_norm=1.0, checkpoint_every=r.checkpoint_every, keep_last=2,
                      sample_every=r.sample_every, seed=r.seed + 1, cpu=r.cpu,
                      sample_latents=r.latents == "sample")
    _log(f"base: {cfg.steps} steps of batch {cfg.batch_size}")
    res = train(models, _latent_dataset(cache), cfg, sdir, resume=resume, preview_batch=preview_batch(held_dir))
    if res.step < cfg.steps:
        raise SystemExit(f"base stage stopped at step {res.step}; rerun with --resume")
    export_result(models, cfg, target, use_ema=True, checkpoint=res.checkpoint)
    _mark_done(sdir, {"step": res.step, "loss": res.last_loss})
    _log(f"base done: loss {res.last_loss:.4f}")
    return target


def stage_controlnet(out: Path, r: DemoRecipe, cache: Path, held_dir: Path, base_file: Path, resume: bool) -> Path:
    sdir = out / "controlnet"
    target = sdir / CONTROL_FILE
    if _done(sdir) and target.is_file():
        return target
    models = load_model_file(base_file, with_controlnet=True)
    cfg = TrainConfig(mode="controlnet", steps=r.cn_steps, batch_size=r.cn_batch, lr=r.cn_lr, warmup_steps=0,
                      prompt_dropout=r.cn_prompt_dropout, ema_decay=r.cn_ema, sd_locked=True,
                      checkpoint_every=r.checkpoint_every, keep_last=2, keep_every=r.milestone_every,
                      sample_every=r.sample_every, seed=r.seed + 2, cpu=r.cpu,
                      sample_latents=r.latents == "sample")
    _log(f"ControlNet: {cfg.steps} steps of batch {cfg.batch_size}")
    res = train(models, _latent_dataset(cache), cfg, sdir, resume=resume, preview_batch=preview_batch(held_dir))
    if res.step < cfg.steps:
        raise SystemExit(f"ControlNet stage stopped at step {res.step}; rerun with --resume")
    export_result(models, cfg, target, use_ema=True, checkpoint=res.checkpoint)
    _mark_done(sdir, {"step": res.step, "loss": res.last_loss})
    _log(f"ControlNet done: loss {res.last_loss:.4f}")
    return target


STAGES = ("data", "vae", "base", "controlnet")
DATA_FIELDS = ("vocabulary", "n_train", "n_heldout", "size", "seed")  # what the data stage depends on


def build(out, recipe: DemoRecipe = DemoRecipe(), resume: bool = False, config: ModelConfig = DEMO,
          until: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Run (or continue) every stage; returns the files made. ``until`` stops after that stage.
    A non-empty ``out`` needs ``resume`` or ``overwrite`` (moved aside; see ``prepare_build_dir``)."""
    out = prepare_build_dir(out, resume, recipe.threads, overwrite)
    config = config.with_(schedule=replace(config.schedule, parameterization=recipe.parameterization))
    rfile = out / "recipe.json"
    if rfile.is_file():
        stored = {"vocabulary": "basic20", **json.loads(rfile.read_text())}  # older builds: 20 colours
        changed = sorted(k for k in DATA_FIELDS if stored.get(k) != getattr(recipe, k))
        if changed:  # the data (and all that was trained on it) would not be this recipe's
            raise SystemExit(f"{out} was built with other data settings ({', '.join(changed)}: "
                             f"{[stored.get(k) for k in changed]}); use another folder")
        if stored != asdict(recipe):
            _log(f"note: recipe differs from the one stored in {rfile}; continuing with the new one")
    rfile.write_text(json.dumps(asdict(recipe), indent=1))
    t0 = time.time()
    files: dict[str, Path] = {}
    train_dir, held_dir = stage_data(out, recipe)
    if until == "data":
        return files
    files["vae"] = stage_vae(out, recipe, train_dir, held_dir, config, resume)
    if until == "vae":
        return files
    cache = stage_cache(out, train_dir, files["vae"], recipe.cpu)
    files["base"] = stage_base(out, recipe, cache, held_dir, files["vae"], resume, config)
    if until == "base":
        return files
    files["controlnet"] = stage_controlnet(out, recipe, cache, held_dir, files["base"], resume)
    _log(f"build finished in {time.time() - t0:.0f} s this session")
    return files


def ship(out, dest) -> list[Path]:
    """Copy the finished base and ControlNet as fp16 safetensors into ``dest`` (the package assets),
    with the recipe's sampling defaults (resolution, steps, guidance, vocabulary) in their
    ``ctrlnet_defaults`` metadata."""
    from safetensors.torch import load_file

    from ctrlnet.checkpoints.save import CONFIG_KEY, read_config, save_model_file

    from ctrlnet.checkpoints.defaults import defaults_metadata

    out, dest = Path(out), Path(dest)
    rfile = out / "recipe.json"
    if not rfile.is_file():
        raise SystemExit(f"{rfile} is missing; is {out} a demo build folder?")
    stored = json.loads(rfile.read_text())
    known = {k: v for k, v in stored.items() if k in DemoRecipe.__dataclass_fields__}
    # a build from before the vocabulary was recorded used the 20 colours
    defaults = replace(DemoRecipe(), **{"vocabulary": "basic20", **known}).defaults()
    written = []
    for src in (out / "base" / BASE_FILE, out / "controlnet" / CONTROL_FILE):
        if not src.is_file():
            raise SystemExit(f"{src} is missing; finish the build first")
        sd = load_file(str(src))
        prefixes = sorted({k.split(".")[0] + "." for k in sd})
        groups = {}
        for k, v in sd.items():
            for p in ("model.diffusion_model.", "control_model.", "first_stage_model.",
                      "cond_stage_model.transformer."):
                if k.startswith(p):
                    groups.setdefault(p, {})[k[len(p):]] = v
                    break
            else:
                raise ValueError(f"{src}: unexpected key {k} (prefixes {prefixes})")
        meta = {"source": "ctrlnet.training.demo", "built": time.strftime("%Y-%m-%d"), **defaults_metadata(defaults)}
        written.append(save_model_file(dest / src.name, groups, read_config(src), meta, dtype=torch.float16))
    total = sum(p.stat().st_size for p in written)
    _log(f"shipped {[str(p) for p in written]}: {total / 2**20:.1f} MiB ({CONFIG_KEY} kept)")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctrlnet.training.demo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or continue) the demo model from scratch")
    b.add_argument("out", help="work folder (data, checkpoints, logs)")
    b.add_argument("--resume", action="store_true", help="continue a build in OUT")
    b.add_argument("--overwrite", action="store_true", help="move an earlier build in OUT aside and start over")
    b.add_argument("--quick", action="store_true", help="a minutes-long smoke run of the recipe")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave a core free)")
    b.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    b.add_argument("--accelerator", action="store_true", help="train on CUDA/MPS where there is one")
    b.add_argument("--vocabulary", choices=sorted(VOCABULARIES), default=None,
                   help="colour names (default css: the 140 CSS/X11 names; basic20: the first model's)")
    for name in ("n_train", "vae_steps", "vae_batch", "base_steps", "base_batch", "cn_steps", "cn_batch"):
        b.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the recipe's {name}")
    s = sub.add_parser("ship", help="write the finished model as fp16 files into the package assets")
    s.add_argument("out")
    s.add_argument("dest", nargs="?", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo"))
    args = ap.parse_args(argv)
    if args.cmd == "build":
        recipe = DemoRecipe(threads=args.threads, cpu=not args.accelerator)
        if args.quick:
            recipe = recipe.quick()
        names = ("vocabulary", "n_train", "vae_steps", "vae_batch", "base_steps", "base_batch", "cn_steps", "cn_batch")
        recipe = replace(recipe, **{k: getattr(args, k) for k in names if getattr(args, k) is not None})
        build(args.out, recipe, resume=args.resume, until=args.until, overwrite=args.overwrite)
    else:
        ship(args.out, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
