"""The output of a resumable job (a training run, a recipe build, a data set, a video's frames):
who may write there, and what happens to what is already there.

The rules, the same for every job in ctrlnet:

- A fresh job never writes over an earlier job's output. If the output already holds work, the
  job stops before doing anything, unless it is told to ``resume`` (continue that work) or to
  ``overwrite``.
- ``overwrite`` never deletes: the earlier output is renamed to ``NAME.replaced-YYYYMMDD-HHMMSS``
  (``STEM.replaced-....SUFFIX`` for a file) beside it, and the job says so. It is refused when an
  input of the job lies inside what would be moved.
- ``resume`` continues only the same job: settings recorded at the start (:func:`check_job_record`)
  must match, or the job stops naming each setting with both values.
- Files a job cannot use (an unreadable checkpoint, say) are renamed with a suffix saying why
  (:func:`set_aside`), never deleted, and reported.
- Temp files of writes killed in an earlier session (:mod:`ctrlnet.atomic`) are removed when the
  next job starts there.

Errors are :class:`OutputInUse` (a ``ValueError``): the command line prints them as one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctrlnet.atomic import atomic_path, remove_stale_temps

RESUME_OR_OVERWRITE = "pass --resume to continue it, or --overwrite to move it aside and start over"


class OutputInUse(ValueError):
    """The output of a job holds earlier work that the requested start would lose or cannot use."""


def replaced_name(path, when: float | None = None) -> Path:
    """Where :func:`move_aside` puts ``path``: ``NAME.replaced-YYYYMMDD-HHMMSS`` beside it (a file
    keeps its suffix last, so ``clip.mp4`` becomes ``clip.replaced-....mp4``; ``-2``, ``-3``, ...
    follow the time when that name is taken)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    keep_suffix = path.is_file() and bool(path.suffix)
    for n in range(1, 10_000):
        tag = f"replaced-{stamp}" + (f"-{n}" if n > 1 else "")
        dest = path.with_name(f"{path.stem}.{tag}{path.suffix}" if keep_suffix else f"{path.name}.{tag}")
        if not dest.exists() and not dest.is_symlink():
            return dest
    raise OutputInUse(f"no free name beside {path}")


def move_aside(path) -> Path:
    """Rename ``path`` (file or folder) to :func:`replaced_name`; returns the new path."""
    path = Path(path)
    dest = replaced_name(path)
    path.rename(dest)
    return dest


def set_aside(path, reason: str) -> Path:
    """Rename a file a job cannot use to ``NAME.<reason>`` (``NAME.<reason>-2``, ... if taken) and
    return the new path; ``reason`` is one word such as ``unreadable`` or ``superseded``."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.{reason}")
    n = 2
    while dest.exists():
        dest = path.with_name(f"{path.name}.{reason}-{n}")
        n += 1
    path.rename(dest)
    return dest


def is_inside(child, parent) -> bool:
    """Whether ``child`` is ``parent`` or lies under it (after resolving links)."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True


@dataclass
class OutputClaim:
    """What a job will do to its output before it starts: made by :func:`check_output` (which
    only reads), carried out by :meth:`apply` (which renames and cleans)."""

    path: Path
    kind: str
    holds: list[str]  # the earlier work found there, in words ("checkpoints at steps 2, 4", ...)
    resume: bool
    overwrite: bool
    is_dir: bool = True
    temps_of: tuple[str, ...] | None = None  # for a file output: the names whose temp files are ours
    moved_to: Path | None = field(default=None, init=False)

    @property
    def starts_over(self) -> bool:
        return self.overwrite and bool(self.holds)

    def apply(self) -> list[str]:
        """Remove stale temp files, move earlier work aside when overwriting, create the folder.
        Returns what was done, one sentence each (for the job to print)."""
        notes = []
        if self.is_dir:
            removed = remove_stale_temps(self.path) if self.path.is_dir() else []
        else:
            removed = remove_stale_temps(self.path.parent, recursive=False, names=self.temps_of or (self.path.name,))
        if removed:
            notes.append(f"removed {len(removed)} temp file(s) of writes killed earlier: "
                         + ", ".join(str(p) for p in removed))
        if self.starts_over and self.path.exists():
            self.moved_to = move_aside(self.path)
            notes.append(f"moved the earlier {self.kind} in {self.path} aside to {self.moved_to}")
        if self.is_dir:
            self.path.mkdir(parents=True, exist_ok=True)
        return notes


