"""The recipe of the shipped reference colorizer: synthetic clips (by default the isoluminant kind,
where lightness cannot decide colour; :mod:`ctrlnet.colorize.synthetic`) -> video pairs -> the base's
autoencoder fine-tuned on their frames -> a :class:`ReferenceControlNet` trained on the frozen
demo UNet with the common training loop. The file holds the net and its autoencoder.

    python -m ctrlnet.colorize.recipe build runs/colorize --resume --accelerator  # CUDA/MPS; CPU without it
    python -m ctrlnet.colorize.recipe ship runs/colorize            # -> src/ctrlnet/assets/demo/

Stages keep their outputs in OUT (``videos/`` with ``--through-codec``, ``data/``, ``vae/``, ``latents.pt``,
``train/``); a
finished stage is skipped on ``--resume`` and training continues from its newest checkpoint, so a killed
run loses at most ``checkpoint_every`` steps. ``--quick`` is a minutes-long smoke run;
``--base random:tiny-sd1`` runs the recipe without the demo base (for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ctrlnet.colorize.reference_model import (KIND_KEY, ReferenceControlNet, load_reference_controlnet,
                                               load_reference_vae, save_reference_controlnet)
from ctrlnet.training.run_folder import prepare_build_dir

TRAINED_FILE = "colorize_reference.safetensors"


@dataclass(frozen=True)
class ColorizeRecipe:
    """Sizes and schedule. The shipped file of 2026-11-22 was made with these sizes from classic
    clips through H.264 (``clips="classic", through_codec=True``) on one H100 with ``--accelerator``
    (VAE 7.5 min, ControlNet 3.3 min); the defaults now train on isoluminant clips rendered
    straight into pairs (no PyAV needed). On 2 CPU threads a run takes hours (resumable; not
    timed end to end): a 3000-step batch-4 VAE took 29 min there, with a chroma floor of 20.6, not 11.0."""

    # "isoluminant": clips whose lightness levels each hold two hues (a lightness -> colour table
    # fails on them); "classic": the first colorizer's clips; "mixed": every other clip of each
    clips: str = "isoluminant"
    # True: clips go through H.264 files and back (the first colorizer's data, needs PyAV); False:
    # pairs come straight from the rendered frames (as the benchmark sees them; no PyAV needed)
    through_codec: bool = False
    n_clips: int = 400
    n_heldout: int = 12
    clip_frames: int = 48
    size: int = 128
    fps: int = 24
    # pair similarity range (SSIM of lightness; ctrlnet.colorize.pairs); None: the clip kind's
    # (PAIR_SIMILARITY): outlined isoluminant shapes lose similarity fast, so their range sits lower
    low: float | None = None
    high: float | None = None
    min_gap: int = 3
    max_gap: int = 24
    seed: int = 0
    # the demo VAE learnt fill50k's flat colours: its round trip loses most of these frames'
    # chroma (vae_chroma_error 32.1; gray scores 59.2), so it is fine-tuned first (-> 11.0)
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-4
    steps: int = 2400
    batch: int = 32
    lr: float = 1e-4
    ema: float = 0.99
    checkpoint_every: int = 100
    threads: int = 1
    cpu: bool = True  # False: train on the accelerator (CUDA, MPS) where there is one

    def quick(self) -> "ColorizeRecipe":
        """A smoke version of the same recipe."""
        return replace(self, n_clips=4, n_heldout=2, clip_frames=24, vae_steps=2, vae_batch=2, steps=4, batch=2,
                       checkpoint_every=2)


HELDOUT_SEED = 1_000_003  # clip seeds seed + i for training, HELDOUT_SEED + i held out
CLIP_MIXES = ("isoluminant", "classic", "mixed")
CLIPS_KEY = "ctrlnet_colorize_clips"  # shipped-file metadata: the clip kind it was trained on
# Similarity ranges per clip kind, chosen so pairs span a few to ~15 frames at 128 px (measured on
# 8 clips of 48 frames: isoluminant 0.45-0.70 gives 12 pairs a clip, gaps 5 / 8 / 15 frames at the
# 10th / 50th / 90th percentile; classic 0.94-0.97 is the first colorizer's range).
PAIR_SIMILARITY = {"isoluminant": (0.45, 0.70), "classic": (0.94, 0.97)}


def pair_range(r: "ColorizeRecipe", kind: str) -> tuple[float, float]:
    """The similarity range for clips of ``kind``: the recipe's ``low``/``high`` where set."""
    lo, hi = PAIR_SIMILARITY[kind]
    return (r.low if r.low is not None else lo), (r.high if r.high is not None else hi)


