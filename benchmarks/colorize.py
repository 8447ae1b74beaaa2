"""Reference colorization on held-out synthetic clips: fixed vs recursive mode vs a naive baseline.

Run by hand:
    python benchmarks/colorize.py                                  # shipped colorizer on the demo base
    python benchmarks/colorize.py --colorizer runs/colorize/train/colorize_reference.safetensors
    python benchmarks/colorize.py --base random:tiny-sd1 --colorizer random --size 64 --clips 1   # smoke

For each clip (seeds the recipe never trains on), frame 0 in colour is the reference and frames
1..N are coloured from their lightness. The error is the mean (a, b) distance in CIE Lab to the
true colours (lightness is kept exactly by every method, so only chroma differs). Rows:

- fixed: every frame after the reference;
- recursive: each frame after the previous result (drift shows as error growing along the clip);
- nearest-L: each pixel takes the mean chroma of the reference pixels of the same lightness;
- gray: no colour at all (the scale of the numbers).

Errors are reported over thirds of the clip to show drift, and as ratios to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ctrlnet.colorize.lab import chroma_error, to_gray, transfer_by_luminance
from ctrlnet.colorize.recipe import HELDOUT_SEED
from ctrlnet.colorize.reference import ColorizeOptions, colorize_image, load_colorizer_models
from ctrlnet.colorize.synthetic import synthetic_clip

BENCH_SEED = HELDOUT_SEED + 50_000  # beyond the recipe's held-out clips too


def run(args) -> dict[str, list[list[float]]]:
    methods = ("nearest-L", "gray") if args.baselines_only else ("fixed", "recursive", "nearest-L", "gray")
    if not args.baselines_only:
        models = load_colorizer_models(args.base, args.colorizer, device=args.device, dtype="auto")
    opts = ColorizeOptions(resolution=args.size, steps=args.steps, seed=0)
    errors: dict[str, list[list[float]]] = {k: [] for k in methods}
    t0 = time.time()
    for c in range(args.clips):
        frames = synthetic_clip(args.frames + 1, args.size, seed=BENCH_SEED + c)
        ref, targets = frames[0], frames[1:]
        per = {k: [] for k in errors}
        prev = ref
        for f in targets:
            if not args.baselines_only:
                fixed = colorize_image(models, f, ref, opts)
                rec = colorize_image(models, f, prev, opts)
                prev = rec
                per["fixed"].append(chroma_error(fixed, f))
                per["recursive"].append(chroma_error(rec, f))
            per["nearest-L"].append(chroma_error(transfer_by_luminance(f, ref), f))
            per["gray"].append(chroma_error(to_gray(f), f))
        for k in errors:
            errors[k].append(per[k])
        print(f"clip {c}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in per.items())
              + f"  ({time.time() - t0:.0f} s)", flush=True)
    return errors


def report(errors: dict[str, list[list[float]]], frames: int) -> None:
    thirds = [(0, frames // 3), (frames // 3, 2 * frames // 3), (2 * frames // 3, frames)]
    head = "".join(f"  frames {a + 1}-{b:<4}" for a, b in thirds)
    print(f"\nmean chroma error (Lab ab distance; lower is better)\n{'method':<11}{head}     all   / nearest-L")
    base = float(np.mean(errors["nearest-L"]))
    for k, clips in errors.items():
        arr = np.array(clips)  # (clips, frames)
        cols = "".join(f"  {arr[:, a:b].mean():>13.2f}" for a, b in thirds)
        print(f"{k:<11}{cols}  {arr.mean():>6.2f}   {arr.mean() / base:>6.2f}")
    if "recursive" not in errors:
        return
    rec = np.array(errors["recursive"])
    fix = np.array(errors["fixed"])
    drift = [float(np.polyfit(np.arange(frames), r, 1)[0]) for r in rec]
    print(f"\nrecursive drift: slope {statistics.mean(drift):+.3f} error/frame "
          f"(fixed: {statistics.mean(float(np.polyfit(np.arange(frames), r, 1)[0]) for r in fix):+.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base model (default: the embedded demo)")
    ap.add_argument("--colorizer", default=None, help="colorizer file (default: the shipped one), or 'random'")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--baselines-only", action="store_true", help="only the nearest-L and gray rows (no model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    errors = run(args)
    report(errors, args.frames)


if __name__ == "__main__":
    main()
