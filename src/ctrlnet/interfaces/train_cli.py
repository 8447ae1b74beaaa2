"""``ctrlnet train``, ``ctrlnet data ...``, ``ctrlnet add-control``, ``ctrlnet demo ...``: thin
argparse layers over :mod:`ctrlnet.training`. Several GPUs: ``accelerate launch -m
ctrlnet.interfaces.cli train ...`` (or ``torchrun``); each process runs the same command."""

from __future__ import annotations

import argparse
from pathlib import Path

RAW = argparse.RawDescriptionHelpFormatter


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"true": True, "false": False}.get(v.lower(), v)


# --- train ---------------------------------------------------------------------------------------


def add_train_parser(sub) -> None:
    """``train``, and ``demo`` (the embedded model's recipe) with it."""
    _add_train_command(sub)
    add_demo_parser(sub)


# TrainConfig fields -> the options that set them (for the resume rules in --help)
TRAIN_FLAGS = {
    "mode": "--mode", "steps": "--steps", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
    "weight_decay": "--weight-decay", "warmup_steps": "--warmup-steps", "lr_decay": "--lr-decay",
    "max_grad_norm": "--max-grad-norm", "sd_locked": "--unlocked", "only_mid_control": "--only-mid-control",
    "prompt_dropout": "--prompt-dropout", "mixed_precision": "--mixed-precision",
    "gradient_checkpointing": "--gradient-checkpointing", "ema_decay": "--ema-decay",
    "checkpoint_every": "--checkpoint-every", "keep_last": "--keep-last", "sample_every": "--sample-every",
    "sample_steps": "--sample-steps", "seed": "--seed", "num_workers": "--workers", "progress": "--no-progress",
    "cpu": "--cpu",
}


def _add_train_command(sub) -> None:
    from ctrlnet.training.resume_settings import resume_settings_help

    p = sub.add_parser(
        "train", help="train a ControlNet (or a small base model / VAE from scratch)",
        description="Train a ControlNet on a data set in the original prompt.json layout or a Hugging Face "
                    "image folder (metadata.jsonl). The ControlNet starts as a copy of the base UNet's encoder "
                    "(add-control) unless --controlnet gives one to continue. Checkpoints are written every "
                    "--checkpoint-every steps (atomically); --resume continues exactly where the newest one "
                    "left off. Logs: RUN/loss.csv (step, loss, lr, ...), RUN/loss.png, RUN/samples/ "
                    "(control / target / prediction). An --out that holds an earlier run (checkpoints or "
                    "loss.csv rows) is never overwritten by accident: pass --resume or --overwrite, or the run "
                    "stops before loading anything. Temp files of writes killed earlier are removed at start.",
        epilog=resume_settings_help(TRAIN_FLAGS) + "\n\n"
               "examples:\n"
               "  ctrlnet data fill50k data/fill50k --n 50000 --size 512\n"
               "  ctrlnet train data/fill50k --base v1-5-pruned.safetensors --out runs/fill50k --steps 10000 \\\n"
               "      --batch-size 4 --grad-accum 4 --mixed-precision fp16 --sample-every 500\n"
               "  ctrlnet train data/fill50k --base v1-5-pruned.safetensors --out runs/fill50k --steps 20000 --resume\n"
               "  accelerate launch --num_processes 4 -m ctrlnet.interfaces.cli train data/fill50k --base sd15.ckpt ...\n"
               "  ctrlnet train data/fill50k --mode base --config demo --out runs/base --lr 3e-4   (from scratch)",
        formatter_class=RAW,
    )
    p.add_argument("data", help="data set folder (prompt.json or metadata.jsonl) or one of those files")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, samples, the exported model")
    m = p.add_argument_group("models")
    m.add_argument("--mode", choices=["controlnet", "base", "vae"], default="controlnet",
                   help="what trains: a ControlNet (default), the base UNet + text encoder, or the VAE")
    m.add_argument("--base", help="Stable Diffusion checkpoint (ours, original single file, or diffusers folder)")
    m.add_argument("--controlnet", help="ControlNet to continue training (default: a fresh add-control copy)")
    m.add_argument("--config", help="model preset for training from scratch (--mode base/vae without --base)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=10000, help="optimizer steps in all (default 10000)")
    t.add_argument("--batch-size", type=int, default=4, help="per process and micro-batch (default 4)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5, the original)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--lr-decay", choices=["constant", "cosine"], default="constant")
    t.add_argument("--max-grad-norm", type=float, default=0.0, help="clip gradients (0: off)")
    t.add_argument("--unlocked", action="store_true",
                   help="sd_locked=False: also train the UNet decoder half and output (the original tier)")
    t.add_argument("--only-mid-control", action="store_true", help="add only the middle-block residual")
    t.add_argument("--prompt-dropout", type=float, default=0.5, help="chance of an empty prompt (default 0.5)")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    t.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    t.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the trained weights (e.g. 0.999)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint that loads (newer unreadable ones "
                        "are renamed *.unreadable and reported; if none loads, the run stops naming them)")
    t.add_argument("--resume-from", metavar="FILE",
                   help="continue from this checkpoint file (it must exist and load); newer checkpoints of "
                        "the same run are renamed *.superseded")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds an earlier run: it is moved aside to "
                        "OUT.replaced-YYYYMMDD-HHMMSS (nothing is deleted), as is an existing --export file")
    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=int, default=None,
                   help="scale the short side to this (multiple of 64) and random-crop a square")
    d.add_argument("--invert-source", action="store_true", help="invert control images (white-background line art)")
    d.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    d.add_argument("--image-column", default="image")
    d.add_argument("--conditioning-image-column", default="conditioning_image")
    d.add_argument("--caption-column", default="text")
    d.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint-every", type=int, default=500)
    o.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default 3)")
    o.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    o.add_argument("--sample-steps", type=int, default=20)
    o.add_argument("--export", help="model file to write at the end (default OUT/<mode>.safetensors)")
    o.add_argument("--no-ema-export", action="store_true", help="export the raw weights even with an EMA")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    o.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _models_for(args):
    from ctrlnet.config import get_preset
    from ctrlnet.training.models import build_models, load_models

    if args.base:
        return load_models(args.base, controlnet=args.controlnet, add_control=args.mode == "controlnet",
                           seed=args.seed)
    if args.mode == "controlnet":
        raise ValueError("ControlNet training needs --base (the model the ControlNet steers)")
    if not args.config:
        raise ValueError("training from scratch needs --config PRESET (e.g. demo)")
    return build_models(get_preset(args.config), seed=args.seed)