def check_output(path, *, resume: bool, overwrite: bool, holds: Sequence[str], kind: str = "output",
                 inputs: Iterable = (), is_dir: bool = True, hint: str = RESUME_OR_OVERWRITE) -> OutputClaim:
    """Decide, before any work, whether a job may start at ``path`` (reads only).

    ``holds`` describes the earlier work found at ``path`` (empty: nothing to lose). Raises
    :class:`OutputInUse` when it holds work and neither ``resume`` nor ``overwrite`` is set (the
    message ends with ``hint``), when both are set, or when ``overwrite`` would move one of
    ``inputs`` away with it.
    """
    path = Path(path)
    if resume and overwrite:
        raise OutputInUse(f"--resume continues the {kind} in {path} and --overwrite moves it aside; pass one of them")
    if path.exists() and path.is_dir() != is_dir:
        raise OutputInUse(f"{path} is a {'file' if is_dir else 'folder'}; expected a {'folder' if is_dir else 'file'}")
    holds = list(holds)
    if holds and not (resume or overwrite):
        raise OutputInUse(f"{path} holds an earlier {kind} ({'; '.join(holds)}); {hint}")
    if holds and overwrite:
        for inp in inputs:
            if inp is not None and str(inp) and is_inside(inp, path):
                raise OutputInUse(f"--overwrite would move {path} aside, and with it {inp}, an input of this job; "
                                  "move that input elsewhere first, or choose another output")
    return OutputClaim(path, kind, holds, resume, overwrite, is_dir)


def claim_output(path, *, resume: bool, overwrite: bool, holds: Sequence[str], kind: str = "output",
                 inputs: Iterable = (), is_dir: bool = True, hint: str = RESUME_OR_OVERWRITE,
                 say=print) -> OutputClaim:
    """:func:`check_output`, then :meth:`OutputClaim.apply`, telling ``say`` what was done."""
    claim = check_output(path, resume=resume, overwrite=overwrite, holds=holds, kind=kind, inputs=inputs,
                         is_dir=is_dir, hint=hint)
    for note in claim.apply():
        say(note)
    return claim


def folder_contents(path) -> list[str]:
    """``holds`` for a folder that is the job's alone: everything in it counts as earlier work."""
    path = Path(path)
    if not path.is_dir():
        return []
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return []
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return [shown]


# --- job records ---------------------------------------------------------------------------------


def json_values(value):
    """JSON's view of a value (tuples become lists), so recorded and new settings compare alike."""
    return json.loads(json.dumps(value))


def settings_differences(recorded: Mapping, settings: Mapping) -> list[str]:
    """``"name: now X, recorded Y"`` for each setting that differs (missing counts as differing)."""
    recorded, settings = json_values(dict(recorded)), json_values(dict(settings))
    out = []
    for k in sorted(set(recorded) | set(settings)):
        if recorded.get(k) != settings.get(k):
            out.append(f"{k}: now {settings.get(k)!r}, recorded {recorded.get(k)!r}")
    return out


def read_job_record(path) -> dict | None:
    """The settings a job recorded at ``path`` (a JSON file), or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputInUse(f"{path}: the job record is damaged ({e.__class__.__name__}: {e}); "
                          "--overwrite starts the job over") from None


def check_job_record(path, settings: Mapping, kind: str = "job") -> None:
    """Refuse to resume a job whose recorded settings (at ``path``) differ from ``settings``,
    naming each setting with both values; no record: nothing to compare."""
    recorded = read_job_record(path)
    if recorded is None:
        return
    diff = settings_differences(recorded, settings)
    if diff:
        raise OutputInUse(f"cannot resume the {kind} in {Path(path).parent} with other settings ("
                          + "; ".join(diff) + "); use the recorded ones, or --overwrite to start over")


def write_job_record(path, settings: Mapping) -> Path:
    """Record a job's settings at ``path`` (atomically), for :func:`check_job_record` on resume."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_values(dict(settings)), indent=1, sort_keys=True), encoding="utf-8")
    return path


JOB_RECORD = "job.json"


def claim_job_folder(out, settings: Mapping, *, resume: bool, overwrite: bool, kind: str, inputs: Iterable = (),
                     say=print) -> Path:
    """Start or continue a job whose output folder is its alone (a data set builder): anything in
    ``out`` is earlier work (:func:`claim_output`); a resumed job must have the settings recorded
    in ``out/job.json`` (:func:`check_job_record`), which a fresh one writes before any work."""
    out = Path(out)
    if resume:  # before anything changes: a mismatch leaves the folder as it was
        check_job_record(out / JOB_RECORD, settings, kind)
    claim_output(out, resume=resume, overwrite=overwrite, holds=folder_contents(out), kind=kind, inputs=inputs,
                 say=say)
    write_job_record(out / JOB_RECORD, settings)
    return out


def prepare_build_dir(out, resume: bool, threads: int = 0, overwrite: bool = False, say=print) -> Path:
    """The folder of a multi-stage recipe run (all of it the recipe's): a fresh build needs an
    empty (or new) folder; ``resume`` continues the build there, ``overwrite`` moves it aside.
    A refusal is a ``SystemExit`` with the message (the recipes' scripts print it as it is)."""
    import torch

    out = Path(out)
    try:
        claim_output(out, resume=resume, overwrite=overwrite, holds=folder_contents(out), kind="build", say=say)
    except OutputInUse as e:
        raise SystemExit(str(e)) from None
    if threads:
        torch.set_num_threads(threads)
    return out
