"""One entry point for every caller: ``load_models()`` once, then ``generate(models, request)``.

The CLI, web UI, HTTP API, colorization and training previews all call :func:`generate`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch

from ctrlnet.checkpoints.load import BaseModels, load_base, load_controlnet
from ctrlnet.config import ModelConfig, get_preset
from ctrlnet.image import HWC3, ImageError, check_size, resize_image
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL
from ctrlnet.runtime.device import offload, resolve_device, resolve_dtype, use_channels_last
from ctrlnet.sampling.denoiser import ControlInput, Denoiser
from ctrlnet.sampling.samplers import get_sampler
from ctrlnet.sampling.schedule import DiscreteSchedule, get_sigmas, vp_scale

# The prompts the original gradio apps add for the official SD1.5 ControlNets.
ORIGINAL_ADDED_PROMPT = "best quality, extremely detailed"
ORIGINAL_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
MAX_SEED = 2**32 - 1
DEMO_BASE = "demo_base.safetensors"  # names written by ctrlnet.training.demo ship
DEMO_CONTROL = "demo_control_fill50k.safetensors"

Progress = Callable[[int, int], None]


@dataclass
class ControlSpec:
    """One control: an image, how to turn it into a hint, and how strongly to follow it.

    ``annotator=None`` uses ``image`` as a ready-made control map; otherwise the registry
    annotator runs on the resized image with ``annotator_params``.
    """

    image: np.ndarray | None = None
    model: str | None = None  # key in Models.controlnets; None = the first one
    annotator: str | None = None
    annotator_params: dict = field(default_factory=dict)
    detect_resolution: int | None = None
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool | None = None  # None: the request's guess_mode
    reference: np.ndarray | None = None  # colour image VAE-encoded as the net's latent_cond (colorize)


@dataclass
class GenerationRequest:
    """Everything that decides the images. ``None`` prompts take the model's defaults."""

    prompt: str = ""
    added_prompt: str | None = None
    negative_prompt: str | None = None
    controls: list[ControlSpec] = field(default_factory=list)
    num_images: int = 1
    resolution: int = 512
    steps: int = 20
    guidance_scale: float = 9.0
    seed: int = -1
    eta: float = 0.0
    sampler: str = "ddim"
    schedule: str = "ddim"
    guess_mode: bool = False
    only_mid_control: bool = False
    clip_skip: int = 1
    prompt_chunks: int = 1  # at least this many 75-token windows (3: the anime line-art model)
    noise_device: str = "cpu"

    def validate(self, max_images: int = 12, max_resolution: int = 2048, max_steps: int = 1000) -> None:
        """Raise ValueError naming the first parameter out of range."""
        checks = [
            ("num_images", 1 <= self.num_images <= max_images, f"between 1 and {max_images}"),
            ("resolution", 64 <= self.resolution <= max_resolution, f"between 64 and {max_resolution}"),
            ("steps", 1 <= self.steps <= max_steps, f"between 1 and {max_steps}"),
            ("guidance_scale", 0.0 <= self.guidance_scale <= 50.0, "between 0 and 50"),
            ("eta", 0.0 <= self.eta <= 1.0, "between 0 and 1"),
            ("seed", -1 <= self.seed <= MAX_SEED, f"-1 (random) or between 0 and {MAX_SEED}"),
            ("clip_skip", self.clip_skip in (1, 2), "1 or 2"),
            ("prompt_chunks", 1 <= self.prompt_chunks <= 3, "between 1 and 3"),
        ]
        for name, ok, rng in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: must be {rng}")
        get_sampler(self.sampler)
        for i, c in enumerate(self.controls):
            if not 0.0 <= c.strength <= 2.0:
                raise ValueError(f"controls[{i}].strength={c.strength} is out of range: must be between 0 and 2")
            if not 0.0 <= c.start <= c.end <= 1.0:
                raise ValueError(f"controls[{i}]: need 0 <= start <= end <= 1, got {c.start}, {c.end}")

    def to_dict(self) -> dict:
        """JSON-friendly parameters (control images left out)."""
        d = asdict(self)
        d["controls"] = [{k: v for k, v in asdict(c).items() if k not in ("image", "reference")}
                         for c in self.controls]
        return d


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    control_maps: list[np.ndarray]  # the hints used, (H, W, C) uint8
    seed: int
    request: GenerationRequest  # with the seed actually used

    def parameters_text(self, model_name: str = "") -> str:
        """An A1111-style ``parameters`` string: prompt, negative prompt, settings."""
        r = self.request
        h, w = self.images[0].shape[:2]
        prompt = r.prompt + (f", {r.added_prompt}" if r.added_prompt else "")
        settings = [f"Steps: {r.steps}", f"Sampler: {r.sampler}", f"CFG scale: {r.guidance_scale}",
                    f"Seed: {self.seed}", f"Size: {w}x{h}", f"Eta: {r.eta}"]
        if model_name:
            settings.append(f"Model: {model_name}")
        for i, c in enumerate(r.controls):
            settings.append(f"ControlNet {i}: \"module: {c.annotator or 'none'}, model: {c.model or 'default'}, "
                            f"weight: {c.strength}, guidance start: {c.start}, guidance end: {c.end}, "
                            f"guess mode: {c.guess_mode if c.guess_mode is not None else r.guess_mode}\"")
        return f"{prompt}\nNegative prompt: {r.negative_prompt or ''}\n" + ", ".join(settings)


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
    any get the settings they were trained and measured at."""
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


def _load_base_spec(spec: str | None, dtype: torch.dtype, parameterization: str | None) -> BaseModels:
    if spec is None or spec == "demo":
        path = demo_dir() / DEMO_BASE
        if not path.is_file():
            raise FileNotFoundError(
                f"the embedded demo model is not built yet ({path} is missing); build it with "
                "`python -m ctrlnet.training.demo build`, or pass --base random:tiny-sd1 / a checkpoint path"
            )
        return load_base(path, dtype=dtype)
    if spec.startswith("random:"):
        return random_base(spec.split(":", 1)[1])
    return load_base(spec, parameterization=parameterization, dtype=dtype)


def load_models(base: str | None = None, controlnets: Sequence[str] | dict[str, str] = (), device="auto",
                dtype="auto", low_vram: bool = False, parameterization: str | None = None,
                channels_last: bool | None = None) -> Models:
    """Load a base model and ControlNets by path (or ``"demo"``, ``"random:<preset>"``).

    ``base=None`` is the embedded demo model, with its ControlNet when ``controlnets`` is empty.
    ``low_vram`` keeps weights on the CPU and moves one stage at a time to the accelerator.
    ``channels_last`` (default: on for CPU and CUDA) stores the UNet and ControlNets channels-last.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    b = _load_base_spec(base, torch.float32, parameterization)
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
    nets: dict[str, ControlNet] = {}
    for name, p in named.items():
        if str(p).startswith("random:"):
            net = random_controlnet(b.unet, name)
        else:
            net = load_controlnet(p, base=b.config)
        nets[name] = net
    defaults = {}
    if b.config.name.startswith(("sd15", "checkpoint:", "diffusers:")) and b.config.unet.context_dim in (768, 1024):
        defaults = {"added_prompt": ORIGINAL_ADDED_PROMPT, "negative_prompt": ORIGINAL_NEGATIVE_PROMPT}
    defaults.update(file_defaults(base, named))  # resolution, steps, guidance the files carry
    models = Models(b, nets, dev, dt, low_vram, defaults)
    for m in _all_modules(models):
        m.to(dtype=dt)
        if not low_vram:
            m.to(dev)
    if use_channels_last(dev, channels_last):
        for m in (models.base.unet, *models.controlnets.values()):
            m.to(memory_format=torch.channels_last)
    place_vae(models, models.base.vae)
    return models


