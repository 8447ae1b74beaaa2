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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ctrlnet.atomic import remove_stale_temps
from ctrlnet.colorize.modes import DEFAULT_ANCHOR_EVERY, MODES, reference_source  # noqa: F401 (MODES: re-export)
from ctrlnet.colorize.reference import ColorizeOptions, colorize_image
from ctrlnet.colorize.video import probe, read_frames, write_video
from ctrlnet.image import HWC3, load_image, save_image
from ctrlnet.pipeline import Models
from ctrlnet.training.run_folder import check_output, json_values, read_job_record, write_job_record


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
                   overwrite: bool = False, anchor_every: int | None = None) -> Path:
    """Colour every frame of ``input_path`` and write ``out``; returns ``out``.

    ``mode`` is one of :data:`MODES` (see the module docstring); ``anchor_every`` is the anchored
    mode's N (default :data:`DEFAULT_ANCHOR_EVERY`) and must be left out for the other modes.
    Raises ValueError when ``work_dir`` holds frames of a different job (another input,
    reference, mode or settings) unless ``restart``, which discards them; ``OutputInUse`` (a
    ValueError) when ``out`` exists and is not this job's, unless ``overwrite`` (moved aside).
    """
    from tqdm.auto import tqdm

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

    bar = tqdm(total=info.frames or None, desc=f"colorize ({mode})", unit="frame", disable=not progress)
    prev = reference
    n = done_before = 0
    for i, frame in enumerate(read_frames(input_path)):
        path = frames_dir / f"{i:06d}.png"
        if path.is_file():
            done_before += 1
            if mode != "fixed":
                prev = load_image(path)  # the next frame may follow this one
        else:
            ref = reference if reference_source(i, mode, anchor_every) == "fixed" else prev
            result = colorize_image(models, frame, ref, options)
            save_image(result, path)  # atomic: a killed write leaves no partial frame
            prev = result
        n = i + 1
        bar.update(1)
    bar.close()
    if n == 0:
        raise ValueError(f"{input_path} has no frames")
    if progress and done_before:
        print(f"resumed: {done_before} of {n} frames were already done", flush=True)
    write_video((load_image(frames_dir / f"{i:06d}.png") for i in range(n)), out, info.fps,
                (info.width, info.height))
    if not keep_frames:
        shutil.rmtree(work)
    return out
