"""``ctrlnet batch``: one image per control image in a folder, resumable, over one or many processes.

    ctrlnet batch maps/ --out out/ --prompt "a house" --annotator canny --seed 1
    accelerate launch --num_processes 2 -m ctrlnet.interfaces.cli batch maps/ --out out/ --seed 1
    accelerate launch --multi_gpu --num_processes 2 -m ctrlnet.interfaces.cli batch ...  # 2 CPU processes, no GPU

Each input ``maps/NAME.EXT`` gives ``out/NAME.png`` (with the settings recorded as ``ctrlnet generate``
records them, so ``ctrlnet generate --from-png out/NAME.png`` makes it again) and its control map
``out/NAME.control0.png``. Finished outputs are skipped, so a stopped job continues where it was;
outputs are renamed into place complete, so a killed job leaves no half files. The seed of each
item comes from ``--seed`` and the input's file name (:func:`ctrlnet.generation.batch.item_seed`),
so one process and N processes write the same files. Under ``accelerate launch`` the unfinished
items are split with Accelerate's ``PartialState.split_between_processes``, and each process loads
the models on its own device.
"""

from __future__ import annotations

import os
from pathlib import Path

MAP_SUFFIX = ".control0.png"  # next to OUT/NAME.png: the control map that --from-png reads back
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")


def add_batch_parser(sub) -> None:
    from ctrlnet.interfaces.cli import _Formatter, add_request_args
    from ctrlnet.interfaces.model_args import add_model_args

    p = sub.add_parser(
        "batch", help="generate one image per control image in a folder (resumable, multi-process)",
        description=__doc__.split("\n\n")[0] + ". Each input NAME.EXT gives OUT/NAME.png (its settings recorded "
                    "in the PNG) and OUT/NAME.control0.png; finished outputs are skipped on a rerun. The seed of "
                    "each image is --seed plus the CRC-32 of the input's name, so any number of processes "
                    "writes the same files.",
        epilog="examples:\n"
               "  ctrlnet batch edges/ --out out/ --prompt 'a house' --annotator none --seed 1\n"
               "  ctrlnet batch photos/ --out out/ --annotator canny --prompt 'a house' --preset fast\n"
               "  accelerate launch --num_processes 2 -m ctrlnet.interfaces.cli batch photos/ --out out/ --seed 1",
        formatter_class=_Formatter,
    )
    p.add_argument("input", help="a folder of control images (png, jpg, webp, bmp, tif), or a video to colour "
                                 "after --reference")
    p.add_argument("--out", required=True, help="output folder (not the input folder); for a video, the output video")
    v = p.add_argument_group("video (reference colorization, fixed mode: `ctrlnet colorize video` split over processes)")
    v.add_argument("--reference", default=None, help="colour image whose colours every frame takes")
    v.add_argument("--colorizer", default=None, metavar="PATH", help="colorizer file (default: the embedded one)")
    v.add_argument("--keep-frames", action="store_true", help="keep the frames folder (OUT.work) after encoding")
    add_request_args(p)
    p.set_defaults(seed=0)  # a batch needs a fixed seed: every process and every rerun must agree
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=_cmd_batch)


def _check_flags(args) -> None:
    """Refuse what a batch cannot do, before anything loads (ValueError naming the flag)."""
    from ctrlnet.generation.presets import apply_preset
    from ctrlnet.interfaces.cli import check_annotators
    from ctrlnet.sampling.names import resolve_sampler

    if args.num_images != 1:
        raise ValueError(f"--num-images {args.num_images}: a batch writes one image per input")
    if args.init_image or args.mask:
        raise ValueError("--init-image/--mask: a batch generates from each control image (txt2img)")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: a batch needs a fixed seed (0 or more) so that processes and "
                         "reruns agree")
    s = apply_preset({"sampler": args.sampler, "schedule": args.schedule, "steps": args.steps}, args.preset)
    resolve_sampler(s["sampler"] or "ddim", s["schedule"])
    check_annotators(args)


