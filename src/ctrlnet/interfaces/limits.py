"""What one HTTP API request may ask for, and how the service queues and keeps jobs (kept free of
web dependencies so the CLI can show defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """Checked before any work starts; over a limit the API answers 413 (size) or 422 (parameters).

    ``max_resolution`` bounds ``resolution`` and each of ``width``/``height``;
    ``max_output_pixels`` bounds width x height x images of the output (after hires fix, so
    x hires_scale^2), checked once the request is planned. ``max_queue``: jobs running + waiting
    before 429; ``keep_s``/``keep_count``: how long and how many finished jobs stay readable at
    ``GET /v1/jobs/{id}``.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 16_777_216  # per input image (4096 x 4096)
    max_resolution: int = 1024
    max_steps: int = 100
    max_images: int = 4
    max_controls: int = 4
    max_prompt_chars: int = 4000
    max_output_pixels: int = 8 * 1024 * 1024  # e.g. 4 images of 1024x1024 + hires x1.4
    max_queue: int = 4  # jobs running + waiting
    keep_s: float = 600.0
    keep_count: int = 32
