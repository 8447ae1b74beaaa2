"""Training data sets: the original ``prompt.json`` layout and the Hugging Face image folder.

Items are dicts in the original ``tutorial_dataset.py`` convention: ``jpg`` = target ``(H, W, 3)``
float32 in ``[-1, 1]``, ``hint`` = control ``(H, W, 3)`` float32 in ``[0, 1]``, ``txt`` = prompt.
A data set may instead give ``latents`` (the VAE posterior moments, see :class:`LatentDataset`).

A bad or missing file never ends a run anonymously: it is skipped with a warning naming it (the
next good example takes its place, and ``item["skipped"]`` lists the names so the loop can count
them across workers), or, with ``strict=True``, raised as :class:`DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ctrlnet.image import ImageError, load_image
from ctrlnet.training.builders import read_jsonl


class DataError(ValueError):
    """A data set file that cannot be used; the message names it."""


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    if x.shape[:2] == (h, w):
        return x
    interp = cv2.INTER_AREA if h * w < x.shape[0] * x.shape[1] else cv2.INTER_LANCZOS4
    return cv2.resize(x, (w, h), interpolation=interp)


def crop_pair(source: np.ndarray, target: np.ndarray, resolution: int | None,
              rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Resize/crop source and target alike to a size that is a multiple of 64.

    ``resolution``: scale the short side to it and crop a square of that side; None keeps the
    scale and crops each side down to a multiple of 64. ``rng`` None crops the centre.
    """
    h, w = target.shape[:2]
    source = _resize(source, h, w)  # annotators may round sizes; the target is the reference
    if resolution is not None:
        if resolution % 64 or resolution < 64:
            raise ValueError(f"resolution must be a positive multiple of 64, got {resolution}")
        k = resolution / min(h, w)
        h, w = max(resolution, round(h * k)), max(resolution, round(w * k))
        source, target = _resize(source, h, w), _resize(target, h, w)
        ch = cw = resolution
    else:
        ch, cw = h // 64 * 64, w // 64 * 64
        if ch == 0 or cw == 0:
            raise ImageError(f"image of {w}x{h} pixels is smaller than 64; give a resolution")
    y0 = int(rng.integers(0, h - ch + 1)) if rng is not None else (h - ch) // 2
    x0 = int(rng.integers(0, w - cw + 1)) if rng is not None else (w - cw) // 2
    return source[y0:y0 + ch, x0:x0 + cw], target[y0:y0 + ch, x0:x0 + cw]


