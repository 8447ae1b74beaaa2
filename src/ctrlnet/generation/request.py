"""What a caller asks for: :class:`GenerationRequest` and its ControlNet units (:class:`ControlSpec`).

Pure data and range checks; no torch. Every surface (CLI, web UI, HTTP API, A1111 routes,
colorization) builds one of these and calls :func:`ctrlnet.generation.run.generate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np

MAX_SEED = 2**32 - 1
# A1111 and sd-webui-controlnet refuse nothing by size; we bound output pixels so a long thin
# control map at a high resolution cannot start a 32768x1024 run (4 MP = 2048x2048).
DEFAULT_MAX_PIXELS = 4 * 1024 * 1024


class ControlMode(str, Enum):
    """sd-webui-controlnet's control modes (``external_code.ControlMode``, applied in ``hook.py``).

    - ``balanced``: residuals scaled by the unit's weight on both CFG halves (the original apps).
    - ``prompt`` ("My prompt is more important"): per-residual scales ``weight * 0.825**(12-i)``
      (deep residuals strongest, "soft injection") on both halves.
    - ``controlnet`` ("ControlNet is more important"): the same scales and no control on the
      unconditional half ("CFG injection"), which is the original apps' guess mode.
    """

    BALANCED = "balanced"
    PROMPT = "prompt"
    CONTROLNET = "controlnet"

    @property
    def soft(self) -> bool:
        """Per-residual decaying scales."""
        return self is not ControlMode.BALANCED

    @property
    def cond_only(self) -> bool:
        """Control on the conditional CFG half only."""
        return self is ControlMode.CONTROLNET


class ResizeMode(str, Enum):
    """How a control map whose aspect differs from the output is fitted to it (sd-webui-controlnet's
    ``ResizeMode``): ``just_resize`` stretches, ``crop_and_resize`` scales to cover and crops the
    centre, ``resize_and_fill`` scales to fit and pads with the map's median border colour."""

    JUST_RESIZE = "just_resize"
    CROP_AND_RESIZE = "crop_and_resize"
    RESIZE_AND_FILL = "resize_and_fill"


class HiresOption(str, Enum):
    """In which pass of a hires fix a unit acts (sd-webui-controlnet's ``HiResFixOption`` and
    ``disabled_by_hr_option``): ``both``; ``low_res_only``: the first pass; ``high_res_only``: the
    hires pass (so without a hires fix such a unit does nothing, as there)."""

    BOTH = "both"
    LOW_RES_ONLY = "low_res_only"
    HIGH_RES_ONLY = "high_res_only"

    def acts_in(self, hires_pass: bool) -> bool:
        """Whether the unit acts in the first pass (False) or the hires pass (True)."""
        return self is HiresOption.BOTH or (self is HiresOption.HIGH_RES_ONLY) == hires_pass


class InpaintFill(str, Enum):
    """A1111's "masked content": what the masked area starts from.

    ``original``: the image as it is; ``fill``: the masked area painted from the surrounding
    colours first (OpenCV Telea inpainting); ``latent_noise``: the masked latents replaced by
    noise; ``latent_nothing``: the masked latents set to zero.
    """

    ORIGINAL = "original"
    FILL = "fill"
    LATENT_NOISE = "latent_noise"
    LATENT_NOTHING = "latent_nothing"


class Upscaler(str, Enum):
    """Hires fix upscaler: ``latent`` (bilinear on the latents, A1111's "Latent") or ``lanczos``
    (decode, Lanczos in pixels, encode again)."""

    LATENT = "latent"
    LANCZOS = "lanczos"


def _enum(cls, value, where: str):
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is unknown; choose one of: "
                         f"{', '.join(m.value for m in cls)}") from None


