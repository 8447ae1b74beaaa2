"""The public Python API in one import: ``load_models()`` once, then ``generate(models, request)``.

The CLI, web UI, HTTP API, colorization and training previews all call :func:`generate`; the
generation path itself lives in :mod:`ctrlnet.generation` (request -> plan -> passes -> result).
"""

from ctrlnet.generation.bundle import (
    DEMO_BASE,
    DEMO_CONTROL,
    ORIGINAL_ADDED_PROMPT,
    ORIGINAL_NEGATIVE_PROMPT,
    Models,
    demo_dir,
    file_defaults,
    load_models,
    place_vae,
    random_base,
    random_controlnet,
)
from ctrlnet.generation.conditioning import encode_prompts
from ctrlnet.generation.latents import decode_images, encode_image
from ctrlnet.generation.request import (
    MAX_SEED,
    ControlMode,
    ControlSpec,
    GenerationRequest,
    InpaintFill,
    ResizeMode,
    Upscaler,
)
from ctrlnet.generation.result import GenerationResult, result_metadata
from ctrlnet.generation.run import GenerationCancelled, Progress, generate

__all__ = [
    "DEMO_BASE", "DEMO_CONTROL", "MAX_SEED", "ORIGINAL_ADDED_PROMPT", "ORIGINAL_NEGATIVE_PROMPT",
    "ControlMode", "ControlSpec", "GenerationCancelled", "GenerationRequest", "GenerationResult",
    "InpaintFill", "Models", "Progress", "ResizeMode", "Upscaler", "decode_images", "demo_dir",
    "encode_image", "encode_prompts", "file_defaults", "generate", "load_models", "place_vae", "random_base",
    "random_controlnet", "result_metadata",
]
