"""Which 10-step sampler setting looks like 20 DDIM steps? Run by hand:

    python benchmarks/few_steps.py                     # the shipped demo model, 50 basic20 pairs
    python benchmarks/few_steps.py --n 10 --settings "DDIM:20,UniPC:10"

For each fidelity pair (hint + prompt, the ``basic20`` row of ``benchmarks/fidelity.py``: the
colours the shipped model knows) and the same seed per pair, a 50-step DDIM image is the
reference; every setting is then drawn with the same seed through ``ctrlnet.pipeline.generate``
(the path users take, so the initial noise and guidance are identical) and compared with it:

- ``mean err``: mean |RGB difference| (0..255) to the reference, averaged over the pairs;
- ``max err``: the worst pair's mean |difference|;
- ``p99 err``: the 99th percentile of per-pixel |difference| over all pairs (outliers that a mean hides);
- colour IoU, shape IoU, colour error: ``ctrlnet.training.fidelity.circle_score`` of the setting's own
  images (what ``benchmarks/fidelity.py`` reports), so a setting that is close but worse is seen.

``--converged STEPS`` also draws the ODE the reference approximates, solved finely (DPM++ 2M with STEPS
steps in Karras spacing between the reference's own first and last sigma, so the same start and end), and
reports every setting's distance to it (``conv err``): how far DDIM 50 itself is from its limit.

The fast preset (:data:`ctrlnet.generation.presets.PRESETS`) is the 10-step setting with the lowest mean
error (UniPC order 1 on Karras Min; see the README). Results go to ``OUT/few_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SETTINGS = ("DDIM:20,DDIM:10,UniPC order 1:10,UniPC:10,DPM++ 2M Karras:10,DPM++ 2M Uniform:10,Euler:10,"
                    "DPM++ 2M Karras:12,DPM++ 2M Karras:15")


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"NAME:STEPS,NAME:STEPS"`` -> [(name, steps)] (names as ``--sampler`` takes them)."""
    out = []
    for part in text.split(","):
        name, _, steps = part.strip().rpartition(":")
        if not name or not steps.isdigit():
            raise SystemExit(f"bad setting {part!r}: want NAME:STEPS, e.g. 'DPM++ 2M Karras:10'")
        out.append((name, int(steps)))
    return out


def _request(row, root: Path, sampler: str, steps: int, cfg: float, seed: int, resolution: int):
    from ctrlnet.image import load_image
    from ctrlnet.pipeline import ControlSpec, GenerationRequest

    return GenerationRequest(prompt=row["prompt"], controls=[ControlSpec(load_image(root / row["source"]))],
                             resolution=resolution, steps=steps, guidance_scale=cfg, seed=seed,
                             sampler=sampler, added_prompt="", negative_prompt="")


def draw_one(models, row, root: Path, sampler: str, steps: int, cfg: float, seed: int, resolution: int):
    """One image through ``ctrlnet.pipeline.generate`` (the reference for :func:`draw`)."""
    from ctrlnet.pipeline import generate

    return generate(models, _request(row, root, sampler, steps, cfg, seed, resolution)).images[0]


