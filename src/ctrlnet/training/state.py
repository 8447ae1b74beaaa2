"""Training checkpoints: written atomically, the last K kept, the newest loadable one found.

A checkpoint is one ``torch.save`` file ``checkpoint-<step>.pt`` holding the trainable weights,
optimizer, scheduler, EMA, grad-scaler and RNG states and the step. It is first written to a
temporary name in the same folder, flushed to disk, then renamed over the final name, so a run
killed at any moment leaves the previous checkpoint intact and never a half-written one under a
final name.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def prepare_build_dir(out, resume: bool, threads: int = 0) -> Path:
    """The folder of a multi-stage recipe run: refuse to reuse a non-empty one unless resuming."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise SystemExit(f"{out} is not empty; pass --resume to continue the build there")
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    return out


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


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` to a temp file, fsync, then ``os.replace``; on error the temp file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_checkpoint(folder, step: int, state: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep_last``,
    sparing those whose step is a multiple of ``keep_every`` (milestones for later evaluation)."""
    path = atomic_torch_save(dict(state, step=step), checkpoint_path(folder, step))
    if keep_last > 0:
        for old_step, old in list_checkpoints(folder)[:-keep_last]:
            if keep_every and old_step % keep_every == 0:
                continue
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_latest(folder) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; an unreadable one is skipped with a warning naming it."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a damaged file (disk error): fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}); trying an older one")
    return None


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
