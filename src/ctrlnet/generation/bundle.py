"""The loaded models and where they run: :class:`Models`, :func:`load_models`, random test models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ctrlnet.checkpoints.load import BaseModels, load_base, load_controlnet
from ctrlnet.config import ModelConfig, get_preset
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL
from ctrlnet.runtime.compile import check_backend, compile_step, resolve_compile
from ctrlnet.runtime.device import resolve_device, resolve_dtype, use_channels_last, vae_dtype
from ctrlnet.sampling.schedule import DiscreteSchedule

# The prompts the original gradio apps add for the official SD1.5 ControlNets.
ORIGINAL_ADDED_PROMPT = "best quality, extremely detailed"
ORIGINAL_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
DEMO_BASE = "demo_base.safetensors"  # names written by ctrlnet.training.demo ship
DEMO_CONTROL = "demo_control_fill50k.safetensors"


@dataclass
class Models:
    """Loaded weights plus where they run."""

    base: BaseModels
    controlnets: dict[str, ControlNet]
    device: torch.device
    dtype: torch.dtype
    low_vram: bool = False
    # default added/negative prompts, and resolution/steps/guidance_scale/vocabulary from the files
    defaults: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)  # textual inversion: name -> Embedding (A1111 embeddings/)
    lora_dirs: list[Path] = field(default_factory=list)  # where <lora:NAME> and loras=[(NAME, w)] are looked up

    LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")

    def find_lora(self, name: str, allow_paths: bool = True) -> Path:
        """A LoRA by name (``NAME`` + a LoRA suffix in one of ``lora_dirs``, A1111's ``models/Lora``
        lookup) or, for trusted callers, by path. Raises FileNotFoundError naming where it looked."""
        if not allow_paths and (Path(name).name != name or name.startswith(".")):
            raise FileNotFoundError(f"LoRA {name!r} not found: LoRAs are named, not given by path")
        for d in self.lora_dirs:
            for suffix in ("", *self.LORA_SUFFIXES):
                p = Path(d) / f"{name}{suffix}"
                if p.is_file() and p.resolve().parent == Path(d).resolve():
                    return p
        if allow_paths and Path(name).expanduser().is_file():
            return Path(name).expanduser()
        where = ", ".join(str(d) for d in self.lora_dirs) or "no LoRA folder given (--lora-dir)"
        raise FileNotFoundError(f"LoRA {name!r} not found (looked in: {where})")

    @property
    def config(self) -> ModelConfig:
        return self.base.config

    @property
    def schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule(self.base.config.schedule)


def demo_dir() -> Path:
    return Path(str(resources.files("ctrlnet") / "assets" / "demo"))


def file_defaults(base: str | None, controlnets: dict[str, str]) -> dict:
    """Sampling defaults (resolution, steps, guidance_scale, vocabulary) stored in the model files
    (:mod:`ctrlnet.checkpoints.defaults`); the embedded demo's files shipped before they carried
    any get the settings they were trained and measured at. ``random:...`` ControlNets add nothing."""
    from ctrlnet.checkpoints.defaults import LEGACY_DEMO_DEFAULTS, model_defaults

    embedded = base in (None, "demo")
    nets = [p for p in controlnets.values() if not str(p).startswith("random:")]
    return model_defaults(demo_dir() / DEMO_BASE if embedded else base, nets,
                          legacy=LEGACY_DEMO_DEFAULTS if embedded else None)


def random_base(preset: str, seed: int = 0) -> BaseModels:
    """Random-weight models of a preset's architecture (for tests and smoke runs; images are noise)."""
    cfg = get_preset(preset)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # default inits (biases) must not depend on global state
        torch.manual_seed(seed)
        unet = UNetModel(**cfg.unet.kwargs())
        vae = AutoencoderKL(**cfg.vae.kwargs())
        text = build_text_encoder(cfg.text, device="cpu")
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.5 / max(1.0, p[0].numel() ** 0.5), generator=g)
        m.eval()
    return BaseModels(cfg, unet, vae, text, f"random:{preset}")


