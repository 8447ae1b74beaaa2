"""Colorize a grayscale video after a colour reference, resumably.

Modes: ``fixed`` colours every frame after the given reference; ``recursive`` colours frame 0
after the reference and each later frame after the previous result (follows changes in the shot,
but errors can accumulate); ``anchored`` is recursive but goes back to the given reference every
``anchor_every`` frames (frames 0, N, 2N, ...), so drift lasts at most N - 1 frames. ``anchored``
with N = 1 is ``fixed``; with N at least the frame count it is ``recursive``. Finished frames are
PNGs in a work folder next to the output (``OUT.work/``, with ``job.json`` describing the job); a rerun skips them, so an interrupted job
continues where it stopped. When all frames exist they are encoded at the source's frame rate
and size, and the work folder is removed unless ``keep_frames``.

Nothing is lost by accident (:mod:`ctrlnet.training.run_folder`): an existing ``OUT`` that is not
this job's own (no work folder of the same job) is refused unless ``overwrite``, which moves it
aside to ``OUT-STEM.replaced-YYYYMMDD-HHMMSS.EXT``; frames of a different job are refused unless
``restart``, which discards them. Temp files of writes killed earlier are removed at the start.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctrlnet.atomic import remove_stale_temps
from ctrlnet.colorize.modes import DEFAULT_ANCHOR_EVERY, MODES, reference_source  # noqa: F401 (MODES: re-export)
from ctrlnet.colorize.reference import ColorizeOptions, colorize_image
from ctrlnet.colorize.video import VideoInfo, probe, read_frames, write_video
from ctrlnet.image import HWC3, load_image, save_image
from ctrlnet.pipeline import Models
from ctrlnet.training.run_folder import check_output, json_values, read_job_record, write_job_record


@dataclass
class _Job:
    """A checked video job: its files and what the frame loop needs."""

    input: Path
    out: Path
    info: VideoInfo
    reference: np.ndarray  # (H, W, 3) uint8
    work: Path
    frames: Path
    mode: str
    anchor_every: int | None


def work_dir_for(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".work")


def _job(input_path: Path, reference: np.ndarray, mode: str, options: ColorizeOptions, model: str,
         anchor_every: int | None = None) -> dict:
    st = input_path.stat()
    if mode == "anchored":
        mode = f"anchored every {anchor_every}"
    return {"input": str(input_path.resolve()), "input_bytes": st.st_size, "mode": mode, "model": model,
            "reference_sha1": hashlib.sha1(np.ascontiguousarray(reference).tobytes()).hexdigest(),
            "options": asdict(options)}


def colorize_video(models: Models, input_path, reference: np.ndarray, out, mode: str = "fixed",
                   options: ColorizeOptions = ColorizeOptions(), work_dir=None, keep_frames: bool = False,
                   restart: bool = False, progress: bool = True, model_name: str = "",
                   overwrite: bool = False, anchor_every: int | None = None, processes=None) -> Path:
    """Colour every frame of ``input_path`` and write ``out``; returns ``out``.

    ``mode`` is one of :data:`MODES` (see the module docstring); ``anchor_every`` is the anchored
    mode's N (default :data:`DEFAULT_ANCHOR_EVERY`) and must be left out for the other modes.
    Raises ValueError when ``work_dir`` holds frames of a different job (another input,
    reference, mode or settings) unless ``restart``, which discards them; ``OutputInUse`` (a
    ValueError) when ``out`` exists and is not this job's, unless ``overwrite`` (moved aside).

    ``processes``: an Accelerate ``PartialState`` when several processes (``accelerate launch``)
    share the job, each with its own ``models``: the main process checks and claims the output,
    the unfinished frames are split with ``split_between_processes``, and the main process encodes
    the video once all are done. Only the ``fixed`` mode splits (the others colour in order).
    """
    if processes is not None and processes.num_processes > 1:
        return _colorize_video_split(models, Path(input_path), reference, Path(out), mode, options, work_dir,
                                     keep_frames, restart, progress, model_name, overwrite, processes)
    job = _open_job(input_path, reference, out, mode, options, work_dir, restart, model_name, overwrite,
                    anchor_every)
    n = _colorize_frames(models, job, options, progress)
    return _finish(job, n, keep_frames)


def _open_job(input_path, reference, out, mode, options, work_dir, restart, model_name, overwrite,
              anchor_every, claim_output: bool = True) -> _Job:
    """Check the job and (``claim_output``) claim ``out`` and the work folder; returns what the frame
    loop and the encoder need."""
    if mode == "anchored" and anchor_every is None:
        anchor_every = DEFAULT_ANCHOR_EVERY
    if mode != "anchored" and anchor_every is not None:
        raise ValueError(f"anchor_every applies to the anchored mode only (mode is {mode!r})")
    reference_source(0, mode, anchor_every)  # checks mode and anchor_every before any work
    input_path, out = Path(input_path), Path(out)
    info = probe(input_path)
    reference = HWC3(np.asarray(reference))
    work = Path(work_dir) if work_dir is not None else work_dir_for(out)
    frames_dir = work / "frames"
    state = _Job(input_path, out, info, reference, work, frames_dir, mode, anchor_every)
    if not claim_output:
        return state
    job = _job(input_path, reference, mode, options, model_name, anchor_every)
    job_file = work / "job.json"
    old = read_job_record(job_file) if not restart else None
    if old is not None and old != json_values(job):
        diff = sorted(k for k in set(old) | set(job) if old.get(k) != json_values(job).get(k))
        raise ValueError(f"{work} holds frames of another job (differs in {', '.join(diff)}); "
                         "pass --restart to discard them, or choose another output")
    same_job = old is not None
    holds = [f"a video of {out.stat().st_size / 2**20:.1f} MiB"] if out.is_file() and not same_job else []
    claim = check_output(out, resume=False, overwrite=overwrite, holds=holds, kind="video", inputs=[input_path],
                         is_dir=False, hint="pass --overwrite to move it aside, or choose another --out")
    if restart and work.exists():
        n = len(list(frames_dir.glob("*.png"))) if frames_dir.is_dir() else 0
        shutil.rmtree(work)
        print(f"discarded {n} frames of an earlier job in {work} (--restart)")
    for note in claim.apply():
        print(note)
    removed = remove_stale_temps(work)
    if removed:
        print(f"removed {len(removed)} temp file(s) of writes killed earlier: {', '.join(map(str, removed))}")
    frames_dir.mkdir(parents=True, exist_ok=True)
    write_job_record(job_file, job)
    return state


def _colorize_frames(models: Models, job: _Job, options: ColorizeOptions, progress: bool,
                     only: set[int] | None = None) -> int:
    """Colour the job's missing frames (``only``: just these indices, fixed mode) into its frames
    folder; returns the number of frames in the video. ValueError for a video without frames."""
    from tqdm.auto import tqdm

    mode, anchor_every, reference, frames_dir = job.mode, job.anchor_every, job.reference, job.frames
    total = len(only) if only is not None else job.info.frames or None
    bar = tqdm(total=total, desc=f"colorize ({mode})", unit="frame", disable=not progress)
    prev = reference
    n = done_before = 0
    for i, frame in enumerate(read_frames(job.input)):
        path = frames_dir / f"{i:06d}.png"
        n = i + 1
        if only is not None and i not in only:
            continue
        if path.is_file():
            done_before += 1
            if mode != "fixed":
                prev = load_image(path)  # the next frame may follow this one
        else:
            ref = reference if reference_source(i, mode, anchor_every) == "fixed" else prev
            result = colorize_image(models, frame, ref, options)
            save_image(result, path)  # atomic: a killed write leaves no partial frame
            prev = result
        bar.update(1)
    bar.close()
    if n == 0:
        raise ValueError(f"{job.input} has no frames")
    if progress and done_before:
        print(f"resumed: {done_before} of {n} frames were already done", flush=True)
    return n


def _finish(job: _Job, n: int, keep_frames: bool) -> Path:
    """Encode the ``n`` finished frames at the source's rate and size; remove the work folder."""
    info = job.info
    write_video((load_image(job.frames / f"{i:06d}.png") for i in range(n)), job.out, info.fps,
                (info.width, info.height))
    if not keep_frames:
        shutil.rmtree(job.work)
    return job.out