def clip_kind(mix: str, i: int) -> str:
    """The kind of clip ``i`` of a recipe whose ``clips`` setting is ``mix``."""
    if mix not in CLIP_MIXES:
        raise ValueError(f"clips must be one of {', '.join(CLIP_MIXES)}, got {mix!r}")
    if mix == "mixed":
        return ("isoluminant", "classic")[i % 2]
    return mix


def _log(msg: str) -> None:
    print(f"[colorize {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_videos(out: Path, r: ColorizeRecipe) -> tuple[list[Path], list[Path]]:
    """Write the synthetic clips (H.264) once; returns (training, held-out) paths."""
    from ctrlnet.colorize.synthetic import make_clip
    from ctrlnet.colorize.video import write_video

    made = []
    for split, n, seed0 in (("train", r.n_clips, r.seed), ("heldout", r.n_heldout, HELDOUT_SEED + r.seed)):
        folder = out / "videos" / split
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n):
            p = folder / f"clip_{i:05d}.mp4"
            if not p.is_file():
                write_video(make_clip(clip_kind(r.clips, i), r.clip_frames, r.size, seed=seed0 + i), p, r.fps)
            paths.append(p)
        made.append(paths)
    return made[0], made[1]


def stage_pairs(out: Path, r: ColorizeRecipe) -> Path:
    """Training triples from the training clips: through the video files of :func:`stage_videos`
    (``through_codec``) or straight from the rendered frames."""
    from ctrlnet.colorize.pairs import frame_pairs, video_pairs
    from ctrlnet.colorize.synthetic import make_clip

    from ctrlnet.training.builders import read_jsonl, write_jsonl

    data = out / "data" / "train"
    if not (data / "prompt.json").is_file():
        kinds = sorted({clip_kind(r.clips, i) for i in range(r.n_clips)})
        rows = []
        for kind in kinds:  # each kind with its own similarity range, in its own subfolder
            idx = [i for i in range(r.n_clips) if clip_kind(r.clips, i) == kind]
            sub = data / kind
            if r.through_codec:
                videos, _ = stage_videos(out, r)
                # resume=True: the folder is the build's own, a killed stage continues by clip
                video_pairs([videos[i] for i in idx], sub, *pair_range(r, kind), r.min_gap, r.max_gap, resume=True)
            else:
                clips = [(f"clip_{i:05d}", lambda i=i: make_clip(kind, r.clip_frames, r.size, seed=r.seed + i))
                         for i in idx]  # rendered only for clips not paired before
                frame_pairs(clips, sub, *pair_range(r, kind), r.min_gap, r.max_gap, resume=True,
                            settings={"builder": "clip-pairs", "clips": kind, "clip_frames": r.clip_frames,
                                      "size": r.size, "seeds": [r.seed + i for i in idx]})
            for row in read_jsonl(sub / "prompt.json"):
                rows.append({**row, **{k: f"{kind}/{row[k]}" for k in ("source", "target", "reference")}})
        write_jsonl(data / "prompt.json", rows)
        _log(f"{len(rows)} pairs from {r.n_clips} {r.clips} clips")
        if not rows:
            raise SystemExit("no pairs in the similarity range; widen --similarity")
    return data


def resolve_base(spec: str) -> str:
    """``demo`` -> the embedded base file; paths and ``random:<preset>`` as given."""
    if spec != "demo":
        return spec
    from ctrlnet.pipeline import DEMO_BASE, demo_dir

    for name in (DEMO_BASE, "demo_base.safetensors"):
        if (demo_dir() / name).is_file():
            return str(demo_dir() / name)
    raise SystemExit(f"the demo base is not built yet (no {DEMO_BASE} in {demo_dir()}); "
                     "build it first or pass --base random:tiny-sd1 / a checkpoint")


