"""Loading a full-size SD1.5 + ControlNet (fp16 files, random weights): time and peak memory, ours
vs diffusers' ``from_single_file`` and ``from_pretrained``.

Run by hand, holding the big-memory lock (each load holds 3-7 GB):

  flock /tmp/bigmem.lock python benchmarks/load.py [--dir /tmp/ctrlnet-sd15] [--dtypes fp32 bf16] [--repeats 2]

The files are written once into ``--dir`` (benchmarks/sd15_files.py: single files in the original
layout, fp16, plus the same weights as a diffusers pipeline folder). Every load runs in its own
Python process, so each peak is its own: the time is from the loading call until the models are
ready for the first step (in the asked dtype, on the CPU; ours also channels-last, as
``load_models`` leaves them), imports excluded; the CPU time is the user + system time of all the
process's threads over the same span (steadier than the wall time on a shared machine; page
faults on fresh memory count as system time); the peak is the process's peak resident set
(``ru_maxrss``, which counts the pages of a memory-mapped file it touched). Before timing, every
file is read once so both sides find it in the page cache. Methods run interleaved, ``--repeats``
rounds; the table gives the median time and CPU time and the highest peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("ours-single", "ours-folder", "diffusers-single", "diffusers-pretrained")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    # user + system time of all this process's threads: on a shared machine a steadier measure
    # of the work done than the wall time (page faults are system time)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(method: str, dtype: str, folder: Path) -> dict:
    import torch

    from sd15_files import BASE, CONTROL, FOLDER

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base, control, pipe_dir = folder / BASE, folder / CONTROL, folder / FOLDER
    if method.startswith("ours"):
        from ctrlnet.generation.bundle import load_models

        before, c0 = _peak_mb(), _cpu_s()
        t0 = time.perf_counter()
        if method == "ours-single":
            m = load_models(str(base), [str(control)], device="cpu", dtype=dtype)
        else:
            m = load_models(str(pipe_dir), device="cpu", dtype=dtype)
        seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
        got = {p.dtype for mod in (m.base.unet, *m.controlnets.values()) for p in mod.parameters()}
    else:
        import diffusers
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        diffusers.utils.logging.set_verbosity_error()
        before, c0 = _peak_mb(), _cpu_s()
        t0 = time.perf_counter()
        if method == "diffusers-single":
            # offline: the component configs come from the local pipeline folder (``config=``)
            cn = ControlNetModel.from_single_file(str(control), config=str(pipe_dir / "controlnet"),
                                                  torch_dtype=dt, local_files_only=True)
            pipe = StableDiffusionControlNetPipeline.from_single_file(
                str(base), controlnet=cn, config=str(pipe_dir), torch_dtype=dt, local_files_only=True,
                safety_checker=None, requires_safety_checker=False)
        else:
            pipe = StableDiffusionControlNetPipeline.from_pretrained(str(pipe_dir), torch_dtype=dt,
                                                                     local_files_only=True)
        seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
        got = {p.dtype for mod in (pipe.unet, pipe.controlnet) for p in mod.parameters()}
    if got != {dt}:
        raise SystemExit(f"{method}: parameters came out in {got}, not {dt}")
    return {"method": method, "dtype": dtype, "seconds": seconds, "cpu_s": cpu, "peak_mb": _peak_mb(), "before_mb": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/ctrlnet-sd15", help="where the benchmark files are (written if missing)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.dir)
    sys.path.insert(0, str(HERE))
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], folder)))
        return
    # written in a child too, so this parent stays small
    subprocess.run([sys.executable, str(HERE / "sd15_files.py"), str(folder)], check=True, stdout=subprocess.DEVNULL)
    for p in sorted(folder.rglob("*.safetensors")):  # into the page cache, for both sides alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for dtype in args.dtypes:
            for method in args.methods:
                out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--child", method, dtype],
                                     capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    raise SystemExit(f"{method} {dtype} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.setdefault((dtype, method), []).append(r)
                print(f"  {dtype} {method}: {r['seconds']:.2f} s (CPU {r['cpu_s']:.2f} s), peak {r['peak_mb'] / 1024:.2f} GiB "
                      f"(after imports {r['before_mb'] / 1024:.2f})", flush=True)
    import diffusers
    import torch

    print(f"\nSD1.5 + ControlNet, fp16 files, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{os.cpu_count()} CPUs; median of {args.repeats} (time), max (peak RSS)")
    print("| dtype | method | load s | CPU s | peak RSS GiB | after imports GiB | time / ours-single | "
          "CPU / ours-single | peak / ours-single |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        ref = rows.get((dtype, "ours-single"))
        for method in args.methods:
            rs = rows[(dtype, method)]
            t = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu_s"] for r in rs)
            peak = max(r["peak_mb"] for r in rs) / 1024
            before = max(r["before_mb"] for r in rs) / 1024
            if ref:
                rt = t / statistics.median(r["seconds"] for r in ref)
                rc = cpu / statistics.median(r["cpu_s"] for r in ref)
                rp = peak / (max(r["peak_mb"] for r in ref) / 1024)
                ratio = f"{rt:.2f}x | {rc:.2f}x | {rp:.2f}x"
            else:
                ratio = "- | - | -"
            print(f"| {dtype} | {method} | {t:.2f} | {cpu:.2f} | {peak:.2f} | {before:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
