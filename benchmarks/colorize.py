"""Reference colorization on held-out synthetic clips: fixed, anchored and recursive modes against
a naive baseline, on clips where lightness cannot decide colour and on the first colorizer's clips.

Run by hand:
    python benchmarks/colorize.py                                  # shipped colorizer on the demo base
    python benchmarks/colorize.py --colorizer runs/colorize/train/colorize_reference.safetensors
    python benchmarks/colorize.py --baselines-only                 # nearest-L and gray rows, no model
    python benchmarks/colorize.py --base random:tiny-sd1 --colorizer random --size 64 --clips 1   # smoke

For each clip (seeds no recipe uses), frame 0 in colour is the reference and frames 1..N are
coloured from their lightness. The error is the mean (a, b) distance in CIE Lab to the true
colours (lightness is kept exactly by every method, so only chroma differs). Clip sets:

- ``isoluminant``: each lightness level holds two hues (:func:`ctrlnet.colorize.synthetic.isoluminant_clip`);
  a lightness -> colour table cannot be right on them. Target (issue 17): fixed and anchored at
  least 30% below nearest-L.
- ``classic``: the first colorizer's clips (:func:`~ctrlnet.colorize.synthetic.synthetic_clip`),
  kept for comparison; there lightness nearly decides colour.

Rows: fixed (every frame after the reference); anchored (recursive, back to the reference every
``--anchor-every`` frames); recursive (each frame after the previous result); nearest-L (each
pixel takes the mean chroma of the reference pixels of its lightness); gray (no colour: the scale).
Errors over thirds of the clip and the slope per frame show drift.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctrlnet.colorize.lab import chroma_error, to_gray, transfer_by_luminance
from ctrlnet.colorize.modes import reference_source
from ctrlnet.colorize.recipe import HELDOUT_SEED
from ctrlnet.colorize.synthetic import make_clip

BENCH_SEED = HELDOUT_SEED + 50_000  # beyond the recipe's held-out clips too
MODEL_MODES = ("fixed", "anchored", "recursive")


def colorize_sequence(colorize, frames: list[np.ndarray], reference: np.ndarray, mode: str,
                      anchor_every: int | None = None) -> list[np.ndarray]:
    """Colour ``frames`` in order after ``reference`` as the video job's ``mode`` does
    (:func:`ctrlnet.colorize.modes.reference_source`); ``colorize(frame, ref)`` colours one."""
    out: list[np.ndarray] = []
    for i, f in enumerate(frames):
        ref = reference if reference_source(i, mode, anchor_every) == "fixed" else out[-1]
        out.append(colorize(f, ref))
    return out


def run_set(kind: str, args, models=None) -> dict[str, list[list[float]]]:
    """Errors per method, clip and frame for one clip set."""
    from ctrlnet.colorize.reference import ColorizeOptions, colorize_image

    methods = (() if models is None else MODEL_MODES) + ("nearest-L", "gray")
    errors: dict[str, list[list[float]]] = {k: [] for k in methods}
    opts = ColorizeOptions(resolution=args.size, steps=args.steps, seed=0)
    t0 = time.time()
    for c in range(args.clips):
        frames = make_clip(kind, args.frames + 1, args.size, seed=BENCH_SEED + c)
        ref, targets = frames[0], frames[1:]
        per: dict[str, list[float]] = {}
        for mode in methods[:-2]:
            # the reference is frame 0 itself; the sequence colours frames 1..N, the first after it
            done = colorize_sequence(lambda f, r: colorize_image(models, f, r, opts), targets, ref, mode,
                                     args.anchor_every if mode == "anchored" else None)
            per[mode] = [chroma_error(o, f) for o, f in zip(done, targets)]
        per["nearest-L"] = [chroma_error(transfer_by_luminance(f, ref), f) for f in targets]
        per["gray"] = [chroma_error(to_gray(f), f) for f in targets]
        for k in errors:
            errors[k].append(per[k])
        print(f"{kind} clip {c}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in per.items())
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    return errors


def summarize(errors: dict[str, list[list[float]]], frames: int) -> dict:
    """Means over thirds and all frames, ratio to nearest-L, and the drift slope per frame."""
    thirds = [(0, frames // 3), (frames // 3, 2 * frames // 3), (2 * frames // 3, frames)]
    base = float(np.mean(errors["nearest-L"]))
    out = {}
    for k, clips in errors.items():
        arr = np.array(clips)  # (clips, frames)
        slope = float(np.mean([np.polyfit(np.arange(frames), r, 1)[0] for r in arr])) if frames > 1 else 0.0
        out[k] = {"thirds": [float(arr[:, a:b].mean()) for a, b in thirds], "all": float(arr.mean()),
                  "vs_nearest_L": float(arr.mean() / base), "drift_per_frame": slope}
    return out


def report(kind: str, summary: dict, frames: int) -> None:
    thirds = [(0, frames // 3), (frames // 3, 2 * frames // 3), (2 * frames // 3, frames)]
    head = "".join(f"  frames {a + 1}-{b:<4}" for a, b in thirds)
    print(f"\n{kind} clips: mean chroma error (Lab ab distance; lower is better)\n"
          f"{'method':<11}{head}     all  / nearest-L  drift/frame")
    for k, s in summary.items():
        cols = "".join(f"  {v:>13.2f}" for v in s["thirds"])
        print(f"{k:<11}{cols}  {s['all']:>6.2f}   {s['vs_nearest_L']:>6.2f}   {s['drift_per_frame']:>+8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base model (default: the embedded demo)")
    ap.add_argument("--colorizer", default=None, help="colorizer file (default: the shipped one), or 'random'")
    ap.add_argument("--sets", default="isoluminant,classic", help="clip sets, comma-separated")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--anchor-every", type=int, default=10, help="the anchored mode's N")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--baselines-only", action="store_true", help="only the nearest-L and gray rows (no model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = None
    if not args.baselines_only:
        from ctrlnet.colorize.reference import load_colorizer_models

        models = load_colorizer_models(args.base, args.colorizer, device=args.device, dtype="auto")
    out = {"clips": args.clips, "frames": args.frames, "anchor_every": args.anchor_every, "steps": args.steps}
    for kind in [s.strip() for s in args.sets.split(",") if s.strip()]:
        summary = summarize(run_set(kind, args, models), args.frames)
        report(kind, summary, args.frames)
        out[kind] = summary
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
