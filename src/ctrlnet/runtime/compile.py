"""Opt-in compilation of the denoising step (the UNet and each ControlNet), by one of two backends:

- ``"inductor"``: ``torch.compile`` (below), any device;
- ``"openvino"``: the modules converted to OpenVINO and run by its CPU plugin
  (:mod:`ctrlnet.runtime.openvino`; CPU only, needs ``pip install 'ctrlnet[openvino]'``), about
  1.3x faster than any PyTorch form on an AVX-512-bf16 CPU at full size (README, speed section).

Both are switched on the same way: ``load_models(..., compile="inductor" | "openvino")`` (``True``
means inductor), ``ctrlnet generate --compile [inductor|openvino]`` (``--compile`` alone:
inductor), or ``CTRLNET_COMPILE=1 | inductor | openvino`` (read where ``compile`` is left at None:
the web UI and the HTTP API).

Inductor is off by default: compiling the full-size SD1.5 UNet + ControlNet with inductor takes minutes on a
CPU, and again for every new input shape (image size, batch, the conditional-only rows of a
"ControlNet is more important" unit), so it pays off only for many images at one size (a server,
a batch job).

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

# Environment variable read where ``compile`` is not given: a backend name, 1/true/yes/on
# (inductor) or 0/false/no/off/empty (off).
COMPILE_ENV = "CTRLNET_COMPILE"
BACKENDS = ("inductor", "openvino")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
# torch.compile's arguments for each step module (benchmarks/step.py compiles with the same)
COMPILE_OPTIONS = {"backend": "inductor", "dynamic": False}


def resolve_compile(requested: bool | str | None = None) -> str | None:
    """The backend to compile the step with, or None for none (eager PyTorch).

    ``requested``: True (inductor), False (none), a backend name from :data:`BACKENDS`, or None to
    read ``$CTRLNET_COMPILE`` (a backend name, 1/true/yes/on = inductor, 0/false/no/off/empty =
    none; case and surrounding spaces ignored). Raises ValueError for any other value, naming it
    and the choices. Whether the backend can run here is checked by :func:`check_backend`.
    """
    if isinstance(requested, bool):
        return "inductor" if requested else None
    source = "compile"
    if requested is None:
        requested, source = os.environ.get(COMPILE_ENV, ""), f"${COMPILE_ENV}"
    value = str(requested).strip().lower()
    if value in BACKENDS:
        return value
    if value in _TRUE:
        return "inductor"
    if value in _FALSE:
        return None
    raise ValueError(f"{source}={requested!r} is not a compile backend: choose {' or '.join(BACKENDS)}, "
                     "on (1, true, yes, on = inductor) or off (0, false, no, off)")


def check_backend(backend: str | None, device) -> None:
    """Raise before any model loads when ``backend`` cannot run on ``device``: the openvino
    backend without the ``openvino`` package (naming ``pip install 'ctrlnet[openvino]'``) or off
    the CPU (:class:`ctrlnet.runtime.openvino.OpenVINOError`, a ValueError)."""
    if backend == "openvino":
        from ctrlnet.runtime.openvino import check_available

        check_available(device)


def compile_step(modules: list[nn.Module], backend: str = "inductor") -> None:
    """Compile each module in place with ``backend`` ("inductor" or "openvino"): the module, its
    state-dict keys and its parameters stay as they are; calls go through the compiled code.
    The openvino backend: :func:`ctrlnet.runtime.openvino.use_openvino` (converts on first call).

    Inductor, with ``dynamic=False``: each input shape gets code specialised for it (static shapes
    let inductor pick its kernels for them), at the price of one compilation per new shape, which
    happens on the first call with that shape.
    """
    if backend == "openvino":
        from ctrlnet.runtime.openvino import use_openvino

        use_openvino(modules)
        return
    if backend != "inductor":
        raise ValueError(f"unknown compile backend {backend!r}: choose {' or '.join(BACKENDS)}")
    for m in modules:
        if is_compiled(m):
            continue  # compiled already (the same modules loaded into a second bundle)
        m.compile(**COMPILE_OPTIONS)


def compiled_backend(module: nn.Module) -> str | None:
    """The backend :func:`compile_step` applied to ``module`` ("inductor" also for a plain
    ``module.compile``), or None."""
    from ctrlnet.runtime.openvino import openvino_wrapper

    if openvino_wrapper(module) is not None:
        return "openvino"
    return "inductor" if getattr(module, "_compiled_call_impl", None) is not None else None


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_step` (either backend, or ``module.compile``) was applied to ``module``."""
    return compiled_backend(module) is not None


__all__ = ["BACKENDS", "COMPILE_ENV", "COMPILE_OPTIONS", "check_backend", "compile_step", "compiled_backend",
           "is_compiled", "resolve_compile"]