def train_models(base: str, seed: int = 0):
    """TrainModels of the base plus a fresh :class:`ReferenceControlNet`."""
    from ctrlnet.checkpoints.save import read_config
    from ctrlnet.pipeline import random_base
    from ctrlnet.training.models import TrainModels, load_model_file, load_models

    if base.startswith("random:"):  # random weights everywhere (a zero UNet output would pass no gradient)
        b = random_base(base.split(":", 1)[1], seed=seed)
        models = TrainModels(b.config, b.unet, b.vae, b.text_encoder)
    elif Path(base).is_file() and str(base).endswith(".safetensors") and read_config(base) is not None:
        models = load_model_file(base)
    else:
        models = load_models(base, add_control=False)
    for m in (models.unet, models.vae, models.text):
        m.float().eval()
    models.controlnet = ReferenceControlNet.from_unet(models.unet)
    return models


@torch.no_grad()
def vae_chroma_error(vae, r: ColorizeRecipe, n_clips: int = 5, frames: int = 3) -> float:
    """Chroma error (:func:`~ctrlnet.colorize.lab.chroma_error`) of the autoencoder's round trip,
    lightness merged back as at inference, on frames of held-out clips: the colorizer's floor."""
    from ctrlnet.colorize.lab import chroma_error, merge_luminance
    from ctrlnet.colorize.synthetic import make_clip

    errs = []
    p = next(vae.parameters())
    for c in range(n_clips):
        for f in make_clip(clip_kind(r.clips, c), frames, r.size, seed=HELDOUT_SEED + r.seed + c):
            x = torch.from_numpy(f.copy()).permute(2, 0, 1)[None].to(p) / 127.5 - 1.0
            y = vae.decode(vae.encode(x).mode() * vae.scale_factor).clamp(-1, 1)
            y = ((y[0].permute(1, 2, 0).float() + 1.0) * 127.5).round().byte().cpu().numpy()
            errs.append(chroma_error(merge_luminance(y, f), f))
    return sum(errs) / len(errs)


def stage_vae(out: Path, r: ColorizeRecipe, data: Path, models, resume: bool) -> Path:
    """Fine-tune the base's whole autoencoder on the training frames (the UNet stays as it is;
    the ControlNet learns the new latents) and install it in ``models``."""
    from ctrlnet.checkpoints.save import PREFIXES, save_model_file
    from ctrlnet.training.data import prompt_json_dataset
    from ctrlnet.training.loop import TrainConfig, train

    sdir = out / "vae"
    target = sdir / "vae.safetensors"
    if (sdir / "DONE.json").is_file() and target.is_file():
        models.vae = load_reference_vae(target, models.config)
        return target
    before = vae_chroma_error(models.vae, r)
    unet, models.unet = models.unet, None  # the VAE stage trains the VAE alone
    controlnet, models.controlnet = models.controlnet, None
    cfg = TrainConfig(mode="vae", steps=r.vae_steps, batch_size=r.vae_batch, lr=r.vae_lr, kl_weight=1e-6,
                      warmup_steps=50, lr_decay="cosine", checkpoint_every=min(250, r.vae_steps), keep_last=2,
                      sample_every=0, seed=r.seed + 3, cpu=r.cpu)
    _log(f"VAE: {cfg.steps} steps of {cfg.batch_size} {r.vae_crop}px crops")
    res = train(models, prompt_json_dataset(data, crop_size=r.vae_crop), cfg, sdir, resume=resume)
    models.unet, models.controlnet = unet, controlnet
    if res.step < cfg.steps:
        raise SystemExit(f"VAE stage stopped at step {res.step}; rerun with --resume")
    models.vae.float().eval().requires_grad_(False)
    save_model_file(target, {PREFIXES["vae"]: models.vae.state_dict()}, models.config)
    after = vae_chroma_error(models.vae, r)
    (sdir / "DONE.json").write_text(json.dumps({"step": res.step, "loss": res.last_loss, "heldout_chroma_error":
                                                {"base": round(before, 2), "tuned": round(after, 2)}}))
    _log(f"VAE done: loss {res.last_loss:.4f}; held-out round-trip chroma error {before:.1f} -> {after:.1f}")
    return target


