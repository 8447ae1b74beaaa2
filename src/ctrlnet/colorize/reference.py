"""Reference-based colorization of one grayscale image, through :func:`ctrlnet.pipeline.generate`.

The gray image (Lab lightness) is the hint; the colour reference is VAE-encoded by the pipeline
(``ControlSpec.reference``) and reaches the :class:`ReferenceControlNet` as ``latent_cond``. The
result keeps the input's lightness exactly (:func:`~ctrlnet.colorize.lab.merge_luminance`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from ctrlnet.colorize.lab import merge_luminance, to_gray
from ctrlnet.colorize.reference_model import ReferenceControlNet, load_reference_controlnet, load_reference_vae
from ctrlnet.image import HWC3
from ctrlnet.pipeline import ControlSpec, GenerationRequest, Models, demo_dir, generate, load_models, place_vae

COLORIZER_FILE = "colorize_reference.safetensors"  # shipped next to the demo base
COLORIZER = "colorizer"  # its key in Models.controlnets


@dataclass
class ColorizeOptions:
    """Sampling settings. Guidance 1 (no classifier-free guidance): the colorizer is steered by
    the reference, not by a prompt, and one branch halves the cost."""

    prompt: str = ""
    resolution: int | None = None  # short side; None: the model's native size
    steps: int | None = None  # None: the colorizer file's default (20 for the shipped one)
    guidance_scale: float | None = None  # None: the colorizer file's default (1.0 for the shipped one)
    seed: int = 0  # one seed for every frame of a video: steadier colours
    strength: float = 1.0
    sampler: str = "ddim"
    keep_luminance: bool = True


# When neither the options nor the colorizer file say: one DDIM pass of 20 steps, no CFG.
FALLBACK_STEPS, FALLBACK_GUIDANCE = 20, 1.0


def colorizer_defaults(models: Models) -> dict:
    """The sampling defaults of the loaded colorizer (its file's ``ctrlnet_defaults``; see
    :func:`add_colorizer`), ``{}`` when none is loaded or it carries none."""
    net = models.controlnets.get(COLORIZER)
    return dict(getattr(net, "sampling_defaults", {}) or {})


def native_resolution(models: Models) -> int:
    """The size the base model was trained at: the base file's default, else the colorizer's,
    else 128 for the demo architecture and 512 otherwise."""
    for d in (models.defaults, colorizer_defaults(models)):
        if "resolution" in d:
            return int(d["resolution"])
    return 128 if models.config.name == "demo" else 512


def default_colorizer() -> Path:
    return demo_dir() / COLORIZER_FILE


def random_colorizer(models: Models, seed: str = "colorizer") -> ReferenceControlNet:
    """A reference ControlNet on ``models``' UNet with random zero convs and reference weights
    (so it acts); for tests and smoke runs."""
    # the layers from_unet does not copy take torch's default init: seeded here, so the net is the same
    # whatever the global RNG went through (two processes of a batch job must build the same one)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(seed.encode()))
        net = ReferenceControlNet.from_unet(models.base.unet)
    g = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")):
                p.normal_(0, 0.05, generator=g)
        w = net.input_blocks[0][0].weight
        w[:, net.latent_channels:].normal_(0, 0.05, generator=g)
    return net.eval()


def add_colorizer(models: Models, colorizer: str | Path | None = None) -> Models:
    """Load the reference colorizer into ``models.controlnets["colorizer"]`` (on their device).

    ``colorizer``: a file we wrote, ``None`` for the shipped one, or ``"random"``. A file that
    carries its own autoencoder replaces ``models.base.vae`` with it (a new module: the old one,
    wherever else it is used, is left as it was).
    """
    from ctrlnet.checkpoints.defaults import LEGACY_COLORIZER_DEFAULTS, read_defaults

    if colorizer == "random":
        net = random_colorizer(models)
        net.sampling_defaults = {}
    else:
        path = Path(colorizer) if colorizer is not None else default_colorizer()
        if colorizer is None and not path.is_file():
            raise FileNotFoundError(
                f"the shipped colorizer is not built yet ({path} is missing); train it with "
                "`python -m ctrlnet.colorize.recipe build runs/colorize --resume`, or pass --colorizer PATH")
        net = load_reference_controlnet(path, base=models.config)
        vae = load_reference_vae(path, models.config)
        if vae is not None:
            models.base = replace(models.base, vae=place_vae(models, vae))
        # steps/guidance suit the colorizer, not the base's text prompts: kept on the net itself
        net.sampling_defaults = read_defaults(path) or (LEGACY_COLORIZER_DEFAULTS if colorizer is None else {})
    models.controlnets[COLORIZER] = net.to(device=models.device, dtype=models.dtype).eval()
    return models


def load_colorizer_models(base: str | None = None, colorizer: str | Path | None = None, device="auto",
                          dtype="auto", low_vram: bool = False) -> Models:
    """The base model (default: the embedded demo) plus the reference colorizer."""
    models = load_models(base, controlnets={}, device=device, dtype=dtype, low_vram=low_vram)
    models.controlnets.clear()  # the demo's own ControlNet is not used here
    return add_colorizer(models, colorizer)


def colorize_image(models: Models, gray: np.ndarray, reference: np.ndarray,
                   options: ColorizeOptions = ColorizeOptions(), progress=None) -> np.ndarray:
    """Colour ``gray`` (any RGB/gray uint8; only its lightness is used) after ``reference``.

    Returns (H, W, 3) uint8 at ``gray``'s size; with ``keep_luminance`` its Lab lightness equals
    the input's within one level.
    """
    d = colorizer_defaults(models)
    steps = options.steps if options.steps is not None else d.get("steps", FALLBACK_STEPS)
    guidance = options.guidance_scale if options.guidance_scale is not None else d.get("guidance_scale",
                                                                                      FALLBACK_GUIDANCE)
    src = HWC3(np.asarray(gray))
    hint = to_gray(src)  # (H, W, 3): the lightness as a gray image, as in training
    h, w = src.shape[:2]
    req = GenerationRequest(
        prompt=options.prompt, added_prompt="", negative_prompt="",
        controls=[ControlSpec(image=hint, model=COLORIZER, reference=np.asarray(reference),
                              strength=options.strength)],
        resolution=options.resolution or native_resolution(models), steps=steps,
        guidance_scale=guidance, seed=options.seed, sampler=options.sampler,
    )
    out = generate(models, req, progress=progress).images[0]
    if options.keep_luminance:
        return merge_luminance(out, src)
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC)
