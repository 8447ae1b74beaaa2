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
    ("ctrlnet.interfaces.batch_cli", ("add_batch_parser",)),
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
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="control image (repeat for several ControlNets, paired in order with --controlnet); "
                        "'init' = the --init-image (with --annotator inpaint: the v1.1 inpaint map)")
    add_request_args(p)
    p.add_argument("--from-png", default=None, metavar="PNG",
                   help="redo the image a previous run wrote: its settings, seed, models and control maps "
                        "(saved next to it) are read from the PNG; --base/--controlnet/--vae/--out override (the "
                        "other settings flags are refused: they would be ignored)")
    p.add_argument("--out", default="outputs", help="output folder")
    add_model_args(p)
    p.set_defaults(func=_cmd_generate)


def add_request_args(p: argparse.ArgumentParser) -> None:
    """The flags that make a request (prompt, per-control settings, size, sampling, workflows), shared
    by ``ctrlnet generate`` and ``ctrlnet batch``; read back by :func:`_request_from_args`."""
    from ctrlnet.generation.presets import PRESETS
    from ctrlnet.generation.request import DEFAULT_MAX_PIXELS, ControlMode, HiresOption, InpaintFill, ResizeMode, Upscaler

    p.add_argument("--prompt", default="", help="what to draw")
    p.add_argument("--added-prompt", default=None, help="appended to the prompt (default: the model's)")
    p.add_argument("--negative-prompt", default=None, help="what to avoid (default: the model's)")
    g = p.add_argument_group(
        "per-control settings",
        "Each applies to the --control it follows; given before the first --control it applies to every "
        "control (e.g. --control a.png --annotator canny --control b.png --annotator none --control-end 0.6).")
    g.add_argument("--annotator", action=PerControl, metavar="NAME",
                   help="'none' (the image is already a control map) or an annotator (ctrlnet annotate --list)")
    g.add_argument("--strength", type=float, action=PerControl, help="control weight, 0..2 (default 1)")
    g.add_argument("--control-mode", action=PerControl, choices=[m.value for m in ControlMode],
                   help="balanced (default); prompt (my prompt is more important); controlnet (ControlNet is "
                        "more important = guess mode)")
    g.add_argument("--resize-mode", action=PerControl, choices=[m.value for m in ResizeMode],
                   help="when its aspect differs from the output: stretch, cover and crop (default), fit and pad")
    g.add_argument("--control-start", type=float, action=PerControl, help="first step, 0..1 (default 0)")
    g.add_argument("--control-end", type=float, action=PerControl, help="last step, 0..1 (default 1)")
    g.add_argument("--detect-resolution", type=int, action=PerControl,
                   help="the annotator's resolution (short side, px; default: the output's)")
    g.add_argument("--pixel-perfect", nargs="?", const="yes", action=PerControl, choices=["yes", "no"],
                   help="annotator resolution from the output size (sd-webui-controlnet)")
    g.add_argument("--hr-option", action=PerControl, choices=[m.value for m in HiresOption],
                   help="the hires-fix passes it acts in (sd-webui-controlnet; default both)")
    p.add_argument("--guess-mode", action="store_true", help="follow the control without a prompt (every control)")
    p.add_argument("--width", type=int, default=None, help="output width, a multiple of 8 (with --height)")
    p.add_argument("--height", type=int, default=None, help="output height, a multiple of 8 (with --width)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger outputs")
    p.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img: start from this picture")
    p.add_argument("--denoising-strength", type=float, default=0.75,
                   help="img2img: 0 returns the image, 1 ignores it (A1111/diffusers)")
    p.add_argument("--mask", default=None, metavar="IMAGE", help="inpaint: white = repaint (needs --init-image)")
    p.add_argument("--mask-blur", type=float, default=4.0, help="inpaint: Gaussian blur of the mask, px")
    p.add_argument("--inpaint-fill", default="original", choices=[m.value for m in InpaintFill],
                   help="inpaint: what the masked area starts from (A1111 'masked content')")
    p.add_argument("--only-masked", action="store_true", help="inpaint the mask's box at full size, paste it back")
    p.add_argument("--only-masked-padding", type=int, default=32, help="px around the mask with --only-masked")
    p.add_argument("--hires-scale", type=float, default=1.0, help="hires fix: upscale factor (1 = off)")
    p.add_argument("--hires-steps", type=int, default=0, help="hires fix: steps of the second pass (0 = --steps)")
    p.add_argument("--hires-denoising-strength", type=float, default=0.7, help="hires fix: denoising strength")
    p.add_argument("--hires-upscaler", default="latent", choices=[m.value for m in Upscaler], help="hires fix upscaler")
    p.add_argument("--tile-size", type=int, default=None,
                   help="denoise and decode passes larger than this in tiles of this many px (bounded memory)")
    p.add_argument("--tile-overlap", type=int, default=64, help="px of feathered overlap between tiles")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="a LoRA file (or a name in --lora-dir) and its weight (default 1); <lora:NAME:W> in the "
                        "prompt works too")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="where <lora:NAME> is looked up")
    p.add_argument("--embeddings", action="append", default=[], metavar="PATH",
                   help="textual-inversion files or folders, used by file name in the prompt")
    p.add_argument("--num-images", "-n", type=int, default=1, help="images per run (1..12)")
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="sampler, schedule and steps by name (fast: " + PRESETS["fast"].summary + "); "
                        "--sampler/--schedule/--steps given explicitly win")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the preset's, else the model's, else 20)")
    p.add_argument("--guidance-scale", "--scale", type=float, default=None,
                   help="how strongly to follow the prompt (default: the model's, else 9)")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one and reports it")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of DDIM and the ancestral/SDE samplers, 0..1; None: the sampler's (DDIM 0, others 1)")
    p.add_argument("--sampler", default=None,
                   help="a sampler as A1111 names it (\"Euler a\", \"DPM++ 2M Karras\", UniPC, LCM...) or a key "
                        "(ddim, euler_a...); default: the preset's, else ddim")
    p.add_argument("--schedule", default=None,
                   help="karras, karras_min, exponential, uniform, sgm_uniform, simple, ddim, lcm; None: the sampler's")
    p.add_argument("--clip-skip", type=int, default=1, help="1 or 2")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where the help does not already say it, and there is one to show), examples
    kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, "", [], {}, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step")

    def progress(i, n):
        bar.total = n
        bar.n = i
        bar.refresh()

    return bar, progress