@torch.no_grad()
def stage_cache(out: Path, data: Path, models, cpu: bool = True) -> Path:
    """Encode every triple once: target moments, reference latents (mean), gray targets."""
    from ctrlnet.image import load_image
    from ctrlnet.runtime.device import resolve_device
    from ctrlnet.training.builders import read_jsonl
    from ctrlnet.training.state import atomic_torch_save

    cache = out / "latents.pt"
    if cache.is_file():
        return cache
    rows = read_jsonl(data / "prompt.json")
    vae = models.vae
    dev = resolve_device("cpu" if cpu else "auto")
    vae.to(dev)
    moments, refs, grays, prompts = [], [], [], []
    _log(f"encoding {len(rows)} triples")
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]

        def batch(key):
            x = torch.stack([torch.from_numpy(load_image(data / r[key]).copy()) for r in chunk])  # (B, H, W, 3)
            return x.permute(0, 3, 1, 2).to(dev, torch.float32) / 127.5 - 1.0

        moments.append(vae.quant_conv(vae.encoder(batch("target"))).half().cpu())
        refs.append(vae.encode_latents(batch("reference")).half().cpu())
        grays.append(torch.stack([torch.from_numpy(load_image(data / r["source"])[:, :, 0].copy()) for r in chunk]))
        prompts += [r.get("prompt", "") for r in chunk]
    atomic_torch_save({"moments": torch.cat(moments), "refs": torch.cat(refs), "grays": torch.cat(grays),
                       "prompts": prompts, "scale_factor": vae.scale_factor}, cache)
    return cache


def stage_train(out: Path, r: ColorizeRecipe, cache: Path, models, resume: bool) -> Path:
    from ctrlnet.colorize.dataset import ReferenceLatentDataset
    from ctrlnet.training.loop import TrainConfig, export_result, train

    sdir = out / "train"
    target = sdir / TRAINED_FILE
    done = sdir / "DONE.json"
    if done.is_file() and target.is_file():
        return target
    c = torch.load(cache, map_location="cpu")
    ds = ReferenceLatentDataset(c["moments"], c["refs"], c["grays"], c["prompts"])
    cfg = TrainConfig(mode="controlnet", steps=r.steps, batch_size=r.batch, lr=r.lr, prompt_dropout=0.5,
                      ema_decay=r.ema, sd_locked=True, checkpoint_every=r.checkpoint_every, keep_last=2,
                      sample_every=0, seed=r.seed + 5, cpu=r.cpu)
    _log(f"training: {cfg.steps} steps of batch {cfg.batch_size} on {len(ds)} triples")
    res = train(models, ds, cfg, sdir, resume=resume)
    if res.step < cfg.steps:
        raise SystemExit(f"training stopped at step {res.step}; rerun with --resume")
    export_result(models, cfg, target, use_ema=True, checkpoint=res.checkpoint, metadata={KIND_KEY: "reference"})
    net = load_reference_controlnet(target, base=models.config)  # then the autoencoder beside it
    save_reference_controlnet(net, target, models.config, vae=models.vae)
    done.write_text(json.dumps({"step": res.step, "loss": res.last_loss}))
    _log(f"training done: loss {res.last_loss:.4f} -> {target}")
    return target


def build(out, recipe: ColorizeRecipe = ColorizeRecipe(), base: str = "demo", resume: bool = False,
          until: str | None = None, overwrite: bool = False) -> Path:
    """Run (or continue) every stage; returns the trained colorizer file (or, with
    ``until="pairs"``, the pairs folder: the data stages need no base model). A non-empty ``out``
    needs ``resume`` or ``overwrite`` (moved aside; see ``prepare_build_dir``); a resumed build
    must have been made from the same clips."""
    out = prepare_build_dir(out, resume, recipe.threads, overwrite)
    clip_kind(recipe.clips, 0)  # a bad setting fails before any work
    rfile = out / "recipe.json"
    if rfile.is_file():
        stored = {"clips": "classic", **json.loads(rfile.read_text())}  # older builds: classic clips
        stored.setdefault("through_codec", True)
        changed = sorted(k for k in ("clips", "through_codec", "n_clips", "clip_frames", "size", "seed")
                         if stored.get(k) != getattr(recipe, k))
        if changed:
            raise SystemExit(f"{out} was built from other clips ({', '.join(changed)}); use another folder")
    rfile.write_text(json.dumps({**asdict(recipe), "base": base}, indent=1))
    data = stage_pairs(out, recipe)
    if until == "pairs":
        return data
    base_path = resolve_base(base)
    models = train_models(base_path, seed=recipe.seed)
    stage_vae(out, recipe, data, models, resume)
    cache = stage_cache(out, data, models, recipe.cpu)
    return stage_train(out, recipe, cache, models, resume)


