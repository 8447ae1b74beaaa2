"""Does the embedded demo ControlNet follow its control? Run by hand:

    python benchmarks/fidelity.py                      # the shipped model, 50 held-out pairs
    python benchmarks/fidelity.py --build runs/demo    # the recipe's work folder, plus IoU vs steps

Generates from 50 held-out (hint, prompt) pairs (fill50k, a seed the training set never used) and
reports the IoU between the generated circle and the hint's circle (the circle being the pixels
nearer the prompt's circle colour than its background colour), a shape IoU that does not depend
on the colours (two colour clusters; the one off the image border is the circle), and the mean
RGB error of the circle and background colours against the prompt's colours, with strength 1 and with strength 0
(the floor: an uncontrolled circle). With --build it also scores the milestone checkpoints of the
ControlNet stage and plots IoU against training steps. Targets: IoU >= 0.8, colour error <= 20.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctrlnet.training.builders import make_fill50k, read_jsonl
from ctrlnet.training.demo import BASE_FILE, CONTROL_FILE
from ctrlnet.training.fidelity import evaluate, load_pair

ASSETS = Path(__file__).resolve().parents[1] / "src" / "ctrlnet" / "assets" / "demo"
HELDOUT_SEED = 100_003  # the demo recipe's held-out seed (recipe seed 0 + 100003)


def apply_checkpoint(models, path: Path) -> None:
    """ControlNet weights of a training checkpoint (its EMA when it has one)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = state["ema"]["shadow"] if state.get("ema") else state["trainable"]
    sd = {k[len("controlnet."):]: v for k, v in weights.items() if k.startswith("controlnet.")}
    models.controlnet.load_state_dict(sd, strict=True)  # names any missing or unexpected key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, help="the demo recipe's work folder (default: the shipped files)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--no-curve", action="store_true", help="skip IoU against training steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.build:
        base, control = args.build / "base" / BASE_FILE, args.build / "controlnet" / CONTROL_FILE
    else:
        base, control = ASSETS / BASE_FILE, ASSETS / CONTROL_FILE
    models = load_pair(base, control)
    size = 2 ** (len(models.config.vae.ch_mult) - 1) * 16  # 128 for the demo
    tmp = Path(tempfile.mkdtemp(prefix="fidelity-"))
    make_fill50k(tmp, args.n, size, seed=HELDOUT_SEED)
    rows = read_jsonl(tmp / "prompt.json")
    args.out.mkdir(parents=True, exist_ok=True)
    kw = dict(steps=args.steps, guidance_scale=args.cfg)
    report = {}
    for strength in (1.0, 0.0):
        t0 = time.time()
        r = evaluate(models, rows, tmp, strength, **kw)
        images = r.pop("images")
        r["seconds"] = round(time.time() - t0, 1)
        report[f"strength_{strength:g}"] = r
        from ctrlnet.image import save_image
        from ctrlnet.training.previews import grid

        save_image(grid([np.stack(images[:10])]), args.out / f"samples_strength_{strength:g}.png")
        print(f"strength {strength:g}: IoU {r['iou']:.3f}  shape IoU {r['shape_iou']:.3f}  colour error {r['color_error']:.1f} "
              f"(circle {r['circle_error']:.1f}, background {r['background_error']:.1f})  [{r['seconds']} s]")
    curve = []
    ckdir = args.build / "controlnet" / "checkpoints" if args.build else None
    if ckdir and ckdir.is_dir() and not args.no_curve:
        from ctrlnet.training.state import list_checkpoints

        for step, path in list_checkpoints(ckdir):
            apply_checkpoint(models, path)
            r = evaluate(models, rows, tmp, 1.0, **kw)
            curve.append((step, r["iou"], r["color_error"], r["shape_iou"]))
            print(f"step {step}: IoU {r['iou']:.3f}  shape IoU {r['shape_iou']:.3f}  "
                  f"colour error {r['color_error']:.1f}")
        report["curve"] = curve
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label="strength 1")
            ax.plot([c[0] for c in curve], [c[3] for c in curve], "s--", label="strength 1, shape IoU")
            ax.axhline(report["strength_0"]["iou"], ls="--", c="gray", label="strength 0 (floor)")
            ax.axhline(0.8, ls=":", c="red", label="target 0.8")
            ax.set_xlabel("ControlNet training step")
            ax.set_ylabel("IoU with the hint circle")
            ax.set_ylim(0, 1)
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.out / "iou_vs_steps.png", dpi=100)
        except ImportError:
            pass
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