class PerControl(argparse.Action):
    """A per-control flag: its value belongs to the ``--control`` it follows (key: that control's
    index), or, given before the first ``--control`` (key -1), to every control. The namespace
    holds ``{key: value}``; the same flag twice for one control is an error naming both."""

    def __call__(self, parser, namespace, values, option_string=None):
        controls = getattr(namespace, "control", None) or []
        key = len(controls) - 1
        given = dict(getattr(namespace, self.dest) or {})
        if key in given:
            which = "before the first --control" if key < 0 else f"for --control {controls[-1]}"
            parser.error(f"{option_string} given twice {which} ({given[key]!r} and {values!r}); each per-control "
                         "flag follows its own --control")
        given[key] = values
        setattr(namespace, self.dest, given)


def _per_unit(values: dict | None, i: int, default):
    """Control ``i``'s value of a :class:`PerControl` flag: its own, else the one given for every
    control, else ``default``."""
    values = values or {}
    return values.get(i, values.get(-1, default))


def check_annotators(args) -> None:
    """Unknown ``--annotator`` names fail here, before any model loads (ValueError naming the known ones)."""
    from ctrlnet.annotators import list_annotators

    known = list_annotators()
    for key, name in sorted((getattr(args, "annotator", None) or {}).items()):
        if name not in (None, "none") and name not in known:
            where = "every control" if key < 0 else f"--control {args.control[key]}"
            raise ValueError(f"--annotator {name!r} (for {where}) is unknown; known: none, {', '.join(known)}")


