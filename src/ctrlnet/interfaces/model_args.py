"""The model options every serving command shares (--base, --controlnet, --device, ...)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ctrlnet.runtime.compile import BACKENDS

BASE_HELP = ("base model: a checkpoint file (.safetensors/.ckpt), a diffusers folder, 'demo' (the small "
             "embedded model, the default), or random:<preset> (random weights, for smoke tests)")
CONTROLNET_HELP = ("ControlNet weights, repeatable; NAME=PATH names it (default name: the file's stem). "
                   "With no --base and no --controlnet the embedded demo ControlNet is used")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Add --base/--controlnet/--device/--dtype/--low-vram/--parameterization to a subcommand."""
    g = p.add_argument_group("model")
    g.add_argument("--base", default=None, help=BASE_HELP)
    g.add_argument("--controlnet", action="append", default=[], metavar="[NAME=]PATH", help=CONTROLNET_HELP)
    g.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on GPU; bf16 on CPUs with native bf16, "
                   "else fp32; $CTRLNET_DTYPE replaces auto), fp32, fp16, bf16")
    g.add_argument("--low-vram", action="store_true", help="keep only the stage in use on the GPU")
    g.add_argument("--parameterization", choices=["eps", "v"], default=None,
                   help="override the prediction type (SD2 768-v checkpoints: v)")
    g.add_argument("--vae", default=None, metavar="FILE",
                   help="a VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or diffusers VAE folder that "
                        "replaces the base model's VAE")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, choices=BACKENDS, metavar="BACKEND",
                   help="compile the UNet and ControlNets: inductor (the default: torch.compile; minutes on a CPU "
                        "per image size) or openvino (CPU only, ~1.3x faster steps; minutes on the first use, then "
                        "cached on disk; pip install 'ctrlnet[openvino]'); $CTRLNET_COMPILE=inductor|openvino "
                        "does the same")


def name_controlnets(specs) -> dict[str, str]:
    """``[NAME=]PATH`` strings -> ``{name: spec}``; names default to the file stem (``random:x`` -> ``x``)."""
    named: dict[str, str] = {}
    for s in specs:
        s = str(s)
        if "=" in s and not s.startswith("random:") and not Path(s).exists():
            name, spec = s.split("=", 1)
        elif s.startswith("random:"):
            name, spec = s.split(":", 1)[1], s
        else:
            name, spec = Path(s).stem, s
        while name in named:
            name += "_"
        named[name] = spec
    return named


@dataclass
class LoadedModels:
    """Models plus the specs they came from (recorded in output PNGs)."""

    models: object  # ctrlnet.pipeline.Models
    base: str | None
    controlnets: dict[str, str]
    vae: str | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.models.dtype).replace("torch.", "")


def resolve_name(spec: str | None) -> str | None:
    """``spec`` as given when it is a path that exists (or ``demo``, ``random:...``, None); a name
    from ``ctrlnet models list`` (``sd15``, ``control_v11p_sd15_canny``) -> that model's local file
    (the search folders, then the Hugging Face cache; never the network). Raises
    :class:`~ctrlnet.hub.MissingModelError` for a named model that is not here, saying how to get
    it, and ValueError for a bare word that is neither a file nor a model name (with close names)."""
    if spec is None or spec == "demo" or str(spec).startswith("random:") or Path(spec).expanduser().exists():
        return spec
    from ctrlnet import hub

    try:
        hub.get_model(str(spec))
    except KeyError as e:
        if any(c in str(spec) for c in "/\\") or Path(spec).suffix:
            return spec  # a path that is not there: the loader names it
        raise ValueError(f"{spec!r} is neither a file nor a model name: {e.args[0]}") from None
    return str(hub.resolve(str(spec)))


def load_named(base: str | None, controlnets: dict[str, str], device="auto", dtype="auto", low_vram=False,
               parameterization=None, vae: str | None = None, embeddings=(), lora_dirs=(),
               compile: bool | str | None = None) -> LoadedModels:
    """Load models by spec (paths, or names from ``ctrlnet models list``: :func:`resolve_name`) and
    remember the specs (paths absolute)."""
    from ctrlnet.interfaces.outputs import model_spec
    from ctrlnet.pipeline import DEMO_CONTROL, demo_dir, load_models

    base, vae = resolve_name(base), resolve_name(vae)
    controlnets = {k: resolve_name(v) for k, v in controlnets.items()}

    models = load_models(base, dict(controlnets), device=device, dtype=dtype, low_vram=low_vram,
                         parameterization=parameterization, vae=vae, embeddings=embeddings, lora_dirs=lora_dirs,
                         compile=compile)
    specs = {k: model_spec(v) for k, v in controlnets.items()}
    if not specs and "demo" in models.controlnets and base in (None, "demo"):
        specs = {"demo": str(demo_dir() / DEMO_CONTROL)}
    return LoadedModels(models, model_spec(base), specs, model_spec(vae) if vae else None)


def load_from_args(args) -> LoadedModels:
    return load_named(args.base, name_controlnets(args.controlnet), args.device, args.dtype, args.low_vram,
                      args.parameterization, vae=getattr(args, "vae", None), compile=getattr(args, "compile", None))