class PairDataset(Dataset):
    """(source, target, prompt) rows with image paths relative to ``root``.

    Indexing takes an int or ``(index, seed)``; the seed drives the random crop, so an item is a
    pure function of the key (exact resumption, any number of workers).
    """

    def __init__(self, rows: Sequence[dict], root, resolution: int | None = None,
                 invert_source: bool = False, random_crop: bool = True, strict: bool = False,
                 name: str = "data set", crop_size: int | None = None):
        self.rows = list(rows)
        if not self.rows:
            raise DataError(f"{name} has no rows")
        self.root = Path(root)
        self.resolution = resolution
        self.invert_source = invert_source
        self.random_crop = random_crop
        self.strict = strict
        self.name = name
        self.crop_size = crop_size  # a further crop at native scale (e.g. VAE training on patches)
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def record(self) -> dict:
        """What a checkpoint records of this data set, so that a resume on other data is noticed
        (:func:`ctrlnet.training.resume_settings.resume_input_changes`): the number of examples, a
        SHA-256 of the rows (image paths relative to the data folder, so a moved folder is the
        same data) and the settings that change the images trained on."""
        rows = [{k: self._relative(v) if k in ("source", "target") else v for k, v in r.items()} for r in self.rows]
        blob = json.dumps(rows, sort_keys=True, default=str).encode()
        return {"examples": len(self.rows), "rows_sha256": hashlib.sha256(blob).hexdigest(),
                "resolution": self.resolution, "invert_source": self.invert_source,
                "random_crop": self.random_crop, "crop_size": self.crop_size}

    def _relative(self, path) -> str:
        p = Path(str(path))
        try:
            return p.relative_to(self.root).as_posix() if p.is_absolute() else p.as_posix()
        except ValueError:
            return p.as_posix()

    def _path(self, rel) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def load(self, idx: int, seed: int | None = None) -> dict:
        """The item at ``idx``; raises :class:`DataError` naming the bad file."""
        row = self.rows[idx]
        images = []
        for key in ("source", "target"):
            if key not in row:
                raise DataError(f"{self.name}: row {idx} has no {key!r} field")
            path = self._path(row[key])
            try:
                images.append(load_image(path))
            except ImageError as e:
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                raise DataError(msg) from None
        source, target = images
        if self.invert_source:
            source = 255 - source  # white-background line art -> white lines on black, as trained
        rng = np.random.default_rng(seed) if (self.random_crop and seed is not None) else None
        try:
            source, target = crop_pair(source, target, self.resolution, rng)
        except ImageError as e:
            raise DataError(f"{self._path(row['target'])}: {e}") from None
        if self.crop_size:
            c = self.crop_size
            h, w = target.shape[:2]
            y0 = int(rng.integers(0, h - c + 1)) if rng is not None else (h - c) // 2
            x0 = int(rng.integers(0, w - c + 1)) if rng is not None else (w - c) // 2
            source, target = source[y0:y0 + c, x0:x0 + c], target[y0:y0 + c, x0:x0 + c]
        return {
            "jpg": target.astype(np.float32) / 127.5 - 1.0,  # (H, W, 3) in [-1, 1]
            "hint": source.astype(np.float32) / 255.0,  # (H, W, 3) in [0, 1]
            "txt": str(row.get("prompt", "")),
        }

    def __getitem__(self, key) -> dict:
        idx, seed = key if isinstance(key, tuple) else (key, None)
        skipped: list[str] = []
        for k in range(len(self.rows)):
            j = (idx + k) % len(self.rows)
            try:
                item = self.load(j, seed)
            except DataError as e:
                if self.strict:
                    raise
                warnings.warn(f"skipping bad example: {e}", stacklevel=2)
                self.skipped.add(str(e))
                skipped.append(str(e))
                continue
            item["skipped"] = skipped
            return item
        raise DataError(f"{self.name}: no readable example ({len(skipped)} bad)")

    def check(self) -> list[str]:
        """Load every example once; return the messages of the bad ones (each names its file)."""
        bad = []
        for i in range(len(self.rows)):
            try:
                self.load(i)
            except DataError as e:
                bad.append(str(e))
        return bad


def prompt_json_dataset(root, **kwargs) -> PairDataset:
    """The original layout: ``root/prompt.json`` with ``source``/``target``/``prompt`` per line."""
    root = Path(root)
    pj = root / "prompt.json" if root.is_dir() else root
    if not pj.is_file():
        raise DataError(f"no prompt.json at {pj}")
    try:
        rows = read_jsonl(pj, required=("source", "target"))
    except ValueError as e:  # a malformed line or a row without the fields, named by line number
        raise DataError(str(e)) from None
    return PairDataset(rows, pj.parent, name=str(pj), **kwargs)


def imagefolder_dataset(root, image_column: str = "image", conditioning_image_column: str = "conditioning_image",
                        caption_column: str = "text", **kwargs) -> PairDataset:
    """Hugging Face image-folder layout: ``root/metadata.jsonl`` with image, conditioning image and
    caption columns (``file_name`` stands in for a missing image column, as imagefolder does)."""
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"no metadata.jsonl at {meta}")
    rows = []
    for i, r in enumerate(read_jsonl(meta), 1):
        image = r.get(image_column, r.get("file_name"))
        if image is None or conditioning_image_column not in r:
            raise DataError(f"{meta}:{i}: needs {image_column!r} (or 'file_name') and "
                            f"{conditioning_image_column!r} columns; has {sorted(r)}")
        rows.append({"source": r[conditioning_image_column], "target": image,
                     "prompt": r.get(caption_column, "")})
    return PairDataset(rows, root, name=str(meta), **kwargs)