def _cmd_train(args) -> int:
    import torch

    from ctrlnet.training.data import collate, dataset_record, open_dataset
    from ctrlnet.training.loop import export_result, train
    from ctrlnet.training.run_start import plan_run

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _train_config(args)
    export = Path(args.export or Path(args.out) / f"{args.mode}.safetensors")
    # every refusal (an earlier run in --out, a bad --resume-from, changed settings) comes before
    # the data set and the models load
    start = plan_run(args.out, cfg, resume=args.resume_from or args.resume, overwrite=args.overwrite,
                     inputs=[args.data, args.base, args.controlnet], export=export)
    ds = open_dataset(args.data, resolution=args.resolution, invert_source=args.invert_source, strict=args.strict,
                      image_column=args.image_column, conditioning_image_column=args.conditioning_image_column,
                      caption_column=args.caption_column)
    start.check_inputs(dataset_record(ds))  # other data: refused before the models load
    models = _models_for(args)
    preview = None
    if args.sample_every:
        preview = collate([ds.load(i) | {"skipped": []} for i in range(min(4, len(ds)))])
    res = train(models, ds, cfg, args.out, preview_batch=preview, start=start)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    export_result(models, cfg, export, use_ema=not args.no_ema_export, checkpoint=res.checkpoint)
    print(f"step {res.step}, loss {res.last_loss:.5f}; wrote {export}"
          + (f"; skipped {res.skipped} bad examples" if res.skipped else ""))
    return 0


def _train_config(args):
    from ctrlnet.training.loop import TrainConfig

    return TrainConfig(
        mode=args.mode, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_decay=args.lr_decay,
        max_grad_norm=args.max_grad_norm, sd_locked=not args.unlocked, only_mid_control=args.only_mid_control,
        prompt_dropout=args.prompt_dropout, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, sample_every=args.sample_every,
        sample_steps=args.sample_steps, seed=args.seed, num_workers=args.workers,
        progress=not args.no_progress, cpu=args.cpu,
    )


# --- data ----------------------------------------------------------------------------------------


def add_resume_args(p: argparse.ArgumentParser, kind: str) -> None:
    """``--resume`` / ``--overwrite`` of a job whose output folder is its alone (see
    :mod:`ctrlnet.training.run_folder`)."""
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted {kind} in OUT (same settings, recorded in OUT/job.json); "
                        "what is written already is kept")
    p.add_argument("--overwrite", action="store_true",
                   help=f"start over when OUT holds an earlier {kind}: it is moved aside to "
                        "OUT.replaced-YYYYMMDD-HHMMSS (nothing is deleted)")