def random_controlnet(unet: UNetModel, name: str) -> ControlNet:
    """A ControlNet copied from ``unet`` whose zero convs are random (so it acts), seeded by name."""
    import zlib

    seed = zlib.crc32(name.encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNet.from_unet(unet).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")):
                p.normal_(0, 0.05, generator=g)
    return net


def _load_base_spec(spec: str | None, dtype: torch.dtype, parameterization: str | None,
                    vae_dtype: torch.dtype, memory_format: torch.memory_format | None) -> BaseModels:
    if spec is None or spec == "demo":
        path = demo_dir() / DEMO_BASE
        if not path.is_file():
            raise FileNotFoundError(
                f"the embedded demo model is not built yet ({path} is missing); build it with "
                "`python -m ctrlnet.training.demo build`, or pass --base random:tiny-sd1 / a checkpoint path"
            )
        return load_base(path, dtype=dtype, vae_dtype=vae_dtype, memory_format=memory_format)
    if spec.startswith("random:"):
        return random_base(spec.split(":", 1)[1])
    return load_base(spec, parameterization=parameterization, dtype=dtype, vae_dtype=vae_dtype,
                     memory_format=memory_format)


def load_models(base: str | None = None, controlnets: Sequence[str] | dict[str, str] = (), device="auto",
                dtype="auto", low_vram: bool = False, parameterization: str | None = None,
                channels_last: bool | None = None, vae: str | None = None,
                embeddings: Sequence[str] = (), lora_dirs: Sequence[str] = (), compile: bool | str | None = None) -> Models:
    """Load a base model and ControlNets by path (or ``"demo"``, ``"random:<preset>"``).

    ``base=None`` is the embedded demo model, with its ControlNet when ``controlnets`` is empty.
    A diffusers pipeline folder as ``base`` brings its ``controlnet/`` (``controlnet_1``, ...) when
    no ControlNet is given. ``vae``: a VAE file or folder that replaces the base's VAE.
    ``embeddings``: textual-inversion files or folders, called by file name in prompts.
    ``lora_dirs``: folders where LoRAs are found by name (``<lora:NAME:W>`` in a prompt).
    ``low_vram`` keeps weights on the CPU and moves one stage at a time to the accelerator.
    ``channels_last`` (default: on for CPU and CUDA) stores the UNet and ControlNets channels-last.
    ``compile`` (default: ``$CTRLNET_COMPILE``, off) compiles the UNet and ControlNets:
    ``True`` or ``"inductor"`` with ``torch.compile`` (minutes per new image size on a CPU),
    ``"openvino"`` with OpenVINO on the CPU (minutes for the first call of each call structure,
    then cached on disk; :mod:`ctrlnet.runtime.openvino`); the same images within bf16/fp32
    rounding (:mod:`ctrlnet.runtime.compile`). Raised before anything loads: ValueError with
    ``low_vram``, whose moves between devices would defeat it, or for an unknown backend;
    :class:`~ctrlnet.runtime.openvino.OpenVINOError` (a ValueError) for openvino without the
    package or off the CPU.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    compiled = resolve_compile(compile)
    if compiled and low_vram:
        raise ValueError("compile and low_vram do not go together: low_vram moves the compiled modules "
                         "between devices for every stage; choose one")
    check_backend(compiled, dev)
    # Weights are made in their final dtype and layout as they are read, never first in fp32 (a
    # full-size fp16 file would otherwise peak at the fp32 models plus the casts).
    fmt = torch.channels_last if use_channels_last(dev, channels_last) else None
    b = _load_base_spec(base, dt, parameterization, vae_dtype(dt), fmt)
    if vae:
        from ctrlnet.checkpoints.vae_file import load_vae

        b.vae = load_vae(vae, b.config.vae, dtype=vae_dtype(dt))
    if isinstance(controlnets, dict):
        named = dict(controlnets)
    else:
        named = {}
        for p in controlnets:
            key = str(p).split(":", 1)[1] if str(p).startswith("random:") else Path(p).stem
            while key in named:  # two files with one stem
                key += "_"
            named[key] = p
    if base in (None, "demo") and not named and (demo_dir() / DEMO_CONTROL).is_file():
        named = {"demo": str(demo_dir() / DEMO_CONTROL)}
    if not named and base is not None and not str(base).startswith("random:") and Path(base).is_dir():
        from ctrlnet.checkpoints.diffusers_folder import pipeline_controlnets

        named = {k: str(v) for k, v in pipeline_controlnets(Path(base)).items()}
    nets: dict[str, ControlNet] = {}
    for name, p in named.items():
        if str(p).startswith("random:"):
            net = random_controlnet(b.unet, name)
        else:
            net = load_controlnet(p, base=b.config, base_unet=b.unet, dtype=dt, memory_format=fmt)
            # the v1.1 shuffle model pools its residuals (its yaml's global_average_pooling; ComfyUI
            # and sd-webui-controlnet recognise it by name too)
            net.global_average_pooling = "shuffle" in Path(str(p)).name.lower()
        nets[name] = net
    defaults = {}
    if b.config.name.startswith(("sd15", "checkpoint:", "diffusers:")) and b.config.unet.context_dim in (768, 1024):
        defaults = {"added_prompt": ORIGINAL_ADDED_PROMPT, "negative_prompt": ORIGINAL_NEGATIVE_PROMPT}
    defaults.update(file_defaults(base, named))  # resolution, steps, guidance the files carry
    models = Models(b, nets, dev, dt, low_vram, defaults, lora_dirs=[Path(d) for d in lora_dirs])
    if embeddings:
        from ctrlnet.generation.embeddings import load_embeddings

        models.embeddings = load_embeddings(list(embeddings))
    # loaded modules are in place already (these are no-ops for them); random and demo ones are not
    for m in (models.base.unet, models.base.text_encoder, *models.controlnets.values()):
        m.to(dtype=dt)
        if not low_vram:
            m.to(dev)
    if fmt is not None:
        for m in (models.base.unet, *models.controlnets.values()):
            m.to(memory_format=fmt)
    place_vae(models, models.base.vae)
    if compiled:
        compile_step([models.base.unet, *models.controlnets.values()], compiled)
    return models


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in beside models in ``dtype``: fp32 where the rest is fp16 (the
    VAE decoder overflows in fp16, as SD1.x VAEs are known to), else the same."""
    return torch.float32 if dtype == torch.float16 else dtype


def place_vae(models: Models, vae: AutoencoderKL) -> AutoencoderKL:
    """Put ``vae`` in the dtype (:func:`vae_dtype`) and on the device ``models`` run it with (on
    the CPU with low_vram)."""
    vae.to(dtype=vae_dtype(models.dtype))
    return vae if models.low_vram else vae.to(models.device)

