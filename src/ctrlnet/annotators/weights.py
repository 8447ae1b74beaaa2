"""Finding, reading and loading the annotator weight files (lllyasviel/Annotators on the hub).

Nothing here downloads: a file is looked up in the folder passed in, then in ``$CTRLNET_ANNOTATOR_DIR``,
then in the local Hugging Face cache; a missing file raises :class:`MissingWeightsError` whose
message says where to get it. Loaded models are kept in a small LRU keyed by (file, device, dtype).
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import nn

from ctrlnet.checkpoints.keys import key_problems

HUB_REPO = "lllyasviel/Annotators"
ENV_DIR = "CTRLNET_ANNOTATOR_DIR"

# Buffers the official files may lack (written by newer torch than some checkpoints); unused in eval.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class MissingWeightsError(FileNotFoundError):
    """A weights file or model folder an annotator needs is not on this machine."""


class WeightsError(ValueError):
    """A weights file that is unreadable, or whose keys/shapes do not fit the model."""


def weights_url(filename: str) -> str:
    """Download address of an official annotator file."""
    return f"https://huggingface.co/{HUB_REPO}/resolve/main/{filename}"


def _hub_cache_dir() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE) / ("models--" + HUB_REPO.replace("/", "--"))


def _hub_cached_path(filename: str) -> Path | None:
    """The file in the local hub cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(HUB_REPO, filename)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _search_dirs(weights_dir) -> list[Path]:
    dirs: list[Path] = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir).expanduser())
    env = os.environ.get(ENV_DIR)
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return dirs


def find_weights(filename: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of an official annotator file.

    Searches ``weights_dir`` (a folder, or the file itself), each folder in ``$CTRLNET_ANNOTATOR_DIR``
    (``os.pathsep``-separated), then the local Hugging Face cache of ``lllyasviel/Annotators``.
    """
    dirs = _search_dirs(weights_dir)
    for d in dirs:
        if d.is_file() and d.name == filename:
            return d
        if (d / filename).is_file():
            return d / filename
    cached = _hub_cached_path(filename)
    if cached is not None:
        return cached
    searched = [str(d) for d in dirs]
    hub = _hub_cache_dir()
    if hub is not None:
        searched.append(f"{hub} (Hugging Face cache)")
    where = "; ".join(searched) if searched else "nowhere (no weights_dir given, $%s unset)" % ENV_DIR
    raise MissingWeightsError(
        f"annotator weights file {filename!r} not found. Searched: {where}. "
        f"Download it from {weights_url(filename)} into a folder and pass weights_dir=<folder> "
        f"or set ${ENV_DIR}."
    )


def _unwrap(obj, path: Path) -> dict:
    # Some official files wrap the tensors: {'state_dict': {...}, 'epoch': ..} (PiDiNet).
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return obj


def _reason(e: Exception) -> str:
    """The informative part of a loader error, without terminal colour codes or torch's advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    line = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), e.__class__.__name__)
    return " ".join(line.split())[:200]


def load_state_dict(path: str | os.PathLike, strip_prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file on CPU.

    A leading ``strip_prefix`` (DataParallel's ``module.``) is removed from every key that has it.
    Unreadable files raise :class:`WeightsError` naming the file and where to get a fresh copy.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingWeightsError(f"no weights file at {path}") from None
        if "Unsupported global" in str(e):  # a readable pickle holding non-tensor Python objects
            raise WeightsError(
                f"{path} holds Python objects that safe loading (torch.load(weights_only=True)) refuses; "
                f"only tensors and plain containers are accepted ({_reason(e)})"
            ) from e
        raise WeightsError(
            f"cannot read weights file {path} ({e.__class__.__name__}: {_reason(e)}); "
            f"it is corrupt, truncated or not a weights file — delete it and download it again "
            f"(official copy: {weights_url(path.name)})"
        ) from e
    sd = _unwrap(obj, path)
    if strip_prefix:
        sd = {(k[len(strip_prefix) :] if k.startswith(strip_prefix) else k): v for k, v in sd.items()}
    return sd


def check_keys(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise :class:`WeightsError` listing missing, unexpected and mis-shaped keys by name."""
    problems = key_problems(model.state_dict(), sd, optional=OPTIONAL_SUFFIXES)
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """Load ``sd`` into ``model`` (which may live on the ``meta`` device) with every key accounted for.

    Tensors are assigned, not copied, so a model built under ``torch.device("meta")`` becomes real.
    """
    check_keys(model, sd, source)
    sd = dict(sd)
    for k, v in model.state_dict().items():
        if k not in sd:  # only optional counters reach here
            sd[k] = torch.zeros(v.shape, dtype=v.dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# ---- model cache -------------------------------------------------------------------------------

_CACHE: OrderedDict[Hashable, object] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def set_cache_size(n: int) -> None:
    """How many loaded annotator models to keep (least recently used are dropped)."""
    global _CACHE_SIZE
    _CACHE_SIZE = max(0, int(n))
    with _CACHE_LOCK:
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


def clear_cache() -> None:
    """Forget every cached annotator model."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cached(key: Hashable, factory: Callable[[], object]):
    """``factory()`` memoised under ``key`` in the shared LRU."""
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = factory()
    with _CACHE_LOCK:
        if _CACHE_SIZE > 0:
            _CACHE[key] = value
            _CACHE.move_to_end(key)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return value


def resolve_dtype(dtype) -> torch.dtype:
    """Accept ``torch.float16`` or ``"float16"``/``"fp16"``/``"bf16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = names.get(str(dtype), str(dtype)).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return value


def file_key(path: Path) -> tuple:
    """Identity of a file on disk: replacing it invalidates cached models."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_model(
    filename: str,
    build: Callable[[], nn.Module],
    *,
    weights_dir=None,
    device="cpu",
    dtype=torch.float32,
    convert: Callable[[dict], dict] | None = None,
) -> nn.Module:
    """Locate ``filename``, build the architecture on ``meta``, load the weights, move to device/dtype.

    The result is in eval mode without gradients and is cached per (file, builder, device, dtype).
    """
    path = find_weights(filename, weights_dir)
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    key = ("annotator", file_key(path), f"{build.__module__}.{build.__qualname__}", str(device), dtype)

    def factory() -> nn.Module:
        sd = load_state_dict(path)
        if convert is not None:
            sd = convert(sd)
        with torch.device("meta"):
            model = build()
        load_into(model, sd, source=str(path))
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    return cached(key, factory)