def place_vae(models: Models, vae: AutoencoderKL) -> AutoencoderKL:
    """Put ``vae`` in the dtype and on the device ``models`` run it with: fp32 where the rest is
    fp16 (the VAE decoder overflows in fp16, as SD1.x VAEs are known to), on the CPU with low_vram."""
    vae.to(dtype=torch.float32 if models.dtype == torch.float16 else models.dtype)
    return vae if models.low_vram else vae.to(models.device)


def _all_modules(models: Models):
    return [models.base.unet, models.base.vae, models.base.text_encoder, *models.controlnets.values()]


def prepare_hint(spec: ControlSpec, resolution: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """The control map (H, W, C uint8) for one control, at the generation size.

    As the original apps: the input is resized so its short side is ``resolution`` with sides
    rounded to 64, the annotator runs (at ``detect_resolution`` if given), and the map is resized
    to the generation size.
    """
    if spec.image is None:
        raise ValueError("a control needs an image (a control map, or a picture to annotate)")
    img = HWC3(np.asarray(spec.image))
    check_size(*img.shape[:2])
    img = resize_image(img, resolution)
    h, w = img.shape[:2] if size is None else size
    if spec.annotator and spec.annotator != "none":
        from ctrlnet.annotators import run_annotator

        src = resize_image(img, spec.detect_resolution) if spec.detect_resolution else img
        cmap = run_annotator(spec.annotator, src, **spec.annotator_params)
    else:
        cmap = img
    if cmap.ndim == 2:
        cmap = cmap[:, :, None]
    if cmap.shape[:2] != (h, w):
        interp = cv2.INTER_NEAREST if spec.annotator in ("seg", "openpose", "openpose_hand", "mlsd") else cv2.INTER_LINEAR
        cmap = cv2.resize(cmap, (w, h), interpolation=interp)
        if cmap.ndim == 2:
            cmap = cmap[:, :, None]
    return cmap


def _hint_tensor(cmap: np.ndarray, channels: int) -> torch.Tensor:
    if cmap.shape[2] != channels:
        if channels == 3:
            cmap = HWC3(cmap)
        elif channels == 1:
            cmap = cmap[:, :, :1]
        else:
            raise ValueError(f"control map has {cmap.shape[2]} channels, the ControlNet expects {channels}")
    return torch.from_numpy(cmap.copy()).float().div(255.0).permute(2, 0, 1)[None]  # (1, C, H, W) in [0, 1]


def _encode_prompts(models: Models, cond: list[str], uncond: list[str], clip_skip: int, min_chunks: int = 1):
    te = models.base.text_encoder
    layer = "penultimate" if clip_skip == 2 else None
    k = max(min_chunks, te.chunk_ids(cond).shape[1], te.chunk_ids(uncond).shape[1])
    if k == 1:
        return te(cond, layer=layer), te(uncond, layer=layer)
    return (te.encode_chunked(cond, n_chunks=k, min_chunks=k, layer=layer),
            te.encode_chunked(uncond, n_chunks=k, min_chunks=k, layer=layer))


def encode_image(models: Models, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 image -> scaled VAE latents (1, C, H/f, W/f) of it resized to ``size`` = (H, W) (posterior mean)."""
    vae = models.base.vae
    img = cv2.resize(HWC3(np.asarray(image)), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    with offload([vae], models.device, models.low_vram), torch.no_grad():
        return vae.encode_latents(x.to(models.device, next(vae.parameters()).dtype)).float()


def decode_images(models: Models, latents: torch.Tensor) -> list[np.ndarray]:
    """Latents -> uint8 images, truncating as the original apps do."""
    vae = models.base.vae
    dev = models.device
    with offload([vae], dev, models.low_vram), torch.no_grad():
        x = vae.decode(latents.to(dev, next(vae.parameters()).dtype)).float()
    x = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
    return list(x)


def generate(models: Models, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
    """Generate ``request.num_images`` images; returns them with the control maps and seed used."""
    request.validate()
    seed = random.randint(0, MAX_SEED) if request.seed == -1 else request.seed
    req = replace(request, seed=seed)
    if req.added_prompt is None:
        req.added_prompt = models.defaults.get("added_prompt", "")
    if req.negative_prompt is None:
        req.negative_prompt = models.defaults.get("negative_prompt", "")
    dev, n = models.device, req.num_images

    # control maps: the first decides the size; the others are resized to it
    maps, controls, size = [], [], None
    for i, spec in enumerate(req.controls):
        name = spec.model or (next(iter(models.controlnets)) if models.controlnets else None)
        if name not in models.controlnets:
            known = ", ".join(models.controlnets) or "none loaded"
            raise ValueError(f"controls[{i}] asks for ControlNet {name!r}; loaded: {known}")
        try:
            cmap = prepare_hint(spec, req.resolution, size)
        except ImageError as e:
            raise ImageError(f"controls[{i}]: {e}") from None
        size = size or cmap.shape[:2]
        net = models.controlnets[name]
        maps.append(cmap)
        controls.append(ControlInput(
            net, _hint_tensor(cmap, net.hint_channels).to(dev), spec.strength, spec.start, spec.end,
            req.guess_mode if spec.guess_mode is None else spec.guess_mode,
            latent_cond=None if spec.reference is None else encode_image(models, spec.reference, size),
        ))
    if size is None:
        r = int(round(req.resolution / 64.0)) * 64
        size = (r, r)
    h, w = size
    down = models.base.vae.downscale
    prompt = req.prompt + (", " + req.added_prompt if req.added_prompt else "")
    with offload([models.base.text_encoder], dev, models.low_vram), torch.no_grad():
        cond, uncond = _encode_prompts(models, [prompt] * n, [req.negative_prompt] * n, req.clip_skip,
                                       req.prompt_chunks)
    schedule = models.schedule
    sigmas = get_sigmas(schedule, req.steps, req.schedule)
    gen = torch.Generator(device=req.noise_device).manual_seed(seed)
    shape = (n, models.base.unet.in_channels, h // down, w // down)
    noise = torch.randn(shape, generator=gen, device=req.noise_device)
    x = (noise / vp_scale(float(sigmas[0]))).to(dev, torch.float32)
    den = Denoiser(models.base.unet, schedule, cond.to(dev), uncond.to(dev), req.guidance_scale, controls,
                   req.only_mid_control, sigmas)
    total = len(sigmas) - 1

    def callback(info):
        if progress is not None:
            progress(info["i"] + 1, total)

    sampler = get_sampler(req.sampler)
    with offload([models.base.unet, *[c.net for c in controls]], dev, models.low_vram):
        x = sampler(den, x, sigmas, callback=callback, eta=req.eta, generator=gen)
    latents = x * vp_scale(float(sigmas[-1]))  # back to the model's scale at the last sigma
    images = decode_images(models, latents)
    return GenerationResult(images, maps, seed, req)


def result_metadata(result: GenerationResult, model_name: str = "") -> dict[str, str]:
    """PNG text chunks: A1111 ``parameters`` and our JSON ``ctrlnet``."""
    return {"parameters": result.parameters_text(model_name),
            "ctrlnet": json.dumps({"request": result.request.to_dict(), "model": model_name})}