def open_dataset(path, **kwargs) -> PairDataset:
    """A data set from a folder holding ``prompt.json`` or ``metadata.jsonl`` (or either file)."""
    p = Path(path)
    if p.is_file():
        p_root, name = p.parent, p.name
    else:
        p_root, name = p, None
    column_args = {k: kwargs.pop(k) for k in ("image_column", "conditioning_image_column", "caption_column")
                   if k in kwargs}
    if name == "prompt.json" or (name is None and (p_root / "prompt.json").is_file()):
        return prompt_json_dataset(p_root, **kwargs)
    if name == "metadata.jsonl" or (name is None and (p_root / "metadata.jsonl").is_file()):
        return imagefolder_dataset(p_root, **column_args, **kwargs)
    raise DataError(f"{path}: no prompt.json or metadata.jsonl found")


class LatentDataset(Dataset):
    """Pre-encoded examples: VAE posterior ``moments`` ``(N, 2C, h, w)``, hints uint8 ``(N, H, W, 3)``
    (or ``(N, H, W)`` gray)
    and prompts. Training samples a latent from the moments, as it would from the VAE."""

    def __init__(self, moments: torch.Tensor, hints: torch.Tensor, prompts: Sequence[str]):
        if not (len(moments) == len(hints) == len(prompts)):
            raise ValueError("moments, hints and prompts differ in length")
        self.moments, self.hints, self.prompts = moments, hints, list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def record(self) -> dict:
        """As :meth:`PairDataset.record`: the number of examples and a SHA-256 of the prompts, the
        moments' shape and the hints' shape (the tensors themselves are not hashed: they are large,
        and made from the prompts' images)."""
        blob = json.dumps([self.prompts, list(self.moments.shape), list(self.hints.shape)]).encode()
        return {"examples": len(self.prompts), "rows_sha256": hashlib.sha256(blob).hexdigest()}

    def __getitem__(self, key) -> dict:
        idx = key[0] if isinstance(key, tuple) else key
        hint = self.hints[idx].float() / 255.0
        if hint.ndim == 2:  # stored as one gray channel to save memory
            hint = hint[:, :, None].expand(-1, -1, 3)
        return {"latents": self.moments[idx].float(), "hint": hint, "txt": self.prompts[idx], "skipped": []}


def dataset_record(dataset) -> dict | None:
    """``dataset.record()`` when the data set has one (:class:`PairDataset`, :class:`LatentDataset`),
    else its length, else None (a data set given through the Python API without either)."""
    if hasattr(dataset, "record"):
        return dataset.record()
    try:
        return {"examples": len(dataset)}
    except TypeError:
        return None


def worker_message(e: DataError) -> str:
    """The message of a :class:`DataError` raised in a data loader worker: torch re-raises it in the
    main process with the worker's whole traceback as its text; the message is its last line."""
    text = str(e)
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    return text.rsplit(marker, 1)[1].strip() if "Original Traceback" in text and marker in text else text


def collate(items: Sequence[dict]) -> dict:
    """Stack arrays, keep prompts as a list and flatten the ``skipped`` lists.

    Raises :class:`DataError` when the examples of one batch differ in size (a data set of mixed
    image sizes trained without a resolution, which keeps each example's own size), saying how
    to train on it; torch's own error named neither the cause nor the fix."""
    out: dict = {"skipped": [s for it in items for s in it.get("skipped", [])]}
    for key in items[0]:
        if key == "skipped":
            continue
        vals = [it[key] for it in items]
        if isinstance(vals[0], str):
            out[key] = list(vals)
            continue
        vals = [torch.as_tensor(v) for v in vals]
        shapes = sorted({tuple(v.shape) for v in vals})
        if len(shapes) > 1:
            sizes = " and ".join(f"{s[1]}x{s[0]}" if key in ("jpg", "hint") else "x".join(map(str, s))
                                 for s in shapes)
            raise DataError(f"the examples of one batch differ in size ({key}: {sizes}); the data set's images "
                            "are not all one size: train with --resolution N (a multiple of 64: every example "
                            "scaled and cropped to N x N), or with --batch-size 1")
        out[key] = torch.stack(vals)
    return out