@dataclass
class ControlSpec:
    """One ControlNet unit: an image, how to turn it into a control map, and how to apply it.

    - ``image``: (H, W, 3) uint8 picture or ready map; ``None`` in img2img/inpaint uses the init
      image (as sd-webui-controlnet does), and an ``inpaint`` unit builds its map from the init
      image and mask.
    - ``annotator``: registry name (``None``/"none" = the image is already a control map), with
      ``annotator_params``; it runs at ``detect_resolution`` (short side, px), or, with
      ``pixel_perfect``, at the resolution that maps the image 1:1 onto the output
      (sd-webui-controlnet's ``pixel_perfect_resolution``), otherwise at the output's short side.
    - ``model``: key in ``Models.controlnets`` (None = the first loaded).
    - ``strength``: the unit's weight, 0..2. ``start``/``end``: fractions of the sampling steps
      during which it acts.
    - ``control_mode``: see :class:`ControlMode`; ``guess_mode=True`` is an alias of
      ``controlnet`` (None: the request's ``guess_mode``).
    - ``resize_mode``: see :class:`ResizeMode`.
    - ``reference``: a colour image VAE-encoded as the net's ``latent_cond`` (reference colorization).
    - ``hr_option``: the hires-fix passes it acts in (:class:`HiresOption`).
    """

    image: np.ndarray | None = None
    model: str | None = None
    annotator: str | None = None
    annotator_params: dict = field(default_factory=dict)
    detect_resolution: int | None = None
    pixel_perfect: bool = False
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: ControlMode = ControlMode.BALANCED
    resize_mode: ResizeMode = ResizeMode.CROP_AND_RESIZE
    guess_mode: bool | None = None
    reference: np.ndarray | None = None
    hr_option: HiresOption = HiresOption.BOTH

    def __post_init__(self):
        self.control_mode = _enum(ControlMode, self.control_mode, "control_mode")
        self.resize_mode = _enum(ResizeMode, self.resize_mode, "resize_mode")
        self.hr_option = _enum(HiresOption, self.hr_option, "hr_option")

    def mode(self, request_guess_mode: bool = False) -> ControlMode:
        """The effective control mode: guess mode (the unit's, else the request's) means ``controlnet``."""
        guess = request_guess_mode if self.guess_mode is None else self.guess_mode
        return ControlMode.CONTROLNET if guess else self.control_mode