def ship(out, dest=None) -> Path:
    """Write the trained colorizer as fp16 into ``dest`` (default: the package's demo assets)."""
    from ctrlnet.checkpoints.defaults import defaults_metadata
    from ctrlnet.checkpoints.save import read_config
    from ctrlnet.pipeline import demo_dir

    src = Path(out) / "train" / TRAINED_FILE
    if not src.is_file():
        raise SystemExit(f"{src} is missing; finish the build first")
    config = read_config(src)
    net = load_reference_controlnet(src, base=config)
    vae = load_reference_vae(src, config)
    dest = Path(dest) if dest else demo_dir()
    stored = json.loads((Path(out) / "recipe.json").read_text()) if (Path(out) / "recipe.json").is_file() else {}
    defaults = {"resolution": int(stored.get("size", ColorizeRecipe.size)), "steps": 20, "guidance_scale": 1.0}
    meta = {**defaults_metadata(defaults), CLIPS_KEY: str(stored.get("clips", "classic"))}
    path = save_reference_controlnet(net, dest / TRAINED_FILE, config, dtype=torch.float16, vae=vae, metadata=meta)
    _log(f"shipped {path}: {path.stat().st_size / 2**20:.1f} MiB")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctrlnet.colorize.recipe", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or continue) the reference colorizer")
    b.add_argument("out", help="work folder (videos, pairs, checkpoints, logs)")
    b.add_argument("--base", default="demo", help="demo, a base checkpoint, or random:<preset>")
    b.add_argument("--resume", action="store_true", help="continue a build in OUT")
    b.add_argument("--overwrite", action="store_true", help="move an earlier build in OUT aside and start over")
    b.add_argument("--quick", action="store_true", help="a minutes-long smoke run")
    b.add_argument("--steps", type=int, default=None, help="override the number of ControlNet training steps")
    b.add_argument("--batch", type=int, default=None, help="override the ControlNet batch size")
    b.add_argument("--vae-steps", type=int, default=None, help="override the number of VAE fine-tuning steps")
    b.add_argument("--vae-batch", type=int, default=None, help="override the VAE batch size")
    b.add_argument("--accelerator", action="store_true", help="train on CUDA/MPS where there is one")
    b.add_argument("--size", type=int, default=None, help="clip size in pixels (default 128)")
    b.add_argument("--clips", choices=CLIP_MIXES, default=None,
                   help="synthetic clip kind (default isoluminant; mixed: every other clip classic)")
    b.add_argument("--through-codec", action="store_true",
                   help="pass the clips through H.264 files (PyAV), as the first colorizer's data")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave a core free)")
    b.add_argument("--until", choices=["pairs"], default=None,
                   help="stop after the data stages (they need no base model)")
    s = sub.add_parser("ship", help="write the trained colorizer as fp16 into the package assets")
    s.add_argument("out")
    s.add_argument("dest", nargs="?", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        r = ColorizeRecipe(threads=args.threads)
        if args.quick:
            r = r.quick()
        overrides = {"steps": args.steps, "batch": args.batch, "vae_steps": args.vae_steps,
                     "vae_batch": args.vae_batch}
        r = replace(r, cpu=not args.accelerator, **{k: v for k, v in overrides.items() if v is not None})
        if args.size is not None:
            r = replace(r, size=args.size)
        if args.clips is not None:
            r = replace(r, clips=args.clips)
        if args.through_codec:
            r = replace(r, through_codec=True)
        print(build(args.out, r, base=args.base, resume=args.resume, until=args.until, overwrite=args.overwrite))
    else:
        ship(args.out, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
