"""Run logs: loss per step to CSV (and TensorBoard when installed) and a loss-curve PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ctrlnet.atomic import atomic_path

FIELDS = ("step", "loss", "lr", "elapsed_s", "it_per_s", "skipped")


class RunLogger:
    """Appends one CSV row per optimizer step to ``run_dir/loss.csv``.

    On resume from step ``resume_step`` rows after it are dropped first: they belong to the part of
    the interrupted run that the checkpoint does not hold and will be redone.
    """

    def __init__(self, run_dir, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "loss.csv"
        rows = read_loss_csv(self.csv_path) if self.csv_path.exists() else []
        rows = [r for r in rows if r["step"] <= resume_step]
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        self._f = open(self.csv_path, "a", newline="")
        self._w = csv.DictWriter(self._f, FIELDS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed: the CSV is the log
                self.tb = None

    def log(self, step: int, loss: float, lr: float, elapsed_s: float, it_per_s: float, skipped: int = 0) -> None:
        self._w.writerow({"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}", "elapsed_s": f"{elapsed_s:.1f}",
                          "it_per_s": f"{it_per_s:.4g}", "skipped": skipped})
        self._f.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_loss_csv(path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                             "elapsed_s": float(r["elapsed_s"]), "it_per_s": float(r["it_per_s"]),
                             "skipped": int(r.get("skipped") or 0)})
            except (KeyError, TypeError, ValueError):
                continue  # a line cut short by a killed run
    return rows


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_loss(csv_path, png_path, title: str = "training loss") -> Path | None:
    """Loss curve (raw and smoothed, log scale) as a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_loss_csv(csv_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    w = max(1, len(loss) // 50)
    ax.plot(steps, smooth(loss, w), lw=1.5, label=f"mean of {w}")
    if all(v > 0 and math.isfinite(v) for v in loss):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        with atomic_path(png_path, keep_suffix=True, fsync=False) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return png_path
