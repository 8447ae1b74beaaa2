"""Training checkpoints: written atomically, the last K kept, the newest loadable one found.

A checkpoint is one ``torch.save`` file ``checkpoint-<step>.pt`` holding the trainable weights,
optimizer, scheduler, EMA, grad-scaler and RNG states and the step. It is first written to a
temporary name in the same folder (``.checkpoint-<step>.pt.<pid>.tmp``, see :mod:`ctrlnet.atomic`),
flushed to disk, then renamed over the final name, so a run killed at any moment leaves the
previous checkpoint intact and never a half-written one under a final name. A checkpoint that
does not load is renamed ``checkpoint-<step>.pt.unreadable`` by the run that finds it, so it is
neither taken for the newest nor counted by the pruning.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from ctrlnet.atomic import atomic_path
from ctrlnet.checkpoints.io import CheckpointError

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_SET_ASIDE = re.compile(r"^checkpoint-(\d+)\.pt\.[a-z]+(-\d+)?$")


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def set_aside_checkpoints(folder) -> list[Path]:
    """Checkpoints renamed by :func:`ctrlnet.training.run_folder.set_aside`
    (``checkpoint-<step>.pt.unreadable``, ``.superseded``), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SET_ASIDE.match(p.name))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` to ``.NAME.<pid>.tmp`` (:mod:`ctrlnet.atomic`), fsync, then ``os.replace``;
    on error the temp file goes and ``path`` is untouched."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return Path(path)


def save_checkpoint(folder, step: int, state: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then prune the checkpoints older than it (lower
    steps) to the newest ``keep_last - 1``, sparing those whose step is a multiple of ``keep_every``
    (milestones for later evaluation). The one just written is never deleted, nor any with a
    higher step (another timeline; :func:`~ctrlnet.training.loop.plan_run` sets those aside)."""
    path = atomic_torch_save(dict(state, step=step), checkpoint_path(folder, step))
    if keep_last > 0:
        older = [(s, p) for s, p in list_checkpoints(folder) if s < step]
        for old_step, old in older[:max(0, len(older) - (keep_last - 1))]:
            if keep_every and old_step % keep_every == 0:
                continue
            old.unlink(missing_ok=True)
    return path


REQUIRED_KEYS = ("trainable", "optimizer", "scheduler", "rng", "step", "micro_batches")


def _one_line(e: BaseException) -> str:
    """``Class: first sentence`` of an exception (torch appends paragraphs of advice to some)."""
    text = " ".join(str(e).split())
    text = text.split(". ")[0].rstrip(".")
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def load_checkpoint(path) -> dict:
    """Read a training checkpoint. Every failure is a :class:`CheckpointError` whose one-line
    message names the file and the cause (missing, a model file rather than a checkpoint,
    truncated or damaged, not written by the training loop)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 0:
        raise CheckpointError(f"{path}: unreadable checkpoint (the file is empty)")
    if len(head) == 9 and head[8:9] == b"{":
        raise CheckpointError(f"{path}: a safetensors model file, not a training checkpoint (those are "
                              "RUN/checkpoints/checkpoint-<step>.pt; to start from a model use --controlnet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, disk error: one line, naming the file
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or damaged ({_one_line(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        have = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint of ctrlnet (it has {have}, not "
                              f"{', '.join(REQUIRED_KEYS)})")
    return state


def find_resume_point(folder) -> tuple[tuple[Path, dict] | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``folder`` that loads, and the newer ones that did not, each
    with the reason (the caller sets those aside). ``(None, [...])`` when none loads."""
    unreadable = []
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return (path, load_checkpoint(path)), unreadable
        except CheckpointError as e:
            unreadable.append((path, str(e)))
    return None, unreadable


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_rng(seed: int) -> None:
    """Seed the Python, NumPy and torch global generators (a fresh run; a resumed one restores
    them with :func:`set_rng_state`), so every checkpoint is a function of the run's settings."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EMA:
    """Exponential moving average of parameters: ``shadow = d * shadow + (1 - d) * param``."""

    def __init__(self, named_params, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params) -> None:
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        self.decay = state["decay"]
        # checkpoints are read onto the CPU: each average goes back where its parameter lives
        self.shadow = {n: t.to(self.shadow[n].device if n in self.shadow else t.device, torch.float32, copy=True)
                       for n, t in state["shadow"].items()}
