"""``ctrlnet colorize {lineart,image,video}`` and ``ctrlnet data video-pairs``: thin layers over
:mod:`ctrlnet.colorize`.

Mount with ``add_colorize_parser(subparsers)`` (top level) and ``add_video_pairs_parser(sub)``
(the ``data`` command's subparsers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctrlnet.colorize.modes import DEFAULT_ANCHOR_EVERY, MODES, reference_source

EXAMPLES_COLORIZE = """examples:
  ctrlnet colorize lineart drawing.png --controlnet control_v11p_sd15s2_lineart_anime.pth \\
      --base anything-v3-full.safetensors --prompt "1girl, red hair, school uniform"
  ctrlnet colorize image old_photo.png --reference color_still.png --out colored.png
  ctrlnet colorize video film.mp4 --reference first_frame_colored.png --mode anchored --anchor-every 10 \\
      --out colored.mp4
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_sampling_args(p: argparse.ArgumentParser, guidance: float | None, steps: int | None = 20,
                       seed: int = -1) -> None:
    """``None`` defaults mean: the model file's (``ctrlnet_defaults``), else 20 steps / guidance 1."""
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="", help="what the picture shows (optional)")
    g.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    g.add_argument("--steps", type=int, default=steps,
                   help="sampling steps" + (" (default: the colorizer's)" if steps is None else ""))
    g.add_argument("--guidance-scale", "--scale", type=float, default=guidance,
                   help="classifier-free guidance" + (" (default: the colorizer's)" if guidance is None else ""))
    g.add_argument("--strength", type=float, default=1.0, help="control strength, 0..2")
    g.add_argument("--seed", type=int, default=seed, help="-1 picks one" if seed == -1 else "noise seed")
    g.add_argument("--sampler", default="ddim", help="an A1111 name (\"Euler a\", \"DPM++ 2M Karras\"...) or a key")


