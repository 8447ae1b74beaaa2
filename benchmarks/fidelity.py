"""Does the embedded fill50k ControlNet follow its control and its prompt? Run by hand:

    python benchmarks/fidelity.py                      # the shipped model
    python benchmarks/fidelity.py --build runs/demo    # the recipe's work folder, plus IoU vs steps
    python benchmarks/fidelity.py --dtype fp32 bf16    # each row in both dtypes + their pixel difference

Rows (each 50 (hint, prompt) pairs at the model's 128 px, DDIM 20 steps, guidance 5):

- ``css``: pairs drawn from the whole CSS/X11 vocabulary (140 names), only from the pairs the
  recipe keeps out of training (:func:`ctrlnet.training.colors.split_pairs`), with a seed no
  recipe uses; at strength 1, and at strength 0 (the floor: an uncontrolled circle);
- ``basic20``: the first model's 20-colour benchmark exactly as it was (its pairs and seed), so
  numbers can be compared across models.

Columns: colour IoU (the generated circle taken as the pixels nearer the prompt's circle colour
than its background colour, against the hint's disk), shape IoU (the circle found without the
colour names: two colour clusters, the one off the border), and colour error (mean |RGB| error of
the circle and background means against the named colours, 0..255). Targets (issue 17): colour
IoU >= 0.8, shape IoU >= 0.85, colour error <= 20 on the css row. With --build the ControlNet
stage's milestone checkpoints are scored too (css row) and plotted against training steps
(matplotlib) as ``OUT/iou_vs_steps.png``.
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
from ctrlnet.training.colors import basic20_pairs, color_pairs, split_pairs
from ctrlnet.training.demo import BASE_FILE, CONTROL_FILE
from ctrlnet.training.fidelity import evaluate, load_pair

ASSETS = Path(__file__).resolve().parents[1] / "src" / "ctrlnet" / "assets" / "demo"
BASIC20_SEED = 100_003  # the first model's benchmark seed (its recipe's held-out seed, seed 0 + 100003)
CSS_SEED = 200_003  # no recipe draws examples with this seed


def benchmark_rows(name: str, n: int, size: int, root: Path) -> list[dict]:
    """The rows of one benchmark set, written under ``root``: ``css`` or ``basic20``."""
    if name == "css":
        pairs, seed = split_pairs(color_pairs())[1], CSS_SEED
    elif name == "basic20":
        pairs, seed = basic20_pairs(), BASIC20_SEED
    else:
        raise ValueError(f"unknown benchmark set {name!r}; known: css, basic20")
    make_fill50k(root / name, n, size, seed=seed, pairs=pairs)
    return read_jsonl(root / name / "prompt.json")


def apply_checkpoint(models, path: Path) -> None:
    """ControlNet weights of a training checkpoint (its EMA when it has one)."""
    state = torch.load(path, map_location=next(models.controlnet.parameters()).device, weights_only=False)
    weights = state["ema"]["shadow"] if state.get("ema") else state["trainable"]
    sd = {k[len("controlnet."):]: v for k, v in weights.items() if k.startswith("controlnet.")}
    models.controlnet.load_state_dict(sd, strict=True)  # names any missing or unexpected key


def _line(label: str, r: dict) -> str:
    return (f"{label:<22} {r['iou']:>10.3f} {r['shape_iou']:>10.3f} {r['color_error']:>8.1f} "
            f"({r['circle_error']:.1f} / {r['background_error']:.1f})  [{r['seconds']} s]")


def plot_curve(curve: list[tuple], floor: float, path: Path) -> bool:
    """IoU against ControlNet training steps; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label="colour IoU")
    ax.plot([c[0] for c in curve], [c[3] for c in curve], "s--", label="shape IoU")
    ax.axhline(floor, ls="--", c="gray", label="strength 0 (floor), colour IoU")
    ax.axhline(0.8, ls=":", c="red", label="target 0.8")
    ax.set_xlabel("ControlNet training step")
    ax.set_ylabel("IoU with the hint circle (css row)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, help="the demo recipe's work folder (default: the shipped files)")
    ap.add_argument("--base", type=Path, help="a base file (with --controlnet; default: the shipped one)")
    ap.add_argument("--controlnet", type=Path, help="a ControlNet file (default: the shipped one)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--rows", default="css,basic20", help="benchmark sets, comma-separated (css, basic20)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps (auto: the accelerator if any)")
    ap.add_argument("--dtype", nargs="+", default=["fp32"],
                    help="compute dtypes (fp32, bf16, fp16); with several, each row is scored per dtype "
                         "and the mean |pixel difference| to the first dtype's images is printed")
    ap.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--no-curve", action="store_true", help="skip IoU against training steps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build:
        base, control = args.build / "base" / BASE_FILE, args.build / "controlnet" / CONTROL_FILE
    else:
        base, control = args.base or ASSETS / BASE_FILE, args.controlnet or ASSETS / CONTROL_FILE
    from ctrlnet.runtime.device import resolve_device

    from ctrlnet.runtime.device import resolve_dtype, vae_dtype

    device = resolve_device(args.device)
    dtypes = [resolve_dtype(d, device) for d in args.dtype]
    models = load_pair(base, control, device)
    size = 2 ** (len(models.config.vae.ch_mult) - 1) * 16  # 128 for the demo
    tmp = Path(tempfile.mkdtemp(prefix="fidelity-"))
    names = [s.strip() for s in args.rows.split(",") if s.strip()]
    rows = {name: benchmark_rows(name, args.n, size, tmp) for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    kw = dict(steps=args.steps, guidance_scale=args.cfg)
    report = {"base": str(base), "controlnet": str(control), "n": args.n, "steps": args.steps, "cfg": args.cfg,
              "dtypes": args.dtype}
    print(f"{'row':<22} {'colour IoU':>10} {'shape IoU':>10} {'colour error (circle / background)':>8}")
    from ctrlnet.image import save_image
    from ctrlnet.training.previews import grid

    first_images = {}
    for di, dt in enumerate(dtypes):
        tag = "" if len(dtypes) == 1 else f" [{args.dtype[di]}]"
        for key_m, m in models.modules().items():
            m.to(dtype=vae_dtype(dt) if key_m == "vae" else dt)
        for name in names:
            for strength in ((1.0, 0.0) if name == "css" else (1.0,)):
                t0 = time.time()
                r = evaluate(models, rows[name], tmp / name, strength, **kw)
                images = r.pop("images")
                r["seconds"] = round(time.time() - t0, 1)
                key = f"{name}_strength_{strength:g}"
                if di == 0:
                    first_images[key] = np.stack(images).astype(np.int16)
                else:
                    diff = np.abs(np.stack(images).astype(np.int16) - first_images[key])
                    r["mean_pixel_diff_to_" + args.dtype[0]] = float(diff.mean())
                    r["max_pixel_diff_to_" + args.dtype[0]] = int(diff.max())
                    key = f"{key}_{args.dtype[di]}"
                report[key] = r
                save_image(grid([np.stack(images[:10])]), args.out / f"samples_{key}.png")
                line = _line(f"{name}, strength {strength:g}{tag}", r)
                if di:
                    line += f"  mean |pixel diff| to {args.dtype[0]} {r['mean_pixel_diff_to_' + args.dtype[0]]:.2f}"
                print(line, flush=True)
    ckdir = args.build / "controlnet" / "checkpoints" if args.build else None
    if ckdir and ckdir.is_dir() and not args.no_curve and "css" in rows:
        from ctrlnet.training.state import list_checkpoints

        curve = []
        for step, path in list_checkpoints(ckdir):
            apply_checkpoint(models, path)
            r = evaluate(models, rows["css"], tmp / "css", 1.0, **kw)
            curve.append((step, r["iou"], r["color_error"], r["shape_iou"]))
            print(f"step {step}: colour IoU {r['iou']:.3f}  shape IoU {r['shape_iou']:.3f}  "
                  f"colour error {r['color_error']:.1f}", flush=True)
        report["curve"] = curve
        if curve and plot_curve(curve, report["css_strength_0"]["iou"], args.out / "iou_vs_steps.png"):
            print(f"wrote {args.out / 'iou_vs_steps.png'}")
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