def _read_inputs(args) -> dict:
    """Every image the request needs, read before any model loads (a bad path fails at once)."""
    from ctrlnet.image import load_image

    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (inpainting repaints the masked part of that picture)")
    return {
        # "--control init": the unit uses the init image (and an inpaint unit, the mask too)
        "controls": [None if path == "init" and args.init_image and not Path(path).exists()
                     else load_image(path, keep_alpha=True) for path in args.control],
        "init_image": load_image(args.init_image) if args.init_image else None,
        "mask": load_image(args.mask, keep_alpha=True) if args.mask else None,
    }


def _lora_arg(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` (weight 1 by default); a file path is made absolute so the PNG record finds it."""
    name, sep, w = text.rpartition(":")
    try:
        weight = float(w) if sep and name else None
    except ValueError:
        weight = None
    if weight is None:
        name, weight = text, 1.0
    p = Path(name).expanduser()
    return (str(p.resolve()) if p.is_file() else name), weight


def _request_from_args(args, models, inputs: dict):
    """The request the flags of :func:`add_request_args` describe, for ``models`` (their defaults fill
    what the flags leave out) and the images in ``inputs`` (``controls``, ``init_image``, ``mask``)."""
    from ctrlnet.generation.presets import apply_preset
    from ctrlnet.pipeline import ControlSpec, GenerationRequest

    controls = []
    names = list(models.controlnets)
    for i, image in enumerate(inputs["controls"]):
        ann = _per_unit(args.annotator, i, None)
        controls.append(ControlSpec(
            # controls beyond the --controlnet list reuse the first, named so records say which
            image=image, model=names[i] if i < len(names) else (names[0] if names else None),
            annotator=None if ann in (None, "none") else ann, strength=_per_unit(args.strength, i, 1.0),
            control_mode=_per_unit(args.control_mode, i, "balanced"),
            resize_mode=_per_unit(args.resize_mode, i, "crop_and_resize"),
            start=_per_unit(args.control_start, i, 0.0), end=_per_unit(args.control_end, i, 1.0),
            detect_resolution=_per_unit(args.detect_resolution, i, None),
            pixel_perfect=_per_unit(args.pixel_perfect, i, "no") == "yes",
            hr_option=_per_unit(args.hr_option, i, "both"),
        ))
    # explicit flags, then the preset, then the model's defaults, then SD's
    sampling = apply_preset({"sampler": args.sampler, "schedule": args.schedule, "steps": args.steps},
                            getattr(args, "preset", None))
    return GenerationRequest(
        prompt=args.prompt, added_prompt=args.added_prompt, negative_prompt=args.negative_prompt,
        controls=controls, num_images=args.num_images,
        resolution=args.resolution or models.defaults.get("resolution", 512),
        steps=sampling["steps"] if sampling["steps"] is not None else models.defaults.get("steps", 20),
        guidance_scale=(args.guidance_scale if args.guidance_scale is not None
                        else models.defaults.get("guidance_scale", 9.0)),
        seed=args.seed, eta=args.eta, sampler=sampling["sampler"] or "ddim", schedule=sampling["schedule"],
        guess_mode=args.guess_mode, clip_skip=args.clip_skip,
        width=args.width, height=args.height, max_pixels=args.max_pixels,
        init_image=inputs["init_image"], denoising_strength=args.denoising_strength, mask=inputs["mask"],
        mask_blur=args.mask_blur, inpaint_fill=args.inpaint_fill, only_masked=args.only_masked,
        only_masked_padding=args.only_masked_padding, hires_scale=args.hires_scale, hires_steps=args.hires_steps,
        hires_denoising_strength=args.hires_denoising_strength, hires_upscaler=args.hires_upscaler,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, loras=[_lora_arg(x) for x in args.lora],
    )


def _flags_ignored_by_from_png(args) -> list[str]:
    """The request flags given with --from-png (other than the ones it honours), which it would
    ignore: every setting comes from the PNG's record."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--control", action="append", default=[])
    add_request_args(p)
    defaults = vars(p.parse_args([]))
    return ["--" + k.replace("_", "-") for k, v in defaults.items()
            if k not in ("embeddings", "lora_dir") and getattr(args, k, v) != v]


def _check_before_loading(args, inputs: dict) -> None:
    """Refuse what the flags ask for before any model loads (loading a full-size model takes
    seconds to minutes): the request's ranges and sampler options, and every pass's size against
    --max-pixels. The sampling defaults come from the model files' headers, as loading reads
    them; a file that cannot be read is left to the loader, which names what is wrong with it."""
    from types import SimpleNamespace

    from ctrlnet.generation.plan import plan_sizes
    from ctrlnet.interfaces.model_args import name_controlnets, resolve_name
    from ctrlnet.pipeline import file_defaults

    nets = name_controlnets(args.controlnet)
    try:
        defaults = file_defaults(resolve_name(args.base), {k: resolve_name(v) for k, v in nets.items()})
    except (OSError, ValueError):
        return
    req = _request_from_args(args, SimpleNamespace(controlnets=dict.fromkeys(nets), defaults=defaults), inputs)
    req.validate()
    plan_sizes(req)


def _cmd_generate(args) -> int:
    from ctrlnet.interfaces.model_args import load_named, name_controlnets
    from ctrlnet.interfaces.outputs import check_output_dir, read_record, save_result
    from ctrlnet.pipeline import generate

    check_output_dir(args.out, create=False)  # before models load: a bad --out must not cost a whole run
    extra = {"embeddings": args.embeddings, "lora_dirs": args.lora_dir}
    compile_opt = {"compile": args.compile}
    if args.from_png:
        ignored = _flags_ignored_by_from_png(args)
        if ignored:
            raise ValueError(f"--from-png makes the recorded image again with the settings in the PNG, so "
                             f"{', '.join(ignored)} would be ignored; leave {'it' if len(ignored) == 1 else 'them'} "
                             "out (only --base, --controlnet, --vae, --embeddings, --lora-dir, --out and the device "
                             "flags apply), or generate without --from-png to choose the settings")
        rec = read_record(args.from_png)
        extra = {"embeddings": args.embeddings or rec.embeddings, "lora_dirs": args.lora_dir or rec.lora_dirs}
        base = args.base if args.base is not None else rec.base
        nets = name_controlnets(args.controlnet) if args.controlnet else rec.controlnets
        dtype = rec.dtype if args.dtype == "auto" and rec.dtype else args.dtype
        vae = args.vae if args.vae is not None else rec.vae
        loaded = load_named(base, nets, args.device, dtype, args.low_vram, args.parameterization, vae=vae,
                            **extra, **compile_opt)
        req = rec.request
    else:
        check_annotators(args)
        inputs = _read_inputs(args)
        _check_before_loading(args, inputs)
        loaded = load_named(args.base, name_controlnets(args.controlnet), args.device, args.dtype,
                            args.low_vram, args.parameterization, vae=args.vae, **extra, **compile_opt)
        req = _request_from_args(args, loaded.models, inputs)
    req.validate()
    bar, progress = _progress_bar(req.steps)
    with bar:
        result = generate(loaded.models, req, progress)
    saved = save_result(result, args.out, loaded.base, loaded.controlnets, loaded.dtype_name, vae=loaded.vae,
                        extras=extra)
    for path in saved.images + saved.control_maps + saved.inputs:
        print(path)
    print(f"dtype: {loaded.dtype_name} on {loaded.models.device}")  # what --dtype auto chose
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
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_annotate)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def check_new_output(out, force: bool, inputs=()) -> Path:
    """Refuse (ValueError, before any work) an output file that exists, unless ``force``, and one
    that is an input of the command even with ``force`` (it would be replaced by what it made)."""
    out = Path(out).expanduser()
    for inp in inputs:
        if inp is not None and Path(inp).expanduser().resolve() == out.resolve():
            raise ValueError(f"{out} is an input of this command; write the output to another file")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give an output file name")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    return out


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
    check_new_output(args.output, args.force, [args.input])
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
