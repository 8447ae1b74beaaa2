"""Reading weight files without ever executing a pickle.

``.safetensors`` are memory-mapped; ``.ckpt``/``.pth``/``.bin`` go through
``torch.load(weights_only=True)`` with inert stand-ins for a short allow-list of the non-tensor
globals that the original trainers' files carry (:data:`PICKLE_STAND_INS`). Every failure becomes
a :class:`CheckpointError` naming the file; messages are plain text (no terminal escape codes).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

# safetensors refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and the reason."""

    def __init__(self, message: str):
        super().__init__(plain(message))


def plain(text: str) -> str:
    """``text`` without terminal escape codes (torch's messages carry bold markers)."""
    return _ANSI.sub("", str(text))


@dataclass
class Checkpoint:
    """A state dict plus the safetensors metadata (empty for pickles) and the other top-level
    entries of a pickle that are not tensors but say something (``difference``, ``v_pred``, our
    ``ctrlnet_config``)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    # a safetensors file's tensors are views into one memory map of it; loaders read them through
    # this instead of through the map (None for pickles, or if the map is not laid out as expected)
    mapped: MappedFile | None = None

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


# Bytes of a file read and cast at a time: the piece, its fp32 staging and its output stay within
# a core's L2 cache; smaller pieces cost more in per-piece Python than they save.
PIECE_BYTES = 1 << 19
_WIDE = (torch.float32, torch.float64)  # casts to or from these are vectorised in torch already


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A sum is NaN/inf when any element is, and is cheap
    (no full-size boolean tensor); a finite tensor can still sum to inf (fp16 overflow), so only
    then look element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class MappedFile:
    """Where the tensors of one memory-mapped safetensors file lie, so that a loader can copy a
    tensor's bytes with a plain file read instead of through the map.

    Why: every page of a map that a copy touches stays in the process's resident set until the
    whole map is released, so converting a 2 GB fp16 file to fp32 through its map peaks at the
    fp32 weights plus the whole file. A file read leaves only the page cache (shared, reclaimable)
    behind. Holds the state dict, so the map stays alive while this object does.
    """

    def __init__(self, path: Path, state_dict: dict[str, torch.Tensor], header: dict, data_start: int):
        self.path, self._keep = path, state_dict
        self.base = self.size = 0
        self._fd: int | None = None
        self._lock, self._local = threading.Lock(), threading.local()
        bases = set()
        for k, info in header.items():
            t = state_dict.get(k)
            if t is None or not isinstance(info, dict) or t.numel() == 0:
                continue
            bases.add(t.data_ptr() - (data_start + int(info["data_offsets"][0])))
        if len(bases) == 1:  # one map of the whole file, as safetensors 0.4-0.8 make it
            self.base, self.size = bases.pop(), path.stat().st_size

    def offset(self, t: torch.Tensor) -> int | None:
        """The file offset of ``t``'s bytes if ``t`` is a contiguous CPU view into this map, else None."""
        if not self.size or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return None
        start = t.data_ptr() - self.base
        return start if 0 <= start and start + t.numel() * t.element_size() <= self.size else None

    def read_into(self, t: torch.Tensor, out: torch.Tensor) -> bool | None:
        """Copy ``t`` (a view into this map) into ``out`` (any floating dtype, same shape,
        contiguous or channels-last) by reading the file, and say whether every value that landed
        in ``out`` is finite; None if ``t`` is not in this map (the caller copies it then).

        The tensor is read in pieces of :data:`PIECE_BYTES`, each cast (and checked) while it is
        still in the CPU's cache, so a weight crosses main memory once on the way in and once on
        the way out. Casts between two 16-bit float types (fp16 <-> bf16) go through a per-thread
        fp32 piece: exact to fp32 and one rounding after, as torch's direct cast, but its vector
        paths are 2-3x faster than torch's scalar fp16 -> bf16 loop. Thread-safe (positional
        reads); the per-thread buffers are kept until :meth:`release`."""
        off = self.offset(t)
        if off is None:
            return None
        if out.is_contiguous() or t.ndim == 0:
            src, dst, cl = t.reshape(-1), out.view(-1), False  # any cut of a flat run is dense
        elif out.ndim == 4 and out.is_contiguous(memory_format=torch.channels_last):
            src, dst, cl = t, out, True  # channels-last: a run of dim-0 rows is a dense block
        else:
            raise ValueError(f"read_into: an output with strides {out.stride()} cannot be filled in dense pieces")
        row_bytes = max(1, src[0].numel()) * t.element_size() if src.shape[0] else 1
        per = max(1, PIECE_BYTES // row_bytes)  # rows per piece
        need = max(min(src.shape[0], per) * row_bytes, PIECE_BYTES)
        local = self._local
        for name, wanted in (("scratch", True), ("reorder", cl)):
            if wanted and (getattr(local, name, None) is None or getattr(local, name).numel() < need):
                setattr(local, name, torch.empty(need, dtype=torch.uint8))
        stage = None
        if t.dtype != out.dtype and t.dtype not in _WIDE and out.dtype not in _WIDE:
            if getattr(local, "stage", None) is None or local.stage.numel() * t.element_size() < need:
                local.stage = torch.empty(need // t.element_size(), dtype=torch.float32)
            stage = local.stage
        scratch = local.scratch
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
        view, finite = memoryview(scratch.numpy()), True
        for i in range(0, src.shape[0], per):
            m = min(per, src.shape[0] - i)
            nb = m * row_bytes
            self._pread(view[:nb], off + i * row_bytes)
            piece, o = scratch[:nb].view(t.dtype), dst[i:i + m]
            if cl:
                # reorder (O, I, kh, kw) -> (O, kh, kw, I) in the file's dtype first (a plain
                # gather); the cast after it runs on two dense runs, on torch's fast flat path
                c, h, w = t.shape[1:]
                reordered = local.reorder[:nb].view(t.dtype)
                reordered.view(m, h, w, c).copy_(piece.view(m, c, h, w).permute(0, 2, 3, 1))
                piece, o = reordered, o.permute(0, 2, 3, 1).view(-1)
            if stage is not None:
                piece = stage[:piece.numel()].copy_(piece)
            o.copy_(piece)
            finite = finite and all_finite(o)  # while the piece is still in the cache
        return finite

    def _pread(self, view: memoryview, off: int) -> None:
        got, n = 0, len(view)
        while got < n:
            k = os.preadv(self._fd, [view[got:]], off + got)
            if k <= 0:
                raise CheckpointError(f"{self.path}: file ended while reading a tensor; it changed while loading")
            got += k

    def release(self) -> None:
        """Free the scratch buffers and close the file (reopened if read again); call it when no
        thread reads any more."""
        self._local = threading.local()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


# --- pickle stand-ins ----------------------------------------------------------------------------
# The original trainers' ``.ckpt`` files (CompVis, lllyasviel) pickle a PyTorch Lightning
# ``ModelCheckpoint`` callback (as a dict key or object) and numpy scalars (``global_step``,
# ``epoch``). A1111's restricted unpickler allow-lists exactly these; we map them to inert classes
# that only store what the pickle hands them, so no code from the file ever runs.


class InertObject:
    """Stands in for an allow-listed class: keeps its constructor args and state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _NumpyDType:
    """Stand-in for ``numpy.dtype(code, align, copy)``; only numeric codes are honoured."""

    def __init__(self, code="f8", align=False, copy=True):
        self.code, self.byteorder = str(code), "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype, data=None):
    """Stand-in for ``numpy.core.multiarray.scalar``: the number as a Python int/float/bool."""
    import numpy as np

    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, bytearray)):
        return None
    try:
        dt = np.dtype(dtype.byteorder.replace("|", "=") + dtype.code)
    except TypeError:
        return None
    if dt.kind not in "biuf" or dt.itemsize != len(data):
        return None  # object or structured dtypes are never built
    return np.frombuffer(bytes(data), dtype=dt)[0].item()


_LIGHTNING_CALLBACKS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.model_checkpoint",  # the module itself, as some files reference it
)
#: ``(stand-in, "module.Name")`` pairs for ``torch.serialization.safe_globals``: the whole allow-list.
PICKLE_STAND_INS: tuple[tuple[object, str], ...] = (
    *((InertObject, name) for name in _LIGHTNING_CALLBACKS),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_NumpyDType, "numpy.dtype"),
)


# --- sniffing --------------------------------------------------------------------------------------


def _not_a_checkpoint(path: Path, head: bytes) -> str | None:
    """What a file is, from its first bytes, when it is clearly not a weight file."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"version https://git-lfs.github.com/spec"):
        return ("not a checkpoint: a git-lfs pointer (a small text file that stands for the real file); "
                "download the file again with git lfs pull or from the model page")
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<?xml")):
        return "not a checkpoint: an HTML page (a login or error page saved instead of the file); download the file again"
    if text.startswith((b"{", b"[")):
        return "not a checkpoint: a JSON text file"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "not a checkpoint: a tar archive; unpack it first"
    if head.startswith(b"\x1f\x8b"):
        return "not a checkpoint: a gzip-compressed file; unpack it first"
    return None


def _safetensors_header_length(path: Path, head: bytes) -> int | None:
    # The format is an 8-byte little-endian header length followed by a JSON header ('{').
    if len(head) < 9 or head[8:9] != b"{":
        return None
    return int.from_bytes(head[:8], "little")


def _read_safetensors(path: Path, n: int) -> Checkpoint:
    from safetensors import safe_open

    size = path.stat().st_size
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header length {n} bytes is beyond the {MAX_HEADER_BYTES}-byte "
                              "limit; the file is corrupt or not a safetensors file")
    if 8 + n > size:
        raise CheckpointError(f"{path}: file is truncated inside its safetensors header ({size} bytes, the header "
                              f"alone needs {8 + n}); download it again")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is corrupt ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is corrupt (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values() if isinstance(v, dict)), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: safetensors header is corrupt (an entry has no data_offsets)") from None
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
    try:
        mapped = MappedFile(path, sd, header, 8 + n)
    except (KeyError, TypeError, ValueError, IndexError, OSError):
        mapped = None  # reading through the map still works, only with a higher peak
    return Checkpoint(path, sd, {str(k): str(v) for k, v in dict(meta).items()}, mapped)


def _torch_load(path: Path):
    with torch.serialization.safe_globals(list(PICKLE_STAND_INS)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _read_pickle(path: Path, head: bytes) -> Checkpoint:
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            names = None  # a cut zip: torch.load reports it below
        if names is not None and not any(n.endswith("data.pkl") for n in names):
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise CheckpointError(f"{path}: not a checkpoint: a zip archive with no PyTorch data in it "
                                  f"(holds {len(names)} files: {shown}); unpack it first")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        msg = plain(str(e))
        # torch's restricted unpickler names what it refused; anything else is a broken pickle
        m = (re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"unrecognized function (<[^>]*>|[\w.]+)", msg)
             or re.search(r"but got (<class '[^']*'>)", msg))
        if m is None:
            detail = msg.split("WeightsUnpickler error:")[-1].strip().split("\n")[0][:200]
            raise CheckpointError(f"{path}: not a readable checkpoint, or truncated ({detail})") from None
        what = f"the global {m.group(1)}"
        raise CheckpointError(
            f"{path}: refused to load: the pickle refers to {what}, which is not a tensor and not on the "
            f"short allow-list of harmless globals (Lightning callbacks, numpy scalars); loading it could run "
            f"code from the file. Only use this file if you trust it, and re-save its tensors as safetensors "
            f"in an environment you are willing to expose."
        ) from None
    except Exception as e:  # torch.load raises many types (zip, EOF, safetensors, ...) on junk
        raise CheckpointError(
            f"{path}: not a readable checkpoint, or truncated ({e.__class__.__name__}: {plain(e)[:300]})"
        ) from None
    return _unwrap(obj, path)


def _flag(value) -> str | None:
    # scalars and empty tensors both count as markers (ComfyUI's ``v_pred`` is an empty tensor)
    if isinstance(value, torch.Tensor):
        return "1" if value.numel() == 0 else str(value.flatten()[0].item())
    if isinstance(value, (bool, int, float, str)):
        return str(value)
    return None


def _unwrap(obj, path: Path) -> Checkpoint:
    # Lightning checkpoints keep weights under "state_dict"; some trainers under "model"/"module".
    top = obj if isinstance(obj, dict) else {}
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: contains no tensors")
    # top-level markers beside the weights (sd-webui-controlnet's "difference", ComfyUI's "v_pred")
    meta = {}
    for src in (top, obj):
        for k in ("difference", "v_pred"):
            if k in src and (f := _flag(src[k])) is not None:
                meta[k] = f
    if isinstance(top.get("ctrlnet_config"), str):  # our config, as write_single_file stores it in pickles
        meta["ctrlnet_config"] = top["ctrlnet_config"]
    return Checkpoint(path, sd, meta)


def read_checkpoint(path) -> Checkpoint:
    """Read a ``.safetensors``/``.ckpt``/``.pth``/``.bin`` file (format sniffed from content).

    Raises :class:`CheckpointError` for a missing, empty, truncated, corrupt or non-checkpoint file
    (HTML page, git-lfs pointer, archive) and for a pickle that refers to anything beyond tensors
    and :data:`PICKLE_STAND_INS`.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        if not path.is_file():
            if path.is_symlink():
                raise CheckpointError(f"{path}: a broken symbolic link (or a loop of links); no file behind it")
            raise CheckpointError(f"no checkpoint file at {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:  # symlink loops, permissions
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    n = _safetensors_header_length(path, head)
    if n is not None:
        return _read_safetensors(path, n)
    if (what := _not_a_checkpoint(path, head)) is not None:
        raise CheckpointError(f"{path}: {what}")
    if size < 16:
        raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes)")
    return _read_pickle(path, head)
