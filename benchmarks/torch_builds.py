"""CPU speed of two PyTorch builds side by side (e.g. what a plain ``pip install -e .`` brings, the
CUDA build from PyPI, against the CPU-only build), each Python in its own process, interleaved.

  python benchmarks/torch_builds.py /tmp/venv-fresh/bin/python python [--rounds 3]

Each Python must import ``ctrlnet`` (installed, or this checkout's src/ on PYTHONPATH, which this
script sets). Per build: ``import torch`` time, a 3x3 convolution (320 channels, 64x64, batch 2:
an SD1.5 UNet level) in fp32 and bf16, and the embedded demo model's whole image (128 px, 20
steps, the README's ``ctrlnet generate`` example) in fp32 and bf16. Median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, time
t = time.perf_counter()
import torch
r = {"import_torch": time.perf_counter() - t, "torch": torch.__version__, "cuda": torch.version.cuda}
import numpy as np
from PIL import Image
from ctrlnet.generation.bundle import load_models
from ctrlnet.generation.request import ControlSpec, GenerationRequest
from ctrlnet.generation.run import generate
x = torch.randn(2, 320, 64, 64)
conv = torch.nn.Conv2d(320, 320, 3, padding=1).eval()
hint = np.asarray(Image.open(HINT).convert("RGB"))
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    c, xs = conv.to(dt), x.to(dt)
    with torch.inference_mode():
        c(xs)
        t = time.perf_counter()
        for _ in range(10):
            c(xs)
    r[f"conv_{name}"] = (time.perf_counter() - t) / 10
    m = load_models(None, device="cpu", dtype=name)
    req = GenerationRequest(prompt="deep sky blue circle with old lace background", controls=[ControlSpec(hint)],
                            seed=1, steps=20)
    generate(m, GenerationRequest(prompt="warm up", controls=[ControlSpec(hint)], seed=1, steps=1))
    t = time.perf_counter()
    generate(m, req)
    r[f"demo_{name}"] = time.perf_counter() - t
print(json.dumps(r))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pythons", nargs="+", help="Python executables, one per build")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    code = CHILD.replace("HINT", repr(str(ROOT / "examples" / "circle_hint.png")))
    runs = {p: [] for p in args.pythons}
    for _ in range(args.rounds):
        for p in args.pythons:
            out = subprocess.run([p, "-c", code], capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{p} failed:\n{out.stderr[-2000:]}")
            runs[p].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(p, runs[p][-1], flush=True)
    keys = ["import_torch", "conv_fp32", "conv_bf16", "demo_fp32", "demo_bf16"]
    print("| python | torch | " + " | ".join(f"{k} s" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for p, rs in runs.items():
        build = f"{rs[0]['torch']} (CUDA {rs[0]['cuda']})" if rs[0]["cuda"] else rs[0]["torch"]
        print(f"| {p} | {build} | " + " | ".join(f"{statistics.median(r[k] for r in rs):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