def add_data_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="build training data sets (fill50k, control maps, captions) and check them",
        description="Data set builders writing the original prompt.json layout.",
        epilog="examples:\n"
               "  ctrlnet data fill50k data/fill50k --n 50000 --size 512\n"
               "  ctrlnet data annotate photos/ data/canny --annotator canny --param low_threshold=100\n"
               "  ctrlnet data captions data/canny --captions captions/\n"
               "  ctrlnet data check data/canny",
        formatter_class=RAW,
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    from ctrlnet.interfaces.colorize_cli import add_video_pairs_parser

    add_video_pairs_parser(dsub)  # `ctrlnet data video-pairs`, defined with the colorizer
    f = dsub.add_parser("fill50k", help="circle outlines -> filled circles, prompts naming the colours")
    f.add_argument("out")
    f.add_argument("--n", type=int, default=50000)
    f.add_argument("--size", type=int, default=512)
    f.add_argument("--seed", type=int, default=0)
    add_resume_args(f, "data set")
    a = dsub.add_parser("annotate", help="control maps for a folder of images (targets)")
    a.add_argument("images")
    a.add_argument("out")
    a.add_argument("--annotator", default="canny")
    a.add_argument("--param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="annotator parameter (repeatable)")
    a.add_argument("--resolution", type=int, default=None, help="resize images first (short side, /64)")
    a.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    add_resume_args(a, "data set")
    c = dsub.add_parser("captions", help="merge sidecar .txt captions into prompt.json")
    c.add_argument("root", help="data set folder with prompt.json")
    c.add_argument("--captions", default=None, help="folder of <target stem>.txt (default: next to targets)")
    c.add_argument("--keep", action="store_true", help="keep prompts that are already set")
    k = dsub.add_parser("check", help="load every example and list the bad files")
    k.add_argument("data")
    p.set_defaults(func=_cmd_data, data_parser=p)


def _cmd_data(args) -> int:
    from ctrlnet.training import builders

    cmd = args.data_command
    if cmd is None:
        args.data_parser.print_help()
        return 2
    if cmd == "fill50k":
        path = builders.make_fill50k(args.out, args.n, args.size, seed=args.seed, resume=args.resume,
                                     overwrite=args.overwrite)
        print(f"wrote {args.n} examples; {path}")
    elif cmd == "annotate":
        path, bad = builders.annotate(args.images, args.out, args.annotator, dict(args.param), args.resolution,
                                      args.strict, resume=args.resume, overwrite=args.overwrite)
        print(f"wrote {path}" + (f"; skipped {len(bad)} unreadable: {', '.join(bad)}" if bad else ""))
    elif cmd == "captions":
        n, missing = builders.merge_captions(args.root, args.captions, overwrite=not args.keep)
        print(f"updated {n} prompts" + (f"; {len(missing)} targets have no caption file" if missing else ""))
    elif cmd == "check":
        from ctrlnet.training.data import open_dataset

        ds = open_dataset(args.data)
        bad = ds.check()
        for b in bad:
            print(b)
        print(f"{len(ds) - len(bad)} of {len(ds)} examples are readable")
        return 1 if bad else 0
    return 0


# --- add-control ---------------------------------------------------------------------------------


def add_add_control_parser(sub) -> None:
    p = sub.add_parser(
        "add-control", help="make a new ControlNet from a base model (the original tool_add_control.py)",
        description="Copy the base UNet's encoder into a new ControlNet with zero convolutions, so the "
                    "combined model starts out exactly as the base. Writes control_model.* (and the base "
                    "too with --full) with the model config in the file.",
        epilog="example:\n  ctrlnet add-control v1-5-pruned.safetensors control_sd15_ini.safetensors",
        formatter_class=RAW,
    )
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--full", action="store_true", help="also write the base model (one single file)")
    p.add_argument("--hint-channels", type=int, default=3)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_add_control)


def _cmd_add_control(args) -> int:
    from ctrlnet.checkpoints.save import PREFIXES, save_model_file
    from ctrlnet.interfaces.cli import check_new_output
    from ctrlnet.models.controlnet import ControlNet
    from ctrlnet.training.models import load_models

    check_new_output(args.out, args.force, [args.base])  # a trained ControlNet of that name would be lost
    m = load_models(args.base, add_control=False)
    cn = ControlNet.from_unet(m.unet, args.hint_channels)
    parts = {PREFIXES["controlnet"]: cn.state_dict()}
    if args.full:
        parts.update({PREFIXES["unet"]: m.unet.state_dict(), PREFIXES["vae"]: m.vae.state_dict()})
        text_prefix = PREFIXES["text"] if m.config.text.kind == "clip" else "cond_stage_model.model."
        parts[text_prefix] = m.text.state_dict()
    cfg = m.config.with_(hint_channels=args.hint_channels)
    save_model_file(args.out, parts, cfg, {"source": f"add-control from {Path(args.base).name}"})
    print(f"wrote {args.out}")
    return 0


# --- demo ----------------------------------------------------------------------------------------


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build the embedded demo model from scratch (see ctrlnet.training.demo)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("ctrlnet.training.demo", fromlist=["main"]).main(a.rest))