def _add_colorizer_args(p: argparse.ArgumentParser) -> None:
    from ctrlnet.interfaces.model_args import BASE_HELP

    g = p.add_argument_group("model")
    g.add_argument("--base", default=None, help=BASE_HELP)
    g.add_argument("--colorizer", default=None, metavar="PATH",
                   help="reference colorizer weights (default: the shipped one; 'random' for smoke tests)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    g.add_argument("--low-vram", action="store_true", help="keep only the stage in use on the GPU")
    g.add_argument("--no-keep-luminance", dest="keep_luminance", action="store_false",
                   help="keep the generated lightness instead of the input's (Lab L merge is on by default)")


def add_colorize_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``colorize`` with ``lineart``, ``image`` and ``video`` to a subparsers action."""
    from ctrlnet.interfaces.model_args import add_model_args

    p = subparsers.add_parser("colorize", help="colour line art, or gray images and video after a reference",
                              description=__doc__.split("\n\n")[0], epilog=EXAMPLES_COLORIZE,
                              formatter_class=_Formatter)
    sub = p.add_subparsers(dest="colorize_command", metavar="KIND", required=True)

    la = sub.add_parser("lineart", help="colour black-on-white line art with a line-art ControlNet",
                        formatter_class=_Formatter,
                        description="Inverts the drawing (the models expect white lines on black), optionally "
                                    "binarises and cleans it, and colours it. No prompt: guess mode. Anime "
                                    "models get CLIP skip 2 and three 75-token prompt windows.")
    la.add_argument("input", help="line-art image (black lines on white, or white on black)")
    la.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                    help="invert the drawing (auto: when it is mostly light)")
    la.add_argument("--binarize", default=None, metavar="T|otsu", help="threshold the lines (1..254 or otsu)")
    la.add_argument("--min-area", type=int, default=0, help="erase line pieces smaller than this (pixels)")
    la.add_argument("--style", choices=["auto", "anime", "plain"], default="auto",
                    help="anime: CLIP skip 2 + 3 prompt windows (auto: if the ControlNet name has 'anime')")
    la.add_argument("--num-images", "-n", type=int, default=1)
    la.add_argument("--negative-prompt", default=None)
    la.add_argument("--save-map", action="store_true", help="also save the control map")
    la.add_argument("--out", default="outputs", help="output folder")
    _add_sampling_args(la, guidance=9.0)
    add_model_args(la)
    la.set_defaults(func=_cmd_lineart)

    im = sub.add_parser("image", help="colour a grayscale image after a colour reference", formatter_class=_Formatter)
    im.add_argument("input", help="grayscale (or colour: only its lightness is used) image")
    im.add_argument("--reference", required=True, help="colour image whose colours to use")
    im.add_argument("--out", default=None, help="output PNG (default: INPUT-colorized.png)")
    im.add_argument("--force", action="store_true", help="replace an existing output file")
    _add_sampling_args(im, guidance=None, steps=None, seed=0)
    _add_colorizer_args(im)
    im.set_defaults(func=_cmd_image)

    vi = sub.add_parser("video", help="colour a grayscale video after a colour reference (resumable)",
                        formatter_class=_Formatter,
                        description="fixed: every frame after --reference; recursive: frame 0 after --reference, "
                                    "each later frame after the previous result; anchored: recursive, but frames "
                                    "0, N, 2N... after --reference again (N = --anchor-every), so drift lasts "
                                    "at most N-1 frames. Frames go to a work folder "
                                    "(OUT.work) first; rerunning the same command resumes.")
    vi.add_argument("input", help="video file")
    vi.add_argument("--reference", required=True, help="colour image (e.g. the first frame coloured)")
    vi.add_argument("--mode", choices=list(MODES), default="fixed")
    vi.add_argument("--anchor-every", type=int, default=None, metavar="N",
                    help=f"anchored mode: back to --reference every N frames (default {DEFAULT_ANCHOR_EVERY})")
    vi.add_argument("--out", default=None, help="output video (default: INPUT-colorized.mp4)")
    vi.add_argument("--work-dir", default=None, help="where finished frames wait (default: OUT.work)")
    vi.add_argument("--keep-frames", action="store_true", help="keep the work folder after writing the video")
    vi.add_argument("--restart", action="store_true", help="discard frames of an earlier, different job")
    vi.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out that is not this job's: it is moved aside to "
                         "STEM.replaced-YYYYMMDD-HHMMSS.EXT (nothing is deleted)")
    _add_sampling_args(vi, guidance=None, steps=None, seed=0)
    _add_colorizer_args(vi)
    vi.set_defaults(func=_cmd_video)
    return p


def add_video_pairs_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``video-pairs`` (training triples from videos) to a subparsers action (``data``'s)."""
    from ctrlnet.colorize import pairs

    p = subparsers.add_parser(
        "video-pairs", help="(reference, gray target, colour target) triples from videos",
        formatter_class=_Formatter,
        description="Pairs frames i < j with j - i >= --min-gap whose similarity lies in --similarity; writes "
                    "OUT/{reference,gray,color}/*.png and OUT/prompt.json (source = gray, target = color, "
                    "plus a reference column). " + pairs.__doc__.split("Similarity measure: ")[1].strip())
    p.add_argument("paths", nargs="+", metavar="VIDEO... OUT", help="video files, then the output folder")
    p.add_argument("--similarity", type=float, nargs=2, default=[0.94, 0.97], metavar=("LOW", "HIGH"))
    p.add_argument("--min-gap", type=int, default=3, help="frames between reference and target, at least")
    p.add_argument("--max-gap", type=int, default=30, help="how far ahead to look for a target")
    p.add_argument("--stride", type=int, default=None, help="frames between references (default: --min-gap)")
    p.add_argument("--resolution", type=int, default=None, help="resize the short side of saved frames")
    p.add_argument("--prompt", default="", help="caption for every row")
    from ctrlnet.interfaces.train_cli import add_resume_args

    add_resume_args(p, "data set")
    p.set_defaults(func=_cmd_video_pairs)
    return p


def _options(args):
    from ctrlnet.colorize.reference import ColorizeOptions

    return ColorizeOptions(prompt=args.prompt, resolution=args.resolution, steps=args.steps,
                           guidance_scale=args.guidance_scale, seed=args.seed, strength=args.strength,
                           sampler=args.sampler, keep_luminance=args.keep_luminance)


def _load_colorizer(args):
    from ctrlnet.colorize.reference import load_colorizer_models

    return load_colorizer_models(args.base, args.colorizer, args.device, args.dtype, args.low_vram)


def _cmd_lineart(args) -> int:
    from tqdm import tqdm

    from ctrlnet.colorize.lineart import colorize_lineart, prepare_lineart
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.model_args import load_from_args
    from ctrlnet.interfaces.outputs import free_name
    from ctrlnet.pipeline import result_metadata

    if args.base is None and not args.controlnet:
        raise ValueError("give a line-art ControlNet with --controlnet (e.g. control_v11p_sd15s2_lineart_anime.pth "
                         "with --base anything-v3-full.safetensors, or one you trained)")
    image = load_image(args.input)
    invert = {"auto": None, "yes": True, "no": False}[args.invert]
    binarize = args.binarize if args.binarize in (None, "otsu") else int(args.binarize)
    loaded = load_from_args(args)
    models = loaded.models
    anime = {"auto": None, "anime": True, "plain": False}[args.style]
    if anime is None:
        anime = any("anime" in str(v).lower() for v in [*loaded.controlnets, *loaded.controlnets.values()])
    bar = tqdm(desc="sampling", unit="step")

    def progress(i, n):
        bar.total, bar.n = n, i
        bar.refresh()

    res = colorize_lineart(models, image, args.prompt, invert=invert, binarize=binarize, min_area=args.min_area,
                           anime=anime, progress=progress, num_images=args.num_images,
                           resolution=args.resolution or 512, steps=args.steps, guidance_scale=args.guidance_scale,
                           seed=args.seed, sampler=args.sampler, negative_prompt=args.negative_prompt,
                           strength=args.strength)
    bar.close()
    out = Path(args.out)
    stem = Path(args.input).stem
    meta = result_metadata(res, loaded.base or "demo")
    # a rerun with other settings and the same seed adds files (-1, -2...), as `generate` does
    for i, img in enumerate(res.images):
        print(save_image(img, free_name(out, f"{stem}-lineart-{res.seed}-{i}"), meta))
    if args.save_map:
        print(save_image(prepare_lineart(image, invert, binarize, args.min_area), free_name(out, f"{stem}-lineart-map")))
    return 0


def _cmd_image(args) -> int:
    from ctrlnet.colorize.reference import colorize_image
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.cli import check_new_output

    out = Path(args.out) if args.out else Path(args.input).with_name(Path(args.input).stem + "-colorized.png")
    check_new_output(out, args.force, [args.input, args.reference])  # before the models load
    gray, ref = load_image(args.input), load_image(args.reference)
    models = _load_colorizer(args)
    print(save_image(colorize_image(models, gray, ref, _options(args)), out))
    return 0


def _cmd_video(args) -> int:
    from ctrlnet.colorize.video_job import colorize_video
    from ctrlnet.image import load_image

    if args.anchor_every is not None and args.mode != "anchored":
        raise ValueError(f"--anchor-every applies to --mode anchored (got --mode {args.mode})")
    if args.mode == "anchored" and args.anchor_every is not None:
        reference_source(0, args.mode, args.anchor_every)  # a bad N fails before the models load
    ref = load_image(args.reference)
    models = _load_colorizer(args)
    src = Path(args.input)
    out = Path(args.out) if args.out else src.with_name(src.stem + "-colorized.mp4")
    print(colorize_video(models, src, ref, out, args.mode, _options(args), work_dir=args.work_dir,
                         keep_frames=args.keep_frames, restart=args.restart, model_name=str(args.colorizer),
                         overwrite=args.overwrite, anchor_every=args.anchor_every))
    return 0


def _cmd_video_pairs(args) -> int:
    from ctrlnet.colorize.pairs import video_pairs

    if len(args.paths) < 2:
        raise ValueError("give at least one video and the output folder")
    *videos, out = args.paths
    for v in videos:
        if not Path(v).is_file():
            raise FileNotFoundError(f"no video at {v}")
    low, high = args.similarity
    rows = video_pairs(videos, out, low, high, args.min_gap, args.max_gap, args.stride, args.resolution,
                       args.prompt, progress=True, resume=args.resume, overwrite=args.overwrite)
    print(f"{len(rows)} triples -> {Path(out) / 'prompt.json'}")
    return 0
