"""Pick a device and dtype; keep only the stage in use on the accelerator in low-memory mode."""

from __future__ import annotations

import contextlib

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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA/MPS, fp32 on CPU; names like "bf16" are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


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
