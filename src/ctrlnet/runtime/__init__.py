"""Device and dtype choice, and moving model stages on and off the accelerator."""

from ctrlnet.runtime.device import offload, resolve_device, resolve_dtype

__all__ = ["offload", "resolve_device", "resolve_dtype"]
