"""Resolve a request against the loaded models before any work: seeds, prompts, sizes of every
pass, the only-masked crop, the sigma lists; refuse what cannot run (size bound, missing nets)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from pathlib import Path

import numpy as np
import torch

from ctrlnet.generation.bundle import Models
from ctrlnet.generation.inpaint import crop_box
from ctrlnet.generation.preprocess import legacy_size, prepare_mask
from ctrlnet.generation.request import MAX_SEED, GenerationRequest
from ctrlnet.image import HWC3, ImageError, check_size
from ctrlnet.sampling.names import resolve_sampler
from ctrlnet.sampling.schedule import get_sigmas


@dataclass
class Plan:
    """``size``: (H, W) of the first pass; ``hires_size``: of the hires pass (None without one);
    ``out_size``: of the returned images (the original image's size with only-masked inpainting);
    ``box``: the only-masked crop (y0, y1, x0, x1) in the original image; ``legacy_resolution``:
    set when no width/height was given (maps are pre-scaled as the original apps do);
    ``unit_nets``: the ControlNet name of each unit."""

    request: GenerationRequest
    seeds: list[int]
    size: tuple[int, int]
    out_size: tuple[int, int]
    hires_size: tuple[int, int] | None
    box: tuple[int, int, int, int] | None
    legacy_resolution: int | None
    unit_nets: list[str]
    prompt: str = ""  # the prompt as encoded: <lora:...> tags removed, the added prompt appended
    loras: list[tuple[Path, float]] = field(default_factory=list)  # the request's, then the prompt's tags


    @property
    def total_steps(self) -> int:
        return self.pass_steps(False) + (self.pass_steps(True) if self.hires_size else 0)

    def strength(self, hires: bool) -> float:
        """Denoising strength of a pass (1 for txt2img)."""
        r = self.request
        if hires:
            return r.hires_denoising_strength
        return r.denoising_strength if r.init_image is not None else 1.0

    def sigmas(self, hires: bool, schedule) -> torch.Tensor:
        """The sigmas a pass walks: the whole schedule of its steps, without its first
        ``n - int(n * strength)`` (diffusers' ``get_timesteps``) when it starts from an image."""
        r = self.request
        steps = (r.hires_steps or r.steps) if hires else r.steps
        sigmas = get_sigmas(schedule, steps, resolve_sampler(r.sampler, r.schedule)[1])
        n = len(sigmas) - 1
        return sigmas[n - min(int(n * self.strength(hires)), n):]

    def pass_steps(self, hires: bool) -> int:
        r = self.request
        steps = (r.hires_steps or r.steps) if hires else r.steps
        return int(steps * self.strength(hires))  # for progress; the exact count comes from sigmas()


def _round8(x: float) -> int:
    return max(64, int(round(x / 8.0)) * 8)


def _check_pixels(what: str, size: tuple[int, int], limit: int) -> None:
    h, w = size
    if h * w > limit:
        raise ValueError(f"{what} would be {w}x{h} = {w * h} pixels, more than max_pixels={limit}; "
                         "lower the resolution, width/height or hires scale")


def plan_sizes(req: GenerationRequest, down: int = 8):
    """The sizes a request runs at, from the request alone (no models): ``(init, size, out_size,
    hires_size, box, legacy_resolution)`` as in :class:`Plan` (``init``: the init image as (H, W, 3)
    uint8, or None). ``down``: the VAE's downscale factor (8 for every SD model). Raises ValueError
    naming the cause for an empty only-masked mask, sides that are no multiple of ``down``, hires
    fix with a mask, or a pass larger than ``max_pixels``; so callers can refuse these before any
    model loads (``ctrlnet generate`` does)."""
    init = None
    if req.init_image is not None:
        init = HWC3(np.asarray(req.init_image))
        check_size(*init.shape[:2])
    box = None
    legacy = None
    if req.mask is not None and req.only_masked:
        full = prepare_mask(req.mask, init.shape[:2])
        aspect = req.width / req.height if req.width else None
        box = crop_box(full, req.only_masked_padding, aspect)
        if box is None:
            raise ValueError("the mask is empty: nothing to inpaint")
        out_size = init.shape[:2]
        if req.width:
            size = (req.height, req.width)
        else:
            legacy = req.resolution
            size = legacy_size(init[box[0]:box[1], box[2]:box[3]], req.resolution)
    elif req.width:
        size = out_size = (req.height, req.width)
    else:
        legacy = req.resolution
        first = init if init is not None else next((c.image for c in req.controls if c.image is not None), None)
        if first is not None:
            try:
                size = legacy_size(HWC3(np.asarray(first)), req.resolution)
            except ImageError as e:
                raise ImageError(f"{'init_image' if init is not None else 'controls[0]'}: {e}") from None
        else:
            r = int(round(req.resolution / 64.0)) * 64
            size = (r, r)
        out_size = size
    if size[0] % down or size[1] % down:
        raise ValueError(f"width and height must be multiples of {down} for this model, got {size[1]}x{size[0]}")
    hires = None
    if req.hires_scale > 1:
        if req.mask is not None:
            raise ValueError("hires fix is for txt2img and img2img; with a mask use only_masked instead")
        hires = (_round8(size[0] * req.hires_scale), _round8(size[1] * req.hires_scale))
        out_size = hires
    for what, s in (("the output", out_size), ("the first pass", size), ("the hires pass", hires)):
        if s is not None:
            _check_pixels(what, s, req.max_pixels)
    return init, size, out_size, hires, box, legacy


def make_plan(models: Models, request: GenerationRequest, allow_paths: bool = True) -> Plan:
    """Check ``request`` against ``models`` and fix everything a run needs. Raises ValueError (or
    :class:`~ctrlnet.image.ImageError`, FileNotFoundError for a LoRA) naming the cause; nothing
    heavy has run yet. ``allow_paths=False`` (untrusted callers) finds LoRAs only by name in
    ``models.lora_dirs``."""
    request.validate()
    seed = random.randint(0, MAX_SEED) if request.seed == -1 else request.seed
    req = replace(request, seed=seed)
    if req.added_prompt is None:
        req.added_prompt = models.defaults.get("added_prompt", "")
    if req.negative_prompt is None:
        req.negative_prompt = models.defaults.get("negative_prompt", "")
    seeds = [(seed + k) % (MAX_SEED + 1) for k in range(req.num_images)]

    unit_nets = []
    for i, spec in enumerate(req.controls):
        name = spec.model or (next(iter(models.controlnets)) if models.controlnets else None)
        if name not in models.controlnets:
            known = ", ".join(models.controlnets) or "none loaded"
            raise ValueError(f"controls[{i}] asks for ControlNet {name!r}; loaded: {known}")
        unit_nets.append(name)
    # the request names the ControlNet each unit really used, so records (infotext, JSON) say it
    req.controls = [c if c.model == n else replace(c, model=n) for c, n in zip(req.controls, unit_nets)]

    init, size, out_size, hires, box, legacy = plan_sizes(req, models.base.vae.downscale)
    if init is not None:
        req.init_image = init
    unet_in = models.base.unet.in_channels
    if unet_in not in (4, 9) or (unet_in == 9 and req.mask is None):
        if unet_in == 9:
            raise ValueError("this base is an inpainting model (9-channel UNet): give an init_image and a mask")
        raise ValueError(f"a UNet with {unet_in} input channels is not supported (4, or 9 for inpainting)")
    from ctrlnet.generation.prompts import extract_lora_tags

    text, tags = extract_lora_tags(req.prompt)
    neg, neg_tags = extract_lora_tags(req.negative_prompt or "")
    if neg_tags:
        raise ValueError("<lora:...> tags belong in the prompt, not the negative prompt")
    req.negative_prompt = neg
    loras = [(models.find_lora(name, allow_paths), float(w)) for name, w in req.loras]
    loras += [(models.find_lora(t.name, allow_paths=False), t.weight) for t in tags]
    prompt = text + (", " + req.added_prompt if req.added_prompt else "")
    # the record of the run names the size it used, so it makes the same images whatever decided it
    req.width, req.height = size[1], size[0]
    return Plan(req, seeds, size, out_size, hires, box, legacy, unit_nets, prompt, loras)
