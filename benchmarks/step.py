"""One denoising step of full-size SD1.5 UNet + ControlNet (random weights), ours vs diffusers.

Run by hand:  python benchmarks/step.py [--dtypes fp32 bf16] [--size 512] [--batch 2] [--repeats 3]

Both sides get the same weights (ours converted to diffusers keys) and the same inputs; the
script checks the outputs match before it reports any time, then prints median seconds per step
and the ratio diffusers / ours (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.config import SD15
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel


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
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    import diffusers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)

    unet = UNetModel(**SD15.unet.kwargs()).eval()
    cn = ControlNet(**SD15.controlnet.kwargs()).eval()
    _randomize(unet, 1)
    _randomize(cn, 2)
    up, cp = unet.config_params(), cn.config_params()
    d_unet = diffusers.UNet2DConditionModel(**{k: v for k, v in du.diffusers_config(up).items() if not k.startswith("_")})
    d_cn = diffusers.ControlNetModel(**{k: v for k, v in du.diffusers_config(cp, "controlnet").items() if not k.startswith("_")})
    d_unet.load_state_dict(du.to_diffusers(unet.state_dict(), up))
    d_cn.load_state_dict(du.to_diffusers(cn.state_dict(), cp, "controlnet"))
    d_unet.eval()
    d_cn.eval()

    b, lat = args.batch, args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, lat, lat, generator=g)
    hint = torch.rand(b, 3, args.size, args.size, generator=g)
    ctx = torch.randn(b, 77, 768, generator=g)
    t = torch.tensor([500] * b)

    print(f"SD1.5 UNet + ControlNet, {args.size}x{args.size}, batch {b}, device {dev}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    for name in args.dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        for m in (unet, cn, d_unet, d_cn):
            m.to(dev, dt)
        xs, hs, cs, ts = x.to(dev, dt), hint.to(dev, dt), ctx.to(dev, dt), t.to(dev)

        @torch.inference_mode()
        def ours():
            return unet(xs, ts, cs, control=cn(xs, hs, ts, cs))

        @torch.inference_mode()
        def theirs():
            down, mid = d_cn(xs, ts, cs, controlnet_cond=hs, return_dict=False)
            return d_unet(xs, ts, cs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        a, bb = ours().float(), theirs().float()
        diff = (a - bb).abs().max().item()
        scale = bb.abs().max().item()
        tol = 1e-3 if dt == torch.float32 else 0.1
        status = "match" if diff <= tol * max(1.0, scale) else "MISMATCH"
        xs_cl = xs.contiguous(memory_format=torch.channels_last)
        hs_cl = hs.contiguous(memory_format=torch.channels_last)
        unet_cl, cn_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last), copy.deepcopy(cn).to(
            memory_format=torch.channels_last)

        @torch.inference_mode()
        def ours_cl():
            # the channels-last layout the pipeline uses on CPU and CUDA (load_models(channels_last=None))
            return unet_cl(xs_cl, ts, cs, control=cn_cl(xs_cl, hs_cl, ts, cs))

        diff_cl = (ours_cl().float() - bb).abs().max().item()
        # (not `t`: that name holds the timestep tensor the next dtype's loop reuses)
        times = _time_interleaved({"ours": ours, "cl": ours_cl, "diffusers": theirs}, args.repeats)
        t_ours, t_cl, t_theirs = times["ours"], times["cl"], times["diffusers"]
        unet_cl = cn_cl = None  # free the copies before the next dtype
        print(f"{name}: outputs {status} (max abs diff {diff:.2e}, channels-last {diff_cl:.2e}, output max {scale:.2f})\n"
              f"  ours {t_ours:.3f} s/step, ours channels-last {t_cl:.3f} s/step, diffusers {t_theirs:.3f} s/step\n"
              f"  ratio diffusers/ours = {t_theirs / t_ours:.3f}, diffusers/ours-channels-last = {t_theirs / t_cl:.3f}")


if __name__ == "__main__":
    main()