def _colorize_video_split(models, input_path: Path, reference, out: Path, mode, options, work_dir, keep_frames,
                          restart, progress, model_name, overwrite, processes) -> Path:
    """:func:`colorize_video` over several processes (see there)."""
    from ctrlnet.colorize.video import count_frames

    if mode != "fixed":
        raise ValueError(f"only the fixed mode splits over processes (the {mode} mode colours frames in order)")
    args = (input_path, reference, out, mode, options, work_dir, restart, model_name, overwrite, None)
    error = None
    if processes.is_main_process:
        try:
            job = _open_job(*args)
        except Exception as e:  # the others must not wait forever; they stop after the barrier
            error = e
    processes.wait_for_everyone()
    if not processes.is_main_process:
        job = _open_job(*args, claim_output=False)
        if not (job.work / "job.json").is_file():
            raise ValueError(f"the main process could not start the job in {job.work}")
    elif error is not None:
        raise error
    n = count_frames(input_path)
    todo = [i for i in range(n) if not (job.frames / f"{i:06d}.png").is_file()]
    processes.wait_for_everyone()  # every process has listed the finished frames before any writes one
    with processes.split_between_processes(todo) as mine:
        if mine:
            _colorize_frames(models, job, options, progress and processes.is_local_main_process, only=set(mine))
    processes.wait_for_everyone()
    if processes.is_main_process:
        _finish(job, n, keep_frames)
    processes.wait_for_everyone()  # the video exists when every process returns
    return out
