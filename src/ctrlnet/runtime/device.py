"""Pick a device and dtype; keep only the stage in use on the accelerator in low-memory mode."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA, then Apple MPS, then CPU; anything else is checked to exist."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for, but Apple MPS is not available")
    return dev


# Environment variable that replaces "auto" (an explicit dtype argument still wins): fp32, bf16, ...
DTYPE_ENV = "CTRLNET_DTYPE"


def cpu_has_native_bf16(cpuinfo: str, machine: str = "x86_64") -> bool:
    """Whether a ``/proc/cpuinfo`` text announces bf16 arithmetic in hardware: the x86 flags
    ``avx512_bf16`` or ``amx_bf16`` (Cooper Lake, Sapphire Rapids, Zen 4 and later), or ``bf16`` in
    an Arm core's ``Features`` (Armv8.6 BF16: Graviton 3, Neoverse V1/N2, ...). Without them bf16
    runs through conversions and is slower than fp32, so ``auto`` keeps fp32 there."""
    keys = ("features",) if machine.lower().startswith(("arm", "aarch")) else ("flags",)
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if not sep or name.strip().lower() not in keys:
            continue
        words = set(value.split())
        if keys == ("features",) and "bf16" in words:
            return True
        if keys == ("flags",) and words & {"avx512_bf16", "amx_bf16"}:
            return True
    return False


@functools.cache
def _this_cpu_has_native_bf16() -> bool:
    """Read once, on first use (never at import); False where /proc/cpuinfo does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return cpu_has_native_bf16(text, platform.machine())


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``auto`` means on ``device``: fp16 on CUDA and MPS; on the CPU bf16 where the processor
    computes it natively (:func:`cpu_has_native_bf16`, about 2x fp32's speed for the UNet), else fp32."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    if device.type == "cpu" and _this_cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name (``fp32``, ``bf16``, ``fp16``, ...) or ``auto`` -> a torch dtype.

    ``auto`` (or None) is ``$CTRLNET_DTYPE`` when that is set, else :func:`auto_dtype` (fp16 on
    CUDA/MPS, bf16 on CPUs with native bf16, fp32 elsewhere). Raises ValueError for unknown names.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        env = os.environ.get(DTYPE_ENV, "").strip()
        if env and env != "auto":
            if env not in _DTYPES:
                raise ValueError(f"${DTYPE_ENV}={env!r} is not a dtype; use one of auto, {', '.join(sorted(_DTYPES))}")
            return _DTYPES[env]
        return auto_dtype(device)
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in next to models in ``dtype``: fp32 beside fp16 (SD1.x VAE decoders
    overflow to inf/NaN in fp16); bf16 keeps fp32's exponent range, and on the embedded model its
    decode differs from fp32's by less than a grey level on average (measured in the issue-18
    note), so bf16 models keep a bf16 VAE."""
    return torch.float32 if dtype == torch.float16 else dtype


@contextlib.contextmanager
def offload(modules, device: torch.device, enabled: bool):
    """Move ``modules`` to ``device`` for the block, and back to the CPU after it when ``enabled``."""
    modules = [m for m in modules if m is not None]
    if enabled:
        for m in modules:
            m.to(device)
    try:
        yield
    finally:
        if enabled and device.type != "cpu":
            for m in modules:
                m.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()


def use_channels_last(device: torch.device, requested: bool | None = None) -> bool:
    """Channels-last layout speeds up the convolutions on CPU (oneDNN) and CUDA; MPS stays NCHW."""
    if requested is not None:
        return requested
    return device.type in ("cpu", "cuda")
