"""``generate(models, request)``: the one entry point behind every surface.

request -> plan (sizes, seeds) -> prompts -> unit maps -> pass 1 [-> upscale -> hires pass]
-> decode -> composite (inpaint) -> images + the record that makes them again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ctrlnet.generation import preprocess
from ctrlnet.generation.bundle import Models
from ctrlnet.generation.conditioning import control_input, display_map, encode_prompts
from ctrlnet.generation.inpaint import LatentBlend, MaskSet, composite, masked_image, paste
from ctrlnet.generation.latents import ImageNoise, decode_images, encode_images
from ctrlnet.generation.plan import Plan, make_plan
from ctrlnet.generation.request import ControlSpec, GenerationRequest, InpaintFill, ResizeMode, Upscaler
from ctrlnet.generation.result import GenerationResult
from ctrlnet.image import ImageError
from ctrlnet.models.patching import apply_loras
from ctrlnet.runtime.device import offload
from ctrlnet.sampling.denoiser import Denoiser, TiledDenoiser
from ctrlnet.sampling.names import resolve_sampler
from ctrlnet.sampling.registry import SAMPLERS, run_sampler
from ctrlnet.sampling.schedule import vp_scale

Progress = Callable[[int, int], None]


class GenerationCancelled(RuntimeError):
    """Raised at the next step after the caller's ``cancel()`` returned True.

    ``partial``: with ``generate(..., keep_partial=True)``, the images so far (a
    :class:`GenerationResult` whose ``interrupted_at`` is the last finished step), else None.
    """

    def __init__(self, message: str = "generation cancelled"):
        super().__init__(message)
        self.partial: GenerationResult | None = None


class _Steps:
    """Progress over all passes, and the cancel check, as one sampler callback factory. Keeps the
    last step's ``denoised`` (the model's x0 estimate, latent scale) for a partial answer."""

    def __init__(self, total: int, progress: Progress | None, cancel: Callable[[], bool] | None,
                 preview: Callable[[torch.Tensor], None] | None = None):
        self.total, self.done, self.progress, self.cancel = max(1, total), 0, progress, cancel
        self.preview = preview
        self.last_denoised: torch.Tensor | None = None
        self.maps: list[np.ndarray] = []  # the running pass's control maps

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise GenerationCancelled("generation cancelled")

    def callback(self, extra: Callable[[dict], None] | None = None):
        def cb(info: dict) -> None:
            self.done += 1
            self.last_denoised = info.get("denoised")
            if self.preview is not None and self.last_denoised is not None:
                self.preview(self.last_denoised)
            if extra is not None:
                extra(info)
            if self.progress is not None:
                self.progress(min(self.done, self.total), self.total)
            self.check()
        return cb


@contextlib.contextmanager
def _timed(timings: dict[str, float] | None, name: str, device: torch.device):
    """Add the block's wall time to ``timings[name]`` (nothing when ``timings`` is None)."""
    if timings is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":  # kernels run asynchronously: charge them to their own stage
            torch.cuda.synchronize(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


@dataclass
class _Unit:
    """A unit's map before fitting (annotated once; None for the v1.1 inpaint unit, whose map is
    built per pass from the init image and mask), and the resize mode it is fitted with."""

    spec: ControlSpec
    net: str
    raw: np.ndarray | None
    resize: ResizeMode


def _units(plan: Plan, source: np.ndarray | None) -> list[_Unit]:
    """Annotate every unit once. ``source``: the image units without their own use (the init
    image, cropped to the only-masked box)."""
    req = plan.request
    units = []
    for i, spec in enumerate(req.controls):
        if spec.annotator == "inpaint":  # built per pass from the init image and mask
            units.append(_Unit(spec, plan.unit_nets[i], None, ResizeMode.JUST_RESIZE))
            continue
        image = spec.image
        if image is not None and plan.box is not None:
            # a unit's own image is fitted to the whole picture, then cropped like it
            full = preprocess.fit_image(image, req.init_image.shape[:2], spec.resize_mode)
            y0, y1, x0, x1 = plan.box
            image = full[y0:y1, x0:x1]
        image = source if image is None else image
        try:
            raw = preprocess.annotate(spec, image, plan.size, plan.legacy_resolution)
        except ImageError as e:
            raise ImageError(f"controls[{i}]: {e}") from None
        # The unit whose image decided the size in the original apps' sizing is stretched by the
        # rounding to 64 as they do; every other map keeps its aspect with its own resize mode.
        decides = plan.legacy_resolution is not None and i == 0 and req.init_image is None
        units.append(_Unit(spec, plan.unit_nets[i], raw, ResizeMode.JUST_RESIZE if decides else spec.resize_mode))
    return units


def _run_sampler(req: GenerationRequest, den, x, sigmas, noise: ImageNoise, callback, seeds: list[int]):
    """The request's sampler with its own defaults (eta None = the sampler's), stochastic steps
    drawing image k's noise from image k's generator; Brownian trees seeded by the image seeds (A1111)."""
    key, _ = resolve_sampler(req.sampler, req.schedule)
    options = {} if req.eta is None else {"eta": req.eta}
    if "noise" in SAMPLERS[key].defaults:
        options["seed"] = seeds
    return run_sampler(key, den, x, sigmas, generator=noise.generators, callback=callback, **options)


def _sample_pass(models: Models, plan: Plan, size: tuple[int, int], hires: bool, units: list[_Unit],
                 cond, uncond, noise: ImageNoise, steps: _Steps, start_image: np.ndarray | None = None,
                 start_latents: torch.Tensor | None = None, mask: MaskSet | None = None):
    """One sampling pass at ``size``; returns the final latents (B, C, h, w) and the maps used."""
    req = plan.request
    dev, n = models.device, req.num_images
    down = models.base.vae.downscale
    h, w = size[0] // down, size[1] // down
    tile_px = req.tile_size if req.tile_size and max(size) > req.tile_size else None
    sigmas = plan.sigmas(hires, models.schedule)

    maps, controls = [], []
    for u in units:
        if u.raw is None:  # the v1.1 inpaint unit
            cmap = preprocess.inpaint_hint(start_image, mask.pixel)
        else:
            cmap = preprocess.control_map(u.spec, u.raw, size, u.resize)
        maps.append(display_map(cmap))  # one map per unit, acting in this pass or not
        if not u.spec.hr_option.acts_in(hires):
            continue
        lc = None
        if u.spec.reference is not None:
            lc = encode_images(models, [preprocess.fit_image(u.spec.reference, size)])
        controls.append(control_input(models, u.net, u.spec, cmap, req.guess_mode, lc))
    steps.maps = maps

    x0 = start_latents
    if x0 is None and start_image is not None:
        img = start_image
        if mask is not None and req.inpaint_fill is InpaintFill.FILL:
            img = preprocess.fill_masked(img, mask.binary)
        x0 = encode_images(models, [img], tile_px).expand(n, -1, -1, -1)
    if x0 is not None and mask is not None and req.inpaint_fill in (InpaintFill.LATENT_NOISE, InpaintFill.LATENT_NOTHING):
        m = mask.latent_binary(down).to(x0)
        fill = noise(x0) if req.inpaint_fill is InpaintFill.LATENT_NOISE else torch.zeros_like(x0)
        x0 = x0 * (1 - m) + fill * m
    shape = (n, models.base.vae.embed_dim, h, w)
    first = noise(torch.empty(shape)).to(dev)
    s0 = float(sigmas[0])
    if x0 is None or plan.strength(hires) >= 1.0:
        x = first / vp_scale(s0)  # pure noise (txt2img, or strength 1): the original's x_T
    else:
        x = x0.to(dev) + s0 * first  # diffusers' add_noise at the first kept timestep, in sigma space

    c_concat, blend = None, None
    if mask is not None and models.base.unet.in_channels == 9:
        masked = encode_images(models, [masked_image(start_image, mask.binary)], tile_px)
        c_concat = torch.cat([mask.latent_binary(down).to(masked), masked], dim=1).to(dev)  # (1, 1+C, h, w)
    elif mask is not None:
        blend = LatentBlend(x0.to(dev), mask.latent(down).to(dev), sigmas, noise)
        x = blend.blend(x, s0)

    den = Denoiser(models.base.unet, models.schedule, cond, uncond, req.guidance_scale, controls,
                   req.only_mid_control, sigmas, c_concat=c_concat)
    if tile_px is not None:
        den = TiledDenoiser(den, tile_px // down, req.tile_overlap // down)
    if len(sigmas) < 2:
        return x0.to(dev), maps
    with offload([models.base.unet, *[c.net for c in controls]], dev, models.low_vram):
        x = _run_sampler(req, den, x, sigmas, noise, steps.callback(blend), plan.seeds)
    return x * vp_scale(float(sigmas[-1])), maps  # back to the model's scale at the last sigma


def _upscale(models: Models, latents: torch.Tensor, size: tuple[int, int], upscaler: Upscaler,
             tile_px: int | None) -> torch.Tensor:
    """First-pass latents -> latents at ``size`` (A1111 hires fix: "Latent" = bilinear on the latents,
    no antialias; "Lanczos" = decode, resize pixels, encode)."""
    down = models.base.vae.downscale
    if upscaler is Upscaler.LATENT:
        return F.interpolate(latents, size=(size[0] // down, size[1] // down), mode="bilinear", antialias=False)
    images = [preprocess.fit_image(im, size) for im in decode_images(models, latents, tile_px)]
    return encode_images(models, images, tile_px).to(latents.device)


def generate(models: Models, request: GenerationRequest, progress: Progress | None = None,
             cancel: Callable[[], bool] | None = None, allow_paths: bool = True,
             timings: dict[str, float] | None = None, keep_partial: bool = False,
             preview: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
    """Generate ``request.num_images`` images (see :class:`GenerationRequest` for every option).

    ``progress(done, total)`` is called after every sampling step of every pass; ``cancel()`` is
    polled there too and a True stops the run with :class:`GenerationCancelled`; with
    ``keep_partial`` that exception carries the images so far in ``partial``: the last finished
    step's x0 estimate decoded (and composited for inpainting), as A1111 answers an interrupted
    request (its samplers return the last ``denoised`` on interrupt). ``preview(x0)``: called
    after every step with that step's x0 estimate, (B, C, h, w) latents in the UNet's scale, for
    live previews (:func:`ctrlnet.generation.preview.cheap_preview`); keep it, never modify it.
    Raises ValueError
    or :class:`~ctrlnet.image.ImageError` naming the cause before any model runs. LoRAs (the
    request's and the prompt's ``<lora:NAME:W>`` tags) are merged for this call only and the
    weights restored exactly after it. ``allow_paths=False`` for untrusted requests: LoRAs by name
    only, from ``models.lora_dirs``. ``timings``: a dict to which the seconds of each stage are
    added: ``hint`` (annotators), ``text`` (prompt encoding), ``sampling`` (per pass: control maps,
    start latents, the sampler's steps), ``decode`` (VAE decode).
    """
    plan = make_plan(models, request, allow_paths)
    req = plan.request
    steps = _Steps(plan.total_steps, progress, cancel, preview)
    noise = ImageNoise(plan.seeds, req.noise_device)

    init = req.init_image  # (H, W, 3) uint8, the original size
    source, mask, start, full_mask = None, None, None, None
    if init is not None:
        if plan.box is not None:
            y0, y1, x0, x1 = plan.box
            source = init[y0:y1, x0:x1]
        else:
            source = init
        start = preprocess.fit_image(source, plan.size)
        if req.mask is not None:
            full_mask = preprocess.prepare_mask(req.mask, init.shape[:2])
            crop = full_mask if plan.box is None else full_mask[plan.box[0]:plan.box[1], plan.box[2]:plan.box[3]]
            mask = MaskSet.make(crop, plan.size, req.mask_blur)
    with apply_loras(models.base.unet, models.base.text_encoder, models.controlnets, plan.loras):
        try:
            return _generate(models, plan, steps, noise, init, source, start, mask, full_mask, timings)
        except GenerationCancelled as e:
            if keep_partial and steps.last_denoised is not None:
                e.partial = _partial(models, plan, steps, init, start, mask, full_mask)
            raise


def _generate(models, plan, steps, noise, init, source, start, mask, full_mask, timings) -> GenerationResult:
    req = plan.request
    n, dev = req.num_images, models.device
    with _timed(timings, "hint", dev):
        units = _units(plan, source)
    with _timed(timings, "text", dev), offload([models.base.text_encoder], dev, models.low_vram), torch.no_grad():
        cond, uncond = encode_prompts(models, [plan.prompt] * n, [req.negative_prompt] * n, req.clip_skip,
                                      req.prompt_chunks)
    cond, uncond = cond.to(dev), uncond.to(dev)
    steps.check()

    if init is not None and plan.strength(False) == 0 and plan.hires_size is None:
        images = [start.copy() for _ in range(n)]  # strength 0: the image itself, no VAE round trip
        maps = [display_map(preprocess.control_map(u.spec, u.raw, plan.size, u.resize)) for u in units
                if u.raw is not None]
    else:
        with _timed(timings, "sampling", dev):
            latents, maps = _sample_pass(models, plan, plan.size, False, units, cond, uncond, noise, steps,
                                         start_image=start if init is not None else None, mask=mask)
        if plan.hires_size is not None:
            with _timed(timings, "sampling", dev):
                up = _upscale(models, latents, plan.hires_size, req.hires_upscaler, req.tile_size)
                latents, maps = _sample_pass(models, plan, plan.hires_size, True, units, cond, uncond, noise, steps,
                                             start_latents=up)
        with _timed(timings, "decode", dev):
            images = _decode(models, plan, latents, mask is not None)
    images = _finish(plan, images, init, start, mask, full_mask)
    return GenerationResult(images, maps, req.seed, req, list(plan.seeds), size=plan.size)


def _decode(models: Models, plan: Plan, latents: torch.Tensor, as_float: bool) -> list[np.ndarray]:
    tile_px = plan.request.tile_size
    return decode_images(models, latents, tile_px if tile_px and max(plan.out_size) > tile_px else None,
                         as_float=as_float)


def _finish(plan: Plan, images, init, start, mask, full_mask) -> list[np.ndarray]:
    """Decoded images -> the answer: inpainting keeps the unmasked pixels and pastes an
    only-masked crop back into the whole picture."""
    if mask is None:
        return images
    images = [composite(im, start, mask.pixel) for im in images]
    if plan.box is not None:
        full_pixel = preprocess.blur_mask(full_mask, plan.request.mask_blur)
        images = [paste(init, im, plan.box, full_pixel) for im in images]
    return images


def _partial(models, plan, steps, init, start, mask, full_mask) -> GenerationResult:
    """The images at the step a cancel stopped: the last x0 estimate, decoded and finished like
    the answer (an estimate from a hires pass is at the hires size)."""
    req = plan.request
    with torch.no_grad():
        images = _decode(models, plan, steps.last_denoised, mask is not None)
    if mask is not None and images[0].shape[:2] != mask.pixel.shape[:2]:
        mask = None  # a hires-pass estimate: nothing at this size to composite with
    images = _finish(plan, images, init, start, mask, full_mask)
    return GenerationResult(images, list(steps.maps), req.seed, req, list(plan.seeds),
                            interrupted_at=steps.done, size=plan.size)