@dataclass
class GenerationRequest:
    """Everything that decides the images. ``None`` prompts take the model's defaults.

    Size: ``width``/``height`` (multiples of 8); without them the first image (init image, else
    the first control image) decides the aspect with short side ``resolution``, sides rounded to
    64, as the original apps do. ``max_pixels`` bounds the output (after hires fix) and is checked
    before any work.

    img2img (A1111/diffusers convention): ``init_image`` is encoded and noised to the sigma where
    ``int(steps * denoising_strength)`` steps remain; 0 returns the image, 1 starts from noise.

    Inpainting: ``mask`` (H, W) or (H, W, C) uint8, white = repaint, blurred by ``mask_blur``
    (Gaussian sigma, px) for the final composite; ``inpaint_fill`` (:class:`InpaintFill`);
    ``only_masked`` inpaints the mask's box (grown by ``only_masked_padding`` px) at full size and
    pastes it back (A1111's "Inpaint area: Only masked").

    Hires fix (A1111): ``hires_scale`` > 1 upscales the first pass with ``hires_upscaler`` and
    runs img2img at the larger size for ``hires_steps`` (0 = ``steps``) at
    ``hires_denoising_strength``, every unit's map re-fitted to it.

    Tiles: with ``tile_size`` (px), passes larger than one tile denoise tile by tile with
    ``tile_overlap`` px of feathered overlap, and the VAE works in tiles too, so memory is bounded.

    Seeds: image k uses ``seed + k`` for all of its noise, so it can be made again alone.
    ``sampler`` accepts our keys and A1111 names ("DPM++ 2M Karras"); ``schedule`` None = the
    sampler's. ``eta`` None = the sampler's default (0 for DDIM, 1 for ancestral samplers).
    ``loras``: (name or path, weight) pairs; ``<lora:name:w>`` tags in the prompt add to them.
    """

    prompt: str = ""
    added_prompt: str | None = None
    negative_prompt: str | None = None
    controls: list[ControlSpec] = field(default_factory=list)
    num_images: int = 1
    resolution: int = 512
    width: int | None = None
    height: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    steps: int = 20
    guidance_scale: float = 9.0
    seed: int = -1
    eta: float | None = None
    sampler: str = "ddim"
    schedule: str | None = None
    guess_mode: bool = False
    only_mid_control: bool = False
    clip_skip: int = 1
    prompt_chunks: int = 1  # at least this many 75-token windows (3: the anime line-art model)
    init_image: np.ndarray | None = None
    denoising_strength: float = 0.75
    mask: np.ndarray | None = None
    mask_blur: float = 4.0
    inpaint_fill: InpaintFill = InpaintFill.ORIGINAL
    only_masked: bool = False
    only_masked_padding: int = 32
    hires_scale: float = 1.0
    hires_steps: int = 0
    hires_denoising_strength: float = 0.7
    hires_upscaler: Upscaler = Upscaler.LATENT
    tile_size: int | None = None
    tile_overlap: int = 64
    loras: list[tuple[str, float]] = field(default_factory=list)
    noise_device: str = "cpu"

    def __post_init__(self):
        self.inpaint_fill = _enum(InpaintFill, self.inpaint_fill, "inpaint_fill")
        self.hires_upscaler = _enum(Upscaler, self.hires_upscaler, "hires_upscaler")

    def validate(self, max_images: int = 12, max_resolution: int = 2048, max_steps: int = 1000) -> None:
        """Raise ValueError naming the first parameter out of range (sizes are checked again,
        in pixels, by the plan once the images are known)."""
        def opt(v, lo, hi):
            return v is None or lo <= v <= hi

        checks = [
            ("num_images", 1 <= self.num_images <= max_images, f"between 1 and {max_images}"),
            # resolution only sizes a side that width/height leave open
            ("resolution", (self.width is not None and self.height is not None)
             or 64 <= self.resolution <= max_resolution, f"between 64 and {max_resolution}"),
            ("width", self.width is None or (64 <= self.width and self.width % 8 == 0), "a multiple of 8, at least 64"),
            ("height", self.height is None or (64 <= self.height and self.height % 8 == 0),
             "a multiple of 8, at least 64"),
            ("max_pixels", self.max_pixels >= 64 * 64, "at least 4096"),
            ("steps", 1 <= self.steps <= max_steps, f"between 1 and {max_steps}"),
            ("guidance_scale", 0.0 <= self.guidance_scale <= 50.0, "between 0 and 50"),
            ("eta", opt(self.eta, 0.0, 1.0), "between 0 and 1"),
            ("seed", -1 <= self.seed <= MAX_SEED, f"-1 (random) or between 0 and {MAX_SEED}"),
            ("clip_skip", self.clip_skip in (1, 2), "1 or 2"),
            ("prompt_chunks", 1 <= self.prompt_chunks <= 3, "between 1 and 3"),
            ("denoising_strength", 0.0 <= self.denoising_strength <= 1.0, "between 0 and 1"),
            ("mask_blur", 0.0 <= self.mask_blur <= 64.0, "between 0 and 64"),
            ("only_masked_padding", 0 <= self.only_masked_padding <= 256, "between 0 and 256"),
            ("hires_scale", 1.0 <= self.hires_scale <= 8.0, "between 1 and 8"),
            ("hires_steps", 0 <= self.hires_steps <= max_steps, f"between 0 and {max_steps}"),
            ("hires_denoising_strength", 0.0 <= self.hires_denoising_strength <= 1.0, "between 0 and 1"),
            ("tile_size", self.tile_size is None or (self.tile_size >= 64 and self.tile_size % 8 == 0),
             "a multiple of 8, at least 64"),
            ("tile_overlap", 0 <= self.tile_overlap and self.tile_overlap % 8 == 0
             and (self.tile_size is None or self.tile_overlap < self.tile_size // 2),
             "a multiple of 8, less than half the tile"),
        ]
        for name, ok, rng in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: must be {rng}")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask needs an init_image to inpaint")
        from ctrlnet.sampling.names import resolve_sampler
        from ctrlnet.sampling.registry import check_options

        key, _ = resolve_sampler(self.sampler, self.schedule)
        check_options(key, {} if self.eta is None else {"eta": self.eta})
        for i, (name, w) in enumerate(self.loras):
            if not isinstance(name, str) or not name:
                raise ValueError(f"loras[{i}]: a LoRA needs a name or path")
            if not -4.0 <= float(w) <= 4.0:
                raise ValueError(f"loras[{i}] weight={w} is out of range: must be between -4 and 4")
        for i, c in enumerate(self.controls):
            if not 0.0 <= c.strength <= 2.0:
                raise ValueError(f"controls[{i}].strength={c.strength} is out of range: must be between 0 and 2")
            if not 0.0 <= c.start <= c.end <= 1.0:
                raise ValueError(f"controls[{i}]: need 0 <= start <= end <= 1, got {c.start}, {c.end}")
            if c.detect_resolution is not None and not 64 <= c.detect_resolution <= max(2048, max_resolution):
                raise ValueError(f"controls[{i}].detect_resolution={c.detect_resolution} is out of range: "
                                 "must be between 64 and 2048")
            if c.image is None and self.init_image is None and c.annotator != "inpaint":
                raise ValueError(f"controls[{i}] has no image (and there is no init image to use)")

    def to_dict(self) -> dict:
        """JSON-friendly parameters (images left out; enums as their values)."""
        skip = {"image", "reference", "init_image", "mask"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["controls"] = [{k: v for k, v in asdict(c).items() if k not in skip} for c in self.controls]
        d["loras"] = [[n, float(w)] for n, w in self.loras]

        def plain(v):
            if isinstance(v, Enum):
                return v.value
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        return plain(d)
