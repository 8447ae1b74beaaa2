"""What one HTTP API request may ask for (kept free of web dependencies so the CLI can show defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """Checked before any work starts; over a limit the API answers 413 (size) or 422 (parameters)."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 16_777_216  # per input image (4096 x 4096)
    max_resolution: int = 1024
    max_steps: int = 100
    max_images: int = 4
    max_controls: int = 4
    max_prompt_chars: int = 4000
    max_queue: int = 4  # jobs running + waiting
