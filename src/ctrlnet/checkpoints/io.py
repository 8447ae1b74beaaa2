"""Reading weight files without ever executing a pickle.

``.safetensors`` are memory-mapped; ``.ckpt``/``.pth``/``.bin`` go through
``torch.load(weights_only=True)``. Every failure becomes a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """A state dict plus the safetensors metadata (empty for pickles)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict | None:
        """Our model config stored by ``ctrlnet`` when it wrote the file, if any."""
        raw = self.metadata.get("ctrlnet_config")
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: metadata 'ctrlnet_config' is not valid JSON ({e})") from None


def _is_safetensors(path: Path) -> bool:
    # The format is an 8-byte little-endian header length followed by a JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= 100_000_000


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is corrupt ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values() if isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: file is truncated ({size} bytes, the header describes {8 + n + end}); download it again"
        )
    try:
        sd = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    return Checkpoint(path, sd, dict(meta))


def _read_pickle(path: Path) -> Checkpoint:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        msg = str(e).split("\n")[0]
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors, and loading it would "
            f"run code ({msg}). Convert it to safetensors in a trusted environment."
        ) from None
    except Exception as e:  # torch.load raises many types (zip, EOF, safetensors, ...) on junk
        raise CheckpointError(f"{path}: not a readable checkpoint, or truncated ({e.__class__.__name__}: {e})") from None
    return Checkpoint(path, _unwrap(obj, path))


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    # Lightning checkpoints keep weights under "state_dict"; some trainers under "model"/"module".
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: contains no tensors")
    return sd


def read_checkpoint(path) -> Checkpoint:
    """Read a ``.safetensors``/``.ckpt``/``.pth``/``.bin`` file (format sniffed from content)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.stat().st_size < 16:
        raise CheckpointError(f"{path}: file is empty or truncated ({path.stat().st_size} bytes)")
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_pickle(path)
