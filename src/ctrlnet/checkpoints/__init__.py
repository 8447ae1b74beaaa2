"""Checkpoint files: safe reading, format detection by sentinel keys, config inference, loading
onto ``meta``-built modules, and key maps to and from the diffusers layout."""

from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint

__all__ = ["CheckpointError", "read_checkpoint"]