@torch.no_grad()
def draw(models, rows, root: Path, sampler: str, steps: int, cfg: float, seed: int, resolution: int,
         batch: int = 25, sigmas: torch.Tensor | None = None, options: dict | None = None):
    """One image per row (uint8 (H, W, 3)), row i with seed ``seed + i``: ``generate()``'s txt2img pass
    (plan, prompts, unit map, noise, sampler, decode) with the rows batched, since the 128-px demo model
    is too small to fill the processor one image at a time. ``--check`` compares it with generate()."""
    from ctrlnet.generation import preprocess
    from ctrlnet.generation.conditioning import control_input, encode_prompts
    from ctrlnet.generation.latents import ImageNoise, decode_images
    from ctrlnet.generation.plan import make_plan
    from ctrlnet.generation.request import ResizeMode
    from ctrlnet.sampling.denoiser import Denoiser
    from ctrlnet.sampling.names import resolve_sampler
    from ctrlnet.sampling.registry import run_sampler
    from ctrlnet.sampling.schedule import vp_scale

    key, _ = resolve_sampler(sampler)
    given, images = sigmas, []
    for start in range(0, len(rows), batch):
        plans = [make_plan(models, _request(r, root, sampler, steps, cfg, seed + start + i, resolution))
                 for i, r in enumerate(rows[start:start + batch])]
        p0 = plans[0]
        if any(p.size != p0.size for p in plans):
            raise ValueError("the rows' control images differ in size")
        cond, uncond = encode_prompts(models, [p.prompt for p in plans], [""] * len(plans))
        spec = p0.request.controls[0]
        maps = [preprocess.control_map(spec, preprocess.annotate(p.request.controls[0], p.request.controls[0].image,
                                                                 p.size, p.legacy_resolution), p.size,
                                        ResizeMode.JUST_RESIZE if p.legacy_resolution is not None else None)
                for p in plans]  # the map that decides the size is stretched, as in generate()
        unit = control_input(models, p0.unit_nets[0], spec, maps[0], False)
        unit.hint = torch.cat([control_input(models, p0.unit_nets[0], spec, m, False).hint for m in maps])
        sigmas = p0.sigmas(False, models.schedule) if given is None else given
        noise = ImageNoise([p.seeds[0] for p in plans])
        down = models.base.vae.downscale
        shape = (len(plans), models.base.vae.embed_dim, p0.size[0] // down, p0.size[1] // down)
        x = noise(torch.empty(shape)).to(models.device) / vp_scale(float(sigmas[0]))
        den = Denoiser(models.base.unet, models.schedule, cond.to(models.device), uncond.to(models.device), cfg,
                       [unit], False, sigmas)
        x = run_sampler(key, den, x, sigmas, generator=noise.generators, **(options or {}))
        images += decode_images(models, x * vp_scale(float(sigmas[-1])))
    return images


def scores(images, rows) -> dict:
    from ctrlnet.training.colors import COLORS, parse_fill50k_prompt
    from ctrlnet.training.fidelity import circle_score

    s = []
    for img, row in zip(images, rows):
        circle, background = parse_fill50k_prompt(row["prompt"])
        s.append(circle_score(img, row["circle"], COLORS[circle], COLORS[background]))
    return {"iou": float(np.mean([x.iou for x in s])), "shape_iou": float(np.mean([x.shape_iou for x in s])),
            "color_error": float(np.nanmean([x.color_error for x in s]))}


def errors(images, reference) -> dict:
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(images, reference)]
    per_image = [float(d.mean()) for d in diffs]
    return {"mean_err": float(np.mean(per_image)), "max_err": float(np.max(per_image)),
            "p99_err": float(np.percentile(np.concatenate([d.ravel() for d in diffs]), 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="fidelity pairs")
    ap.add_argument("--row", default="basic20", choices=["basic20", "css"])
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="NAME:STEPS, comma-separated")
    ap.add_argument("--reference-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("runs/few_steps"))
    ap.add_argument("--converged", type=int, default=0, metavar="STEPS",
                    help="also compare with the reference's ODE solved in STEPS DPM++ 2M steps (e.g. 120)")
    ap.add_argument("--check", action="store_true",
                    help="first compare the batched path with generate() on two pairs for every setting")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)

    from fidelity import benchmark_rows  # benchmarks/ is on sys.path when run as a script
    from ctrlnet.pipeline import load_models

    models = load_models(device="cpu", dtype="fp32")  # the embedded demo model
    resolution = models.defaults.get("resolution", 128)
    tmp = Path(tempfile.mkdtemp(prefix="few-steps-"))
    rows = benchmark_rows(args.row, args.n, resolution, tmp)
    root = tmp / args.row
    if args.check:
        for name, steps in [("DDIM", args.reference_steps), *settings]:
            batched = draw(models, rows[:2], root, name, steps, args.cfg, args.seed, resolution)
            for i in range(2):
                one = draw_one(models, rows[i], root, name, steps, args.cfg, args.seed + i, resolution)
                d = np.abs(one.astype(np.int16) - batched[i].astype(np.int16))
                print(f"check {name} {steps}, pair {i}: batched vs generate() max |diff| {d.max()}, "
                      f"mean {d.mean():.3f}", flush=True)
                if d.max() > 2:
                    raise SystemExit("the batched path does not draw generate()'s image")
    t0 = time.time()
    reference = draw(models, rows, root, "DDIM", args.reference_steps, args.cfg, args.seed, resolution)
    report = {"n": args.n, "row": args.row, "cfg": args.cfg, "seed": args.seed,
              "reference": {"setting": f"DDIM:{args.reference_steps}", **scores(reference, rows),
                            "seconds": round(time.time() - t0, 1)}, "settings": []}
    print(f"reference DDIM {args.reference_steps}: colour IoU {report['reference']['iou']:.3f} "
          f"shape IoU {report['reference']['shape_iou']:.3f} colour error {report['reference']['color_error']:.1f}",
          flush=True)
    converged = None
    if args.converged:
        from ctrlnet.sampling.schedule import get_sigmas

        ends = get_sigmas(models.schedule, args.reference_steps, "ddim")[[0, -1]]
        ramp = torch.linspace(0, 1, args.converged + 1, dtype=torch.float64)
        rho = 7.0  # Karras spacing between the reference's own ends
        fine = (ends[0] ** (1 / rho) + ramp * (ends[1] ** (1 / rho) - ends[0] ** (1 / rho))) ** rho
        fine[0], fine[-1] = ends[0], ends[1]
        converged = draw(models, rows, root, "DPM++ 2M", args.converged, args.cfg, args.seed, resolution, sigmas=fine)
        report["reference"]["conv_err"] = errors(reference, converged)["mean_err"]
        print(f"reference to its ODE solved in {args.converged} DPM++ 2M steps: mean err "
              f"{report['reference']['conv_err']:.2f}", flush=True)
    print(f"{'setting':<24} {'mean err':>8} {'max err':>8} {'p99 err':>8} {'colour IoU':>10} {'shape IoU':>9} "
          f"{'colour err':>10}" + (f" {'conv err':>8}" if converged is not None else ""), flush=True)
    for name, steps in settings:
        t0 = time.time()
        images = draw(models, rows, root, name, steps, args.cfg, args.seed, resolution)
        r = {"setting": f"{name}:{steps}", "sampler": name, "steps": steps, **errors(images, reference),
             **scores(images, rows), "seconds": round(time.time() - t0, 1)}
        if converged is not None:
            r["conv_err"] = errors(images, converged)["mean_err"]
        report["settings"].append(r)
        print(f"{name + ' ' + str(steps):<24} {r['mean_err']:>8.2f} {r['max_err']:>8.2f} {r['p99_err']:>8.1f} "
              f"{r['iou']:>10.3f} {r['shape_iou']:>9.3f} {r['color_error']:>10.1f}"
              + (f" {r['conv_err']:>8.2f}" if converged is not None else "") + f"  [{r['seconds']} s]", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "few_steps.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'few_steps.json'}")


if __name__ == "__main__":
    main()