def _process_state(device: str):
    """Accelerate's view of the processes (one process without ``accelerate launch``); None when
    Accelerate is not installed and no launcher started several processes."""
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("several processes need Accelerate: pip install accelerate") from None
        return None
    from ctrlnet.runtime.device import resolve_device

    # Accelerate runs CPU processes together (gloo) only when told the device is the CPU
    state = PartialState(cpu=resolve_device(device).type == "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:  # each process would do the whole job
        raise RuntimeError(f"{launched} processes were launched but Accelerate sees {state.num_processes}; "
                           "launch with `accelerate launch` (or torchrun) on one kind of device")
    return state


def _cmd_batch(args) -> int:
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from ctrlnet.atomic import remove_stale_temps
    from ctrlnet.generation.batch import list_images, pending, plan_items
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.cli import _request_from_args
    from ctrlnet.interfaces.model_args import load_named, name_controlnets
    from ctrlnet.interfaces.outputs import check_output_dir, result_chunks
    from ctrlnet.pipeline import generate

    # everything that can be wrong with the inputs, before models load
    _check_flags(args)
    if Path(args.input).is_file() and Path(args.input).suffix.lower() in VIDEO_SUFFIXES:
        return _batch_video(args)
    if args.reference or args.colorizer:
        raise ValueError("--reference/--colorizer go with a video input")
    items = plan_items(list_images(args.input), args.out, args.seed, (MAP_SUFFIX,))
    out = check_output_dir(args.out)
    state = _process_state(args.device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    remove_stale_temps(out, recursive=False)  # only temps whose writer process is gone
    todo = pending(items)
    if state is not None:
        state.wait_for_everyone()  # every process has listed the finished items before any writes one
    split = state.split_between_processes(todo) if state is not None else nullcontext(todo)
    with split as mine:
        device = str(state.device) if state is not None and world > 1 and args.device == "auto" else args.device
        extra = {"embeddings": args.embeddings, "lora_dirs": args.lora_dir}
        loaded = None
        if mine:
            loaded = load_named(args.base, name_controlnets(args.controlnet), device, args.dtype, args.low_vram,
                                args.parameterization, vae=args.vae, compile=args.compile, **extra)
        show = not args.no_progress and (state is None or state.is_local_main_process)
        with tqdm(total=len(mine), desc="batch" if world == 1 else f"batch (process {rank} of {world})",
                  unit="image", disable=not show) as bar:
            for item in mine:
                image = load_image(item.source, keep_alpha=True)
                req = _request_from_args(args, loaded.models, {"controls": [image], "init_image": None, "mask": None})
                req.seed = item.seed
                req.validate()
                result = generate(loaded.models, req)
                map_name = item.source.stem + MAP_SUFFIX
                save_image(result.control_maps[0], out / map_name)
                # the image last: it marks the item finished
                save_image(result.images[0], item.output,
                           result_chunks(result, loaded.base, loaded.controlnets, loaded.dtype_name, [map_name],
                                         vae=loaded.vae, extras=extra))
                bar.update(1)
    if state is not None:
        state.wait_for_everyone()
    if state is None or state.is_main_process:
        print(f"{len(items) - len(todo)} of {len(items)} already done; wrote {len(todo)} to {out}"
              + (f" with {world} processes" if world > 1 else ""), flush=True)
    return 0



def _batch_video(args) -> int:
    """A video coloured after ``--reference`` in the fixed mode, its frames split over the processes
    (:func:`ctrlnet.colorize.video_job.colorize_video` with Accelerate's state); resumable as
    ``ctrlnet colorize video`` is, from the same work folder."""
    from ctrlnet.colorize.reference import ColorizeOptions, load_colorizer_models
    from ctrlnet.colorize.video import probe
    from ctrlnet.colorize.video_job import colorize_video
    from ctrlnet.generation.presets import apply_preset
    from ctrlnet.image import load_image
    from ctrlnet.interfaces.cli import _per_unit
    from ctrlnet.sampling.names import a1111_name

    if not args.reference:
        raise ValueError("a video input needs --reference (the colour image every frame takes its colours from)")
    if args.controlnet:
        raise ValueError("a video is coloured with the colorizer (--colorizer), not --controlnet")
    probe(args.input)  # a file that is not a video fails before models load
    reference = load_image(args.reference)
    state = _process_state(args.device)
    world = state.num_processes if state is not None else 1
    device = str(state.device) if state is not None and world > 1 and args.device == "auto" else args.device
    s = apply_preset({"sampler": args.sampler, "schedule": args.schedule, "steps": args.steps}, args.preset)
    options = ColorizeOptions(prompt=args.prompt, resolution=args.resolution, steps=s["steps"],
                              guidance_scale=args.guidance_scale, seed=args.seed,
                              strength=_per_unit(args.strength, 0, 1.0),
                              sampler=a1111_name(s["sampler"] or "ddim", s["schedule"]))  # the name carries the schedule
    models = load_colorizer_models(args.base, args.colorizer, device, args.dtype, args.low_vram)
    out = colorize_video(models, args.input, reference, args.out, "fixed", options,
                         keep_frames=args.keep_frames, progress=not args.no_progress,
                         model_name=str(args.colorizer), processes=state)
    if state is None or state.is_main_process:
        print(out, flush=True)
    return 0
