"""A whole image: SD1.5 + one ControlNet (full size, random weights, a canny hint), ours vs diffusers'
StableDiffusionControlNetPipeline at its best CPU settings. Load time, per-stage and total time,
peak memory.

Run by hand, holding the big-memory lock (each side holds 3-7 GB):

  flock /tmp/bigmem.lock python benchmarks/generate.py [--size 512] [--steps 20] [--dtype bf16] [--device cpu]

Both sides load the same weights (benchmarks/sd15_files.py: ours from the single files, diffusers
from the pipeline folder with ``from_pretrained``, its faster method), sample with DDIM (eta 0,
same timesteps), guidance 7.5, ControlNet scale 1, from the same initial noise, at ``--size``
square. Diffusers gets its documented CPU settings: channels-last UNet and ControlNet, the asked
dtype for every module (bf16 is ~2x faster than fp32 on CPUs with native bf16), inference mode.
Its stages are timed the way a user would split them: ``encode_prompt``; the pipeline with
``prompt_embeds`` and ``output_type="latent"``; ``vae.decode`` + postprocess; the hint is
``cv2.Canny`` on the same picture with the same thresholds as our canny annotator. Ours are
``generate(..., timings=)``. Each side runs in its own process (so its peak resident memory is its
own); one image per side, so the noise of this shared machine is in the numbers: compare ratios
across runs, not single seconds. The images are compared (mean absolute difference of the uint8
pixels) as a check that both did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = "a stone house with a red roof by a lake, best quality"
GUIDANCE = 7.5
SEED = 1
LOW, HIGH = 100, 200  # canny thresholds (our annotator's defaults)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _picture(size: int) -> np.ndarray:
    """A fixed picture with edges to find: shapes on a gradient, (size, size, 3) uint8."""
    import cv2

    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    s = size / 512
    cv2.rectangle(img, (int(96 * s), int(200 * s)), (int(330 * s), int(430 * s)), (200, 60, 40), -1)
    pts = np.array([[80, 200], [213, 90], [346, 200]], np.int32) * s
    cv2.fillPoly(img, [pts.astype(np.int32)], (150, 30, 30))
    cv2.circle(img, (int(410 * s), int(120 * s)), int(50 * s), (250, 220, 90), -1)
    cv2.ellipse(img, (int(400 * s), int(460 * s)), (int(100 * s), int(30 * s)), 0, 0, 360, (40, 90, 200), -1)
    return img


def _noise(size: int):
    # the initial noise our generate() draws for SEED (ImageNoise), so both sides start alike
    import torch

    from ctrlnet.generation.latents import ImageNoise

    return ImageNoise([SEED])(torch.empty(1, 4, size // 8, size // 8))


def _ours(args, folder: Path) -> dict:
    from sd15_files import BASE, CONTROL

    from ctrlnet.generation.bundle import load_models
    from ctrlnet.generation.request import ControlSpec, GenerationRequest
    from ctrlnet.generation.run import generate

    picture = _picture(args.size)
    t = time.perf_counter()
    models = load_models(str(folder / BASE), [str(folder / CONTROL)], device=args.device, dtype=args.dtype)
    load = time.perf_counter() - t
    req = GenerationRequest(prompt=PROMPT, added_prompt="", negative_prompt="", width=args.size, height=args.size,
                            steps=args.steps, guidance_scale=GUIDANCE, seed=SEED, sampler="ddim", eta=0.0,
                            controls=[ControlSpec(picture, annotator="canny",
                                                  annotator_params={"low_threshold": LOW, "high_threshold": HIGH},
                                                  detect_resolution=args.size)])
    stages: dict[str, float] = {}
    t = time.perf_counter()
    image = generate(models, req, timings=stages).images[0]
    total = time.perf_counter() - t
    return {"load": load, "stages": stages, "total": total, "image": image}


def _diffusers(args, folder: Path) -> dict:
    import cv2
    import diffusers
    import torch
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image
    from sd15_files import FOLDER

    diffusers.utils.logging.set_verbosity_error()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    picture = _picture(args.size)
    t = time.perf_counter()
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(folder / FOLDER), torch_dtype=dt,
                                                             local_files_only=True).to(dev)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if dev.type in ("cpu", "cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    stages = {}
    t0 = t = time.perf_counter()
    edges = cv2.Canny(picture, LOW, HIGH)
    hint = Image.fromarray(np.stack([edges] * 3, -1))
    stages["hint"] = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        cond, uncond = pipe.encode_prompt(PROMPT, dev, 1, True, negative_prompt="")
        sync()
        stages["text"] = time.perf_counter() - t
        t = time.perf_counter()
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=hint, height=args.size,
                       width=args.size, num_inference_steps=args.steps, guidance_scale=GUIDANCE, eta=0.0,
                       latents=_noise(args.size).to(dev, dt), output_type="latent").images
        sync()
        stages["sampling"] = time.perf_counter() - t
        t = time.perf_counter()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = pipe.image_processor.postprocess(decoded.float(), output_type="np")[0]
        sync()
        stages["decode"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    return {"load": load, "stages": stages, "total": total, "image": (image * 255).round().astype(np.uint8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where the model files are (written if missing; default "
                    "/tmp/ctrlnet-sd15, or /tmp/ctrlnet-PRESET for another --preset)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="sd15", help="model size; tiny-sd1 tries the script out in seconds")
    ap.add_argument("--sides", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    ap.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size % 64:
        ap.error("--size must be a multiple of 64")
    if args.dir is None:  # one folder per preset: files of another size are never picked up by mistake
        args.dir = "/tmp/ctrlnet-sd15" if args.preset == "sd15" else f"/tmp/ctrlnet-{args.preset}"
    folder = Path(args.dir)
    sys.path.insert(0, str(HERE))
    if args.child:
        import torch

        torch.manual_seed(0)
        r = (_ours if args.child == "ours" else _diffusers)(args, folder)
        np.save(folder / f"generate_{args.child}.npy", r.pop("image"))
        r["peak_gib"] = _peak_gib()
        print(json.dumps(r))
        return
    subprocess.run([sys.executable, str(HERE / "sd15_files.py"), str(folder), args.preset], check=True,
                   stdout=subprocess.DEVNULL)
    rows = {}
    for side in args.sides:
        cmd = [sys.executable, __file__, "--child", side, "--dir", str(folder), "--size", str(args.size),
               "--steps", str(args.steps), "--dtype", args.dtype, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        rows[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {side}: {json.dumps(rows[side])}", flush=True)
    import torch

    print(f"\n{args.preset} + ControlNet (canny hint), {args.size}x{args.size}, {args.steps} DDIM steps, guidance {GUIDANCE}, "
          f"{args.dtype} on {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    names = ["load", "hint", "text", "sampling", "decode", "total (no load)", "per step", "peak RSS GiB"]

    def cells(r):
        st = r["stages"]
        return [r["load"], st.get("hint", 0), st.get("text", 0), st.get("sampling", 0), st.get("decode", 0),
                r["total"], st.get("sampling", 0) / args.steps, r["peak_gib"]]

    table = {s: cells(r) for s, r in rows.items()}
    print("| stage | " + " | ".join(table) + (" | diffusers / ours |" if len(table) == 2 else " |"))
    print("|---|" + "---|" * (len(table) + (1 if len(table) == 2 else 0)))
    for i, n in enumerate(names):
        vals = [table[s][i] for s in table]
        ratio = f" {vals[1] / vals[0]:.2f}x |" if len(vals) == 2 and vals[0] > 0 else ""
        print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" + ratio)
    if len(rows) == 2:
        a = np.load(folder / "generate_ours.npy").astype(np.float32)
        b = np.load(folder / "generate_diffusers.npy").astype(np.float32)
        print(f"images: mean |ours - diffusers| = {np.abs(a - b).mean():.2f} of 255 (max {np.abs(a - b).max():.0f})")


if __name__ == "__main__":
    main()
