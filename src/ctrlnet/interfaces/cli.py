"""The ``ctrlnet`` command: thin subcommands over the Python API.

Exit codes: 0 success, 1 runtime failure, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Subcommand modules that add themselves with add_parser(subparsers); missing ones are skipped
# so a partial install (no training extras, say) still has a working CLI.
_PLUGINS = [
    ("ctrlnet.interfaces.train_cli", ("add_train_parser", "add_data_parser", "add_add_control_parser")),
    ("ctrlnet.interfaces.colorize_cli", ("add_colorize_parser",)),
    ("ctrlnet.interfaces.convert_cli", ("add_convert_parser",)),
    ("ctrlnet.interfaces.models_cli", ("add_models_parser",)),
    ("ctrlnet.interfaces.server_cli", ("add_ui_parser", "add_serve_parser")),
]


def _add_generate(sub) -> None:
    from ctrlnet.interfaces.model_args import add_model_args

    p = sub.add_parser(
        "generate", help="generate images from a prompt and control images",
        description="Generate images that follow a control image. Each --control is a picture; --annotator "
                    "turns it into a control map (canny edges, a pose, depth...) or 'none' if it already is one. "
                    "With no --base, the embedded demo model is used (offline). Each PNG written records its "
                    "settings; `ctrlnet generate --from-png OUT.png` makes the same image again.",
        epilog="examples:\n"
               "  ctrlnet generate --prompt 'a house' --control photo.jpg --annotator canny\n"
               "  ctrlnet generate --base v1-5-pruned-emaonly.safetensors --controlnet control_v11p_sd15_canny.pth \\\n"
               "      --control photo.jpg --annotator canny --prompt 'a red house' -n 4 --seed 1\n"
               "  ctrlnet generate --from-png outputs/1_0.png --out again",
        formatter_class=_Formatter,
    )
    p.add_argument("--prompt", default="", help="what to draw")
    p.add_argument("--added-prompt", default=None, help="appended to the prompt (default: the model's)")
    p.add_argument("--negative-prompt", default=None, help="what to avoid (default: the model's)")
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="control image (repeat for several ControlNets, paired in order with --controlnet)")
    p.add_argument("--annotator", action="append", default=[], metavar="NAME",
                   help="annotator for each --control ('none' = the image is already a control map; "
                        "list: ctrlnet annotate --list)")
    p.add_argument("--strength", type=float, action="append", default=[], help="control strength, 0..2 (per control)")
    p.add_argument("--guess-mode", action="store_true", help="follow the control without a prompt")
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per run (1..12)")
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, else 20)")
    p.add_argument("--guidance-scale", "--scale", type=float, default=None,
                   help="how strongly to follow the prompt (default: the model's, else 9)")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one and reports it")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of DDIM and the ancestral/SDE samplers, 0..1; None: the sampler's (DDIM 0, others 1)")
    p.add_argument("--sampler", default="ddim",
                   help="a sampler as A1111 names it (\"Euler a\", \"DPM++ 2M Karras\", UniPC, LCM...) or a key (ddim, euler_a...)")
    p.add_argument("--schedule", default=None,
                   help="karras, exponential, uniform, sgm_uniform, simple, ddim, lcm; None: the sampler's")
    p.add_argument("--clip-skip", type=int, default=1, help="1 or 2")
    p.add_argument("--from-png", default=None, metavar="PNG",
                   help="redo the image a previous run wrote: its settings, seed, models and control maps "
                        "(saved next to it) are read from the PNG; --base/--controlnet/--out override")
    p.add_argument("--out", default="outputs", help="output folder")
    add_model_args(p)
    p.set_defaults(func=_cmd_generate)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, examples kept as written."""


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step")

    def progress(i, n):
        bar.total = n
        bar.n = i
        bar.refresh()

    return bar, progress


def _request_from_args(args, models):
    from ctrlnet.image import load_image
    from ctrlnet.pipeline import ControlSpec, GenerationRequest

    controls = []
    names = list(models.controlnets)
    for i, path in enumerate(args.control):
        ann = args.annotator[i] if i < len(args.annotator) else (args.annotator[0] if args.annotator else None)
        strength = args.strength[i] if i < len(args.strength) else (args.strength[0] if args.strength else 1.0)
        controls.append(ControlSpec(image=load_image(path, keep_alpha=True), model=names[i] if i < len(names) else None,
                                    annotator=None if ann in (None, "none") else ann, strength=strength))
    return GenerationRequest(
        prompt=args.prompt, added_prompt=args.added_prompt, negative_prompt=args.negative_prompt,
        controls=controls, num_images=args.num_images,
        resolution=args.resolution or models.defaults.get("resolution", 512),
        steps=args.steps if args.steps is not None else models.defaults.get("steps", 20),
        guidance_scale=(args.guidance_scale if args.guidance_scale is not None
                        else models.defaults.get("guidance_scale", 9.0)),
        seed=args.seed, eta=args.eta, sampler=args.sampler, schedule=args.schedule,
        guess_mode=args.guess_mode, clip_skip=args.clip_skip,
    )


def _cmd_generate(args) -> int:
    from ctrlnet.interfaces.model_args import load_named, name_controlnets
    from ctrlnet.interfaces.outputs import read_record, save_result
    from ctrlnet.pipeline import generate

    if args.from_png:
        rec = read_record(args.from_png)
        base = args.base if args.base is not None else rec.base
        nets = name_controlnets(args.controlnet) if args.controlnet else rec.controlnets
        dtype = rec.dtype if args.dtype == "auto" and rec.dtype else args.dtype
        loaded = load_named(base, nets, args.device, dtype, args.low_vram, args.parameterization, vae=args.vae)
        req = rec.request
    else:
        loaded = load_named(args.base, name_controlnets(args.controlnet), args.device, args.dtype,
                            args.low_vram, args.parameterization, vae=args.vae)
        req = _request_from_args(args, loaded.models)
    req.validate()
    bar, progress = _progress_bar(req.steps)
    with bar:
        result = generate(loaded.models, req, progress)
    saved = save_result(result, args.out, loaded.base, loaded.controlnets, loaded.dtype_name)
    for path in saved.images + saved.control_maps:
        print(path)
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
    record = {"annotator": args.name, "params": params, "resolution": args.resolution,
              "input": str(Path(args.input).resolve())}
    print(save_image(run_annotator(args.name, img, **params), args.output, {"ctrlnet": json.dumps(record)}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlnet",
        description="ControlNet for Stable Diffusion: generate images that follow a control map "
                    "(edges, a pose, depth, a scribble...), make control maps, train ControlNets.",
        epilog="start here:\n"
               "  ctrlnet generate --prompt 'a house' --control photo.jpg --annotator canny   (embedded demo model)\n"
               "  ctrlnet ui                      web app in your browser  (pip install 'ctrlnet[ui]')\n"
               "  ctrlnet models list             official weights and where to get them\n"
               "  ctrlnet COMMAND --help          options of one command\n"
               "exit codes: 0 ok, 1 failure, 2 bad arguments or input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    except (RuntimeError, OSError) as e:  # out of memory, disk full, network down...
        print(f"ctrlnet {args.command}: failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
