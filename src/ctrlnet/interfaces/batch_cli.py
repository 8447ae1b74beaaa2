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
import sys
from pathlib import Path

MAP_SUFFIX = ".control0.png"  # next to OUT/NAME.png: the control map that --from-png reads back
SOURCE_SUFFIX = ".control0.source.png"  # with hires fix: the input, made into the maps again on rerun
JOB_RECORD = ".ctrlnet-batch.json"  # in OUT: the settings its images were made with
# flags that change how a job runs, not what it makes (a rerun may change them freely)
_NOT_SETTINGS = {"func", "out", "no_progress", "device", "dtype", "low_vram", "compile", "overwrite"}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")


def add_batch_parser(sub) -> None:
    from ctrlnet.interfaces.cli import _Formatter, add_request_args
    from ctrlnet.interfaces.model_args import add_model_args

    p = sub.add_parser(
        "batch", help="generate one image per control image in a folder (resumable, multi-process)",
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Each input NAME.EXT gives OUT/NAME.png (its settings recorded "
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
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out whose images were made with other settings: it is moved aside "
                        "to OUT.replaced-YYYYMMDD-HHMMSS (nothing is deleted)")
    add_model_args(p)
    p.set_defaults(func=_cmd_batch)


def _check_flags(args) -> None:
    """Refuse what a batch cannot do, before anything loads (ValueError naming the flag)."""
    import numpy as np

    from ctrlnet.generation.presets import apply_preset
    from ctrlnet.interfaces.cli import _check_before_loading, check_annotators
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
    # ranges, sampler options and sizes as `generate` checks them; a square stand-in for the maps,
    # so a size from --resolution is checked at its smallest (a wider input is checked when made)
    _check_before_loading(args, {"controls": [np.zeros((64, 64, 3), np.uint8)], "init_image": None, "mask": None})


def job_settings(args) -> dict:
    """What a batch's images depend on: every request and model flag (model files as absolute
    paths), not where or how it runs (:data:`_NOT_SETTINGS`)."""
    from ctrlnet.interfaces.model_args import name_controlnets
    from ctrlnet.interfaces.outputs import model_spec

    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and not callable(v)}
    settings["input"] = str(Path(args.input).expanduser().resolve())
    settings["base"] = model_spec(args.base)
    settings["vae"] = model_spec(args.vae)
    settings["controlnet"] = {k: model_spec(v) for k, v in name_controlnets(args.controlnet).items()}
    return settings


def check_job(out: Path, settings: dict, done: int, overwrite: bool):
    """Refuse (before models load) to add images to an --out whose finished images were made with
    other settings: a rerun would skip them and report them done as if they were this job's.
    Returns the :class:`~ctrlnet.training.run_folder.OutputClaim` to apply (moving the earlier
    images aside with ``overwrite``); a folder without a record (or without images) is taken as is."""
    from ctrlnet.training.run_folder import (
        check_output,
        read_job_record,
        settings_differences,
    )

    recorded = read_job_record(out / JOB_RECORD) if done else None
    diff = settings_differences(recorded, settings) if recorded is not None else []
    holds = [f"{done} images made with other settings ({'; '.join(diff)})"] if diff else []
    return check_output(out, resume=False, overwrite=overwrite, holds=holds, kind="batch",
                        hint="rerun with the recorded settings to finish it, choose another --out, or pass "
                             "--overwrite to move it aside and start over")


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
    from ctrlnet.image import ImageError, load_image, save_image
    from ctrlnet.interfaces.cli import _request_from_args
    from ctrlnet.interfaces.model_args import load_named, name_controlnets
    from ctrlnet.interfaces.outputs import (
        check_output_dir,
        result_chunks,
        source_picture,
        source_units,
    )
    from ctrlnet.pipeline import generate
    from ctrlnet.training.run_folder import write_job_record

    # everything that can be wrong with the inputs, before models load
    _check_flags(args)
    if Path(args.input).is_file() and Path(args.input).suffix.lower() in VIDEO_SUFFIXES:
        return _batch_video(args)
    if args.reference or args.colorizer:
        raise ValueError("--reference/--colorizer go with a video input")
    items = plan_items(list_images(args.input), args.out, args.seed, (MAP_SUFFIX, SOURCE_SUFFIX))
    settings = job_settings(args)
    claim = check_job(Path(args.out).expanduser(), settings, len(items) - len(pending(items)), args.overwrite)
    state = _process_state(args.device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if state is None or state.is_main_process:
        if claim.starts_over:
            claim.apply()
            print(f"moved the earlier batch in {claim.path} aside to {claim.moved_to}", flush=True)
        out = check_output_dir(args.out)
        write_job_record(out / JOB_RECORD, settings)
    if state is not None:
        state.wait_for_everyone()  # the folder is claimed before any process looks at it
    out = check_output_dir(args.out)
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
                try:
                    image = load_image(item.source, keep_alpha=True)
                    req = _request_from_args(args, loaded.models, {"controls": [image], "init_image": None,
                                                                   "mask": None})
                    req.seed = item.seed
                    req.validate()
                    result = generate(loaded.models, req)
                except ImageError as e:  # one unreadable or unusable input must not end a long job
                    msg = str(e) if str(item.source) in str(e) else f"{item.source}: {e}"
                    print(f"skipped {msg}", file=sys.stderr, flush=True)
                    bar.update(1)
                    continue
                map_name = item.source.stem + MAP_SUFFIX
                save_image(result.control_maps[0], out / map_name)
                sources = {}
                if source_units(req):  # hires fix: the map of one pass cannot stand for both
                    sources[0] = save_image(source_picture(req.controls[0]), out / (item.source.stem + SOURCE_SUFFIX)).name
                # the image last: it marks the item finished
                save_image(result.images[0], item.output,
                           result_chunks(result, loaded.base, loaded.controlnets, loaded.dtype_name, [map_name],
                                         vae=loaded.vae, extras=extra, control_sources=sources))
                bar.update(1)
    if state is not None:
        state.wait_for_everyone()
    left = pending(items)  # what no process could make (each named its cause above)
    if state is None or state.is_main_process:
        print(f"{len(items) - len(todo)} of {len(items)} already done; wrote {len(todo) - len(left)} to {out}"
              + (f" with {world} processes" if world > 1 else ""), flush=True)
        if left:
            names = ", ".join(str(it.source) for it in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            print(f"{len(left)} inputs could not be used ({names}; causes above): fix or remove them and rerun "
                  "to finish the job", file=sys.stderr, flush=True)
    return 1 if left else 0



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
