"""Opt-in ``torch.compile`` of the denoising step (the UNet and each ControlNet).

Off by default: compiling the full-size SD1.5 UNet + ControlNet with inductor takes minutes on a
CPU, and again for every new input shape (image size, batch, the conditional-only rows of a
"ControlNet is more important" unit), so it pays off only for many images at one size (a server,
a batch job). Switch it on with ``load_models(..., compile=True)``, ``ctrlnet generate --compile``
or ``CTRLNET_COMPILE=1`` (read where ``compile`` is left at None: the web UI and the HTTP API).

What it buys was measured, not assumed (issue 18, ``benchmarks/step.py --compile``): see the
README's step table. Inductor fuses GroupNorm + SiLU + the timestep add into generated kernels,
which eager PyTorch cannot (a hand-written GroupNorm + SiLU in plain torch ops was 10-30x slower
than PyTorch's bf16 channels-last kernel, so none is kept).

Weights stay graph inputs (no inductor ``freezing``): freezing folds them into the compiled code
as constants, so a LoRA merged into the weights in place for one request
(:func:`ctrlnet.models.patching.apply_loras`) would be silently ignored by the compiled step.
"""

from __future__ import annotations

import os

from torch import nn

# Environment variable read where ``compile`` is not given: 1/true/yes/on or 0/false/no/off/empty.
COMPILE_ENV = "CTRLNET_COMPILE"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
# torch.compile's arguments for each step module (benchmarks/step.py compiles with the same)
COMPILE_OPTIONS = {"backend": "inductor", "dynamic": False}


def resolve_compile(requested: bool | None = None) -> bool:
    """``requested`` when it is a bool, else ``$CTRLNET_COMPILE`` (default off).

    Raises ValueError for a value of the variable that is neither on nor off, naming it.
    """
    if requested is not None:
        return bool(requested)
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"${COMPILE_ENV}={os.environ[COMPILE_ENV]!r} is neither on (1, true, yes, on) "
                     "nor off (0, false, no, off)")


def compile_step(modules: list[nn.Module]) -> None:
    """Compile each module's forward in place (``nn.Module.compile``: the module, its state-dict
    keys and its parameters stay as they are; calls go through the compiled code).

    Inductor, with ``dynamic=False``: each input shape gets code specialised for it (static shapes
    let inductor pick its kernels for them), at the price of one compilation per new shape, which
    happens on the first call with that shape.
    """
    for m in modules:
        if is_compiled(m):
            continue  # compiled already (the same modules loaded into a second bundle)
        m.compile(**COMPILE_OPTIONS)


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_step` (or ``module.compile``) was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None


__all__ = ["COMPILE_ENV", "COMPILE_OPTIONS", "compile_step", "is_compiled", "resolve_compile"]
