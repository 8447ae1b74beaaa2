"""``ctrlnet convert``: single file <-> diffusers folder, and to fp16 safetensors."""

from __future__ import annotations

import argparse


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert model files (single file <-> diffusers folder, fp16 safetensors)",
        description="Convert a Stable Diffusion base model or a ControlNet between the original single-file "
                    "layout (.safetensors/.ckpt/.pth, as A1111 and ComfyUI use) and the diffusers folder "
                    "layout, optionally to fp16 (half the size). The output kind follows the output name: "
                    "*.safetensors / *.ckpt / *.pth = single file, anything else = diffusers folder.",
        epilog="examples:\n"
               "  ctrlnet convert control_v11p_sd15_canny.pth canny_fp16.safetensors --dtype fp16\n"
               "  ctrlnet convert v1-5-pruned-emaonly.safetensors sd15-diffusers/\n"
               "  ctrlnet convert sd15-diffusers/ sd15.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="model file or diffusers folder")
    p.add_argument("output", help="output file (.safetensors, .ckpt, .pth) or folder")
    p.add_argument("--to", choices=["single", "diffusers"], default=None,
                   help="output layout (default: from the output name)")
    p.add_argument("--part", choices=["auto", "base", "controlnet", "all"], default="auto",
                   help="what to take from a file holding both (control_sd15_*.pth): default the ControlNet; "
                        "'all' writes a diffusers ControlNet pipeline of both")
    p.add_argument("--dtype", choices=["keep", "fp16", "bf16", "fp32"], default="keep",
                   help="cast the weights (fp16 halves the size); keep (default) = the source's dtype")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="add a ControlNet to a base converted to a diffusers folder (repeatable): the folder "
                        "becomes a StableDiffusionControlNetPipeline")
    p.add_argument("--base", default=None,
                   help="the base model a ControlNet belongs to (checked for fit; gives head counts of custom models)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from pathlib import Path

    import torch

    from ctrlnet.checkpoints.convert import convert

    out = Path(args.output)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    dtype = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    res = convert(args.input, out, to=args.to, part=args.part, dtype=dtype, base_config_from=args.base,
                  controlnets=args.controlnet)
    print(f"wrote {res.part} ({res.tensors} tensors, {res.dtype}, {res.layout} layout) to {res.path}")
    return 0
