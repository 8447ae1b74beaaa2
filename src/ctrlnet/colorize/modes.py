"""The video colorization modes: which reference each frame is coloured after.

- ``fixed``: every frame after the given reference;
- ``recursive``: frame 0 after the reference, each later frame after the previous result;
- ``anchored``: recursive, but frames 0, N, 2N, ... after the given reference again
  (N = ``anchor_every``), so an error that creeps in lasts at most N - 1 frames.

With N = 1 anchored is fixed; with N at least the number of frames it is recursive. Kept free of
heavy imports: the CLI lists the modes without loading torch.
"""

from __future__ import annotations

MODES = ("fixed", "anchored", "recursive")
DEFAULT_ANCHOR_EVERY = 10


def reference_source(i: int, mode: str, anchor_every: int | None = None) -> str:
    """What frame ``i`` (0-based) is coloured after: ``"fixed"`` (the given reference) or
    ``"previous"`` (the result for frame ``i - 1``). ValueError for an unknown mode, or an
    ``anchored`` mode without ``anchor_every >= 1``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "anchored" and (anchor_every is None or anchor_every < 1):
        raise ValueError(f"anchored mode needs anchor_every >= 1, got {anchor_every!r}")
    if i < 0:
        raise ValueError(f"frame index must be >= 0, got {i}")
    if mode == "fixed" or i == 0:
        return "fixed"
    if mode == "recursive":
        return "previous"
    return "fixed" if i % anchor_every == 0 else "previous"
