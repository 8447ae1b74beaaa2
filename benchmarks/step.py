"""One CFG denoising step of full-size SD1.5 UNet + ControlNet (random weights): ours vs its peers.

Run by hand (needs ~10 GB of memory in fp32; hold the machine's big-memory lock if it has one):

    python benchmarks/step.py                        # fp32 and bf16; ours vs diffusers (+ OpenVINO if installed)
    python benchmarks/step.py --dtypes bf16 --compile --repeats 3
    python benchmarks/step.py --dtypes bf16 --profile 10   # + torch.profiler's top ops of our step

Per dtype, every candidate gets the same weights (ours converted to diffusers keys) and the same
inputs (batch 2 = the cond and uncond halves of one CFG step); the outputs are checked against ours
before any time is reported, then candidates are timed in interleaved rounds (so load drift on a
shared machine hits all alike) and the medians printed with the ratio best-peer / ours (> 1: ours
is faster). Candidates:

- ``ours``: UNet + ControlNet as ``generate()`` runs them (channels-last on CPU), the hint encoder
  included; ``ours, cached hint``: the hint encoder's output reused, as the sampling loop does
  from the second step on (:class:`ctrlnet.sampling.denoiser.Denoiser`).
- ``ours compiled`` (with ``--compile``): the same two modules ``torch.compile``d exactly as
  ``load_models(compile=True)`` / ``CTRLNET_COMPILE=1`` does (:mod:`ctrlnet.runtime.compile`),
  the hint encoder cached as in sampling; ``ours compiled, frozen`` adds inductor's ``freezing``
  (weights folded in as constants: faster or not, measured here; not what ``load_models`` does,
  because in-place LoRA merges would be ignored).
- ``diffusers`` ``UNet2DConditionModel`` + ``ControlNetModel``, NCHW and channels-last, and with
  ``--compile`` also ``torch.compile``d (inductor, ``freezing=True``) in both layouts.
- ``ours (OpenVINO backend)``: copies of our two modules through the openvino backend exactly as
  ``load_models(compile="openvino")`` / ``CTRLNET_COMPILE=openvino`` runs them
  (:mod:`ctrlnet.runtime.openvino`: each module converted on its first call, or read from its
  cache, here under ``--openvino-cache``/ctrlnet), the hint encoder cached as in sampling; the
  one-time cost of the first call (conversion, or reading the cache) and of a second load of
  fresh copies (which reads the cache, as a new process would) are printed.
- ``openvino``: our two modules traced as one graph by ``openvino.convert_model`` and compiled
  for the CPU with the dtype as ``INFERENCE_PRECISION_HINT`` (only when ``openvino`` imports:
  ``pip install 'ctrlnet[openvino]'``).

Tolerances (max |difference| / max |output|): 1e-3 in fp32; 5e-2 in bf16 (8 mantissa bits through
~100 layers of random weights; ours vs diffusers differ in summation order only).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.config import get_preset
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.runtime.compile import COMPILE_OPTIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def _randomize(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5 if p.ndim > 1 else 0.02))


def _time_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call, alternating the candidates each round so load drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _Step(torch.nn.Module):
    """Our ControlNet + UNet as one module with fp32 inputs and output (the graph OpenVINO converts)."""

    def __init__(self, unet, cn, dtype):
        super().__init__()
        self.unet, self.cn, self.dtype = unet, cn, dtype

    def forward(self, x, t, ctx, hint):
        x, ctx, hint = x.to(self.dtype), ctx.to(self.dtype), hint.to(self.dtype)
        return self.unet(x, t, ctx, control=self.cn(x, hint, t, ctx)).float()


class _DiffusersStep(torch.nn.Module):
    def __init__(self, unet, cn):
        super().__init__()
        self.unet, self.cn = unet, cn

    def forward(self, x, t, ctx, hint):
        down, mid = self.cn(x, t, ctx, controlnet_cond=hint, return_dict=False)
        return self.unet(x, t, ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def _openvino_ir(unet, cn, inputs, folder) -> str:
    """Our fp32 modules traced by ``openvino.convert_model`` and saved as IR under ``folder`` (kept
    between runs: converting the full-size step takes minutes); returns the .xml path."""
    import openvino as ov

    path = folder / "step.xml"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            model = ov.convert_model(_Step(unet, cn, torch.float32).eval(), example_input=inputs)
        ov.save_model(model, str(path), compress_to_fp16=False)
        del model
    return str(path)


def _openvino_step(ir: str, inputs, dt):
    """The saved step compiled for the CPU with ``dt`` as its inference precision (fp32 in and out;
    converting bf16 modules directly gave NaN in OpenVINO 2026.4, the fp32 graph with a bf16 hint
    does not)."""
    import openvino as ov

    hint = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dt]
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    feeds = [i.float().numpy() if i.is_floating_point() else i.numpy() for i in inputs]

    def run():
        return torch.from_numpy(request.infer(feeds)[0].copy())

    return run, ov.__version__


def _compiled(label: str, modules, call, **options):
    """``call(*compiled modules)`` as a timed candidate; each module ``torch.compile``d on its own
    (the originals stay eager), compiled (on this first call) right now."""
    compiled = [torch.compile(m, **{**COMPILE_OPTIONS, **options}) for m in modules]
    t0 = time.perf_counter()
    with torch.inference_mode():
        call(*compiled)
    print(f"  {label}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    return torch.inference_mode()(lambda: call(*compiled))


def _backend_load(unet, cn, cache: Path, label: str):
    """Copies of ``unet`` and ``cn`` on the openvino backend (as ``load_models`` puts them there)
    and their first call, timed: wrapping (hashing the weights) and the first call (converting or
    reading the cache, compiling, running)."""
    from ctrlnet.runtime.openvino import use_openvino

    u, c = copy.deepcopy(unet), copy.deepcopy(cn)
    t0 = time.perf_counter()
    wrappers = use_openvino([u, c], cache_dir=cache)
    t1 = time.perf_counter()
    return u, c, wrappers, t1 - t0


def _first_call(label, call, wrappers, wrap_s):
    t0 = time.perf_counter()
    with torch.inference_mode():
        call()
    total = time.perf_counter() - t0
    conv = sum(w.stats["converted"] for w in wrappers)
    read = sum(w.stats["loaded"] for w in wrappers)
    print(f"  {label}: weights hashed in {wrap_s:.1f} s; first call {total:.1f} s "
          f"({conv} graphs converted in {sum(w.stats['convert_s'] for w in wrappers):.1f} s, "
          f"{read} read from the cache and compiled in {sum(w.stats['load_s'] for w in wrappers):.1f} s); "
          f"process memory now: {_memory()}", flush=True)


def _memory() -> str:
    """Resident memory of this process (Linux): anonymous (ours) and file-backed (mapped files,
    which the system can drop and read again)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    except OSError:
        return "unknown"
    gib = {k: int(fields[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile") if k in fields}
    return ", ".join(f"{k[3:].lower()} {v:.1f} GiB" for k, v in gib.items()) or "unknown"


def _profile(fn, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))


def main() -> None:
    import diffusers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--preset", default="sd15", help="model architecture (tiny-sd1: a quick smoke run)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="rows per step (2 = one image with CFG)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="add torch.compile'd ours and diffusers (slow to compile: minutes each at full size)")
    ap.add_argument("--compile-frozen", action="store_true",
                    help="with --compile, also ours compiled with inductor freezing (one more compilation)")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--openvino-cache", type=Path, default=Path(tempfile.gettempdir()) / "ctrlnet-step-openvino",
                    help="where the converted step is kept between runs (per preset, size and batch)")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print our step's top N ops")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)

    cfg = get_preset(args.preset)
    unet = UNetModel(**cfg.unet.kwargs()).eval()
    cn = ControlNet(**cfg.controlnet.kwargs()).eval()
    _randomize(unet, 1)
    _randomize(cn, 2)
    d_unet = d_cn = None
    if not args.no_diffusers:
        up, cp = unet.config_params(), cn.config_params()
        cfg_u = {k: v for k, v in du.diffusers_config(up).items() if not k.startswith("_")}
        cfg_c = {k: v for k, v in du.diffusers_config(cp, "controlnet").items() if not k.startswith("_")}
        d_unet, d_cn = diffusers.UNet2DConditionModel(**cfg_u).eval(), diffusers.ControlNetModel(**cfg_c).eval()
        d_unet.load_state_dict(du.to_diffusers(unet.state_dict(), up))
        d_cn.load_state_dict(du.to_diffusers(cn.state_dict(), cp, "controlnet"))
    try:
        import openvino  # noqa: F401

        have_ov = not args.no_openvino
    except ImportError:
        have_ov = False

    b, lat = args.batch, args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, lat, lat, generator=g)
    hint = torch.rand(b, 3, args.size, args.size, generator=g)
    ctx = torch.randn(b, 77, cfg.unet.context_dim, generator=g)
    ts = torch.tensor([500] * b)

    ir = None
    if have_ov:
        t0 = time.perf_counter()
        folder = args.openvino_cache / f"{args.preset}-{args.size}-b{args.batch}"
        ir = _openvino_ir(unet, cn, (x, ts, ctx, hint), folder)
        print(f"openvino: step graph at {ir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{args.preset} UNet + ControlNet, {args.size}x{args.size}, batch {b}, device {dev}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, threads {torch.get_num_threads()}", flush=True)
    cl = torch.channels_last
    for name in args.dtypes:
        dt = DTYPES[name]
        # channels-last weights, as load_models stores them on CPU and CUDA
        for m in (unet, cn):
            m.to(dev, dt, memory_format=cl)
        print(f"  {name}: process memory with our modules: {_memory()}", flush=True)
        xs, hs, cs = x.to(dev, dt), hint.to(dev, dt), ctx.to(dev, dt)
        t = ts.to(dev)
        xs_cl, hs_cl = xs.contiguous(memory_format=cl), hs.contiguous(memory_format=cl)
        with torch.inference_mode():
            guided = cn.encode_hint(hs_cl, dt)

        cands = {}

        @torch.inference_mode()
        def ours():
            return unet(xs_cl, t, cs, control=cn(xs_cl, hs_cl, t, cs))

        @torch.inference_mode()
        def ours_cached():
            return unet(xs_cl, t, cs, control=cn(xs_cl, hs_cl, t, cs, guided_hint=guided))

        cands.update({"ours": ours, "ours, cached hint": ours_cached})
        if args.compile:
            # as load_models compiles them (each module on its own) and the Denoiser calls them
            for label, opts in {"ours compiled": {}, "ours compiled, frozen": {"options": {"freezing": True}}}.items():
                if label.endswith("frozen") and not args.compile_frozen:
                    continue
                cands[label] = _compiled(label, (unet, cn), lambda u, c: u(
                    xs_cl, t, cs, control=c(xs_cl, None, t, cs, guided_hint=guided)), **opts)
        if d_unet is not None:
            for m in (d_unet, d_cn):
                m.to(dev, dt)
            step = _DiffusersStep(d_unet, d_cn).eval()
            cands["diffusers"] = torch.inference_mode()(lambda: step(xs, t, cs, hs))
            cands["diffusers channels-last"] = torch.inference_mode()(lambda: step(xs_cl, t, cs, hs_cl))
            if args.compile:
                for label, (xi, hi) in {"diffusers compiled": (xs, hs),
                                        "diffusers channels-last compiled": (xs_cl, hs_cl)}.items():
                    cands[label] = _compiled(label, [_DiffusersStep(d_unet, d_cn).eval()],
                                             lambda c, xi=xi, hi=hi: c(xi, t, cs, hi), options={"freezing": True})
        if have_ov:
            cache = args.openvino_cache / "ctrlnet"
            label = "ours (OpenVINO backend)"
            for attempt in ("first load", "second load"):
                ou = oc = wrappers = ov_call = None  # the first load's copies and graphs go first
                gc.collect()
                ou, oc, wrappers, wrap_s = _backend_load(unet, cn, cache, label)

                def ov_call(ou=ou, oc=oc):
                    return ou(xs_cl, t, cs, control=oc(xs_cl, None, t, cs, guided_hint=guided))

                _first_call(f"{label}, {attempt}", ov_call, wrappers, wrap_s)
            cands[label] = torch.inference_mode()(ov_call)
        if ir:
            t0 = time.perf_counter()
            run, ov_version = _openvino_step(ir, (x, ts, ctx, hint), dt)
            print(f"  openvino {ov_version}: compiled in {time.perf_counter() - t0:.0f} s; process memory now: "
                  f"{_memory()}", flush=True)
            cands["openvino"] = run

        ref = ours().float()
        scale = ref.abs().max().item()
        tol = TOLERANCE[dt]
        lines = []
        for label, fn in cands.items():
            diff = (fn().float() - ref).abs().max().item() / scale
            lines.append(f"    {label:<34} max|diff|/max|out| {diff:.1e}")
            if not diff <= tol:  # NaN fails too
                raise SystemExit(f"{name}: {label} does not match ours ({diff:.2e} > {tol:g})\n" + "\n".join(lines))
        print(f"{name}: all outputs match ours within {tol:g} of max|out| = {scale:.2f}\n" + "\n".join(lines),
              flush=True)
        if args.profile:
            _profile(ours_cached, args.profile)
        times = _time_interleaved(cands, args.repeats)
        peers = {k: v for k, v in times.items() if not k.startswith("ours")}
        best = min(peers, key=peers.get) if peers else None
        print(f"{name}: median s/step over {args.repeats} interleaved rounds")
        for label, s in times.items():
            line = f"    {label:<34} {s:7.3f} s"
            if best:
                line += f"   best peer / this = {peers[best] / s:.2f}"
            print(line)
        if best:
            print(f"  best peer: {best}; ours / best peer speed-up: {peers[best] / times['ours']:.2f}x "
                  f"(cached hint: {peers[best] / times['ours, cached hint']:.2f}x)", flush=True)
            fastest = min((k for k in times if k.startswith("ours")), key=times.get)
            print(f"  fastest of ours: {fastest}; its speed-up over the best peer: {peers[best] / times[fastest]:.2f}x",
                  flush=True)
        cands = step = run = ov_call = ou = oc = None


if __name__ == "__main__":
    main()
