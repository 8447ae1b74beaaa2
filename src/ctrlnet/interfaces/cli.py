"""The ``ctrlnet`` command: thin subcommands over the Python API.

Exit codes: 0 success, 1 runtime failure, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Subcommand modules that add themselves with add_parser(subparsers); missing ones are skipped
# so a partial install (no training extras, say) still has a working CLI.
_PLUGINS = [
    ("ctrlnet.interfaces.train_cli", ("add_train_parser", "add_data_parser", "add_add_control_parser")),
]


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images from a prompt and control images",
        description="Generate images. With no --base, the embedded demo model is used (offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prompt", default="", help="what to draw")
    p.add_argument("--added-prompt", default=None, help="appended to the prompt (default: the model's)")
    p.add_argument("--negative-prompt", default=None, help="what to avoid (default: the model's)")
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="control image (repeat for several ControlNets, paired in order with --controlnet)")
    p.add_argument("--annotator", action="append", default=[], metavar="NAME",
                   help="annotator for each --control ('none' = the image is already a control map)")
    p.add_argument("--base", default=None, help="base model: checkpoint file, diffusers folder, 'demo', or random:<preset>")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH", help="ControlNet weights (repeatable)")
    p.add_argument("--strength", type=float, action="append", default=[], help="control strength, 0..2 (per control)")
    p.add_argument("--guess-mode", action="store_true", help="follow the control without a prompt")
    p.add_argument("--num-images", "-n", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", "--scale", type=float, default=9.0)
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one and reports it")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--sampler", default="ddim", help="ddim, euler, euler_a, dpmpp_2m")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument("--low-vram", action="store_true", help="keep only the stage in use on the GPU")
    p.add_argument("--parameterization", choices=["eps", "v"], default=None, help="override (SD2 768-v models: v)")
    p.add_argument("--out", default="outputs", help="output folder")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from tqdm import tqdm

    from ctrlnet.image import load_image, save_image
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate, load_models, result_metadata

    models = load_models(args.base, args.controlnet, device=args.device, dtype=args.dtype,
                         low_vram=args.low_vram, parameterization=args.parameterization)
    controls = []
    for i, path in enumerate(args.control):
        ann = args.annotator[i] if i < len(args.annotator) else None
        strength = args.strength[i] if i < len(args.strength) else (args.strength[0] if args.strength else 1.0)
        names = list(models.controlnets)
        controls.append(ControlSpec(image=load_image(path), model=names[i] if i < len(names) else None,
                                    annotator=None if ann in (None, "none") else ann, strength=strength))
    resolution = args.resolution or models.defaults.get("resolution", 512)
    req = GenerationRequest(
        prompt=args.prompt, added_prompt=args.added_prompt, negative_prompt=args.negative_prompt,
        controls=controls, num_images=args.num_images, resolution=resolution, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, eta=args.eta, sampler=args.sampler,
        guess_mode=args.guess_mode, clip_skip=args.clip_skip,
    )
    with tqdm(total=req.steps, desc="sampling", unit="step") as bar:
        def progress(i, total):
            bar.total = total
            bar.n = i
            bar.refresh()

        result = generate(models, req, progress)
    out = Path(args.out)
    meta = result_metadata(result, models.base.source)
    for i, img in enumerate(result.images):
        path = save_image(img, out / f"{result.seed}_{i}.png", meta)
        print(path)
    for i, cmap in enumerate(result.control_maps):
        print(save_image(cmap, out / f"{result.seed}_control{i}.png"))
    print(f"seed: {result.seed}")
    return EXIT_OK


def _add_annotate(sub) -> None:
    p = sub.add_parser("annotate", help="make a control map from an image",
                       description="Run an annotator (preprocessor) on an image and save the control map.")
    p.add_argument("name", help="annotator name (see `ctrlnet annotate --list`)", nargs="?")
    p.add_argument("input", nargs="?", help="input image")
    p.add_argument("output", nargs="?", help="output PNG")
    p.add_argument("--list", action="store_true", help="list annotator names")
    p.add_argument("--resolution", type=int, default=None, help="resize the short side first (as the apps do)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="annotator parameter (numbers are parsed), repeatable")
    p.set_defaults(func=_cmd_annotate)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _cmd_annotate(args) -> int:
    from ctrlnet.annotators import list_annotators, run_annotator
    from ctrlnet.image import load_image, resize_image, save_image

    if args.list:
        print("\n".join(list_annotators()))
        return EXIT_OK
    if not (args.name and args.input and args.output):
        print("ctrlnet annotate: need NAME INPUT OUTPUT (or --list)", file=sys.stderr)
        return EXIT_USAGE
    params = {}
    for kv in args.param:
        if "=" not in kv:
            print(f"ctrlnet annotate: --param {kv!r} is not KEY=VALUE", file=sys.stderr)
            return EXIT_USAGE
        k, v = kv.split("=", 1)
        params[k] = _parse_value(v)
    img = load_image(args.input)
    if args.resolution:
        img = resize_image(img, args.resolution)
    print(save_image(run_annotator(args.name, img, **params), args.output))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlnet",
        description="ControlNet for Stable Diffusion: generate images that follow a control map, "
                    "make control maps, train ControlNets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_annotate(sub)
    for module, fns in _PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for fn in fns:
            if hasattr(mod, fn):
                getattr(mod, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from ctrlnet.checkpoints.io import CheckpointError
    from ctrlnet.image import ImageError

    try:
        return int(args.func(args) or EXIT_OK)
    except (ImageError, CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ctrlnet {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
