"""Training data for the reference colorizer, in the shape the unmodified training loop takes.

Items follow :mod:`ctrlnet.training.data` (``jpg`` or ``latents``, ``hint``, ``txt``); the ``hint``
is *packed* (:func:`~ctrlnet.colorize.reference_model.pack_hint`): gray target channels followed
by the reference's VAE latent repeated over each 8x8 cell, ``(H, W, 3 + 4)``. The loop hands it to
:class:`~ctrlnet.colorize.reference_model.ReferenceControlNet`, which splits it again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ctrlnet.colorize.reference_model import pack_hint
from ctrlnet.image import ImageError, load_image
from ctrlnet.training.data import DataError, PairDataset, crop_pair


def packed_hint_hwc(gray: torch.Tensor, ref_latent: torch.Tensor) -> torch.Tensor:
    """``gray`` (H, W, 3) in [0, 1] and ``ref_latent`` (C, h, w) -> packed (H, W, 3 + C) float."""
    packed = pack_hint(gray.permute(2, 0, 1)[None].float(), ref_latent[None].float())
    return packed[0].permute(1, 2, 0)


class ReferenceLatentDataset(Dataset):
    """Pre-encoded triples: target posterior ``moments`` (N, 2C, h, w), scaled reference latents
    ``refs`` (N, C, h, w), gray targets ``grays`` uint8 (N, H, W) and prompts."""

    def __init__(self, moments: torch.Tensor, refs: torch.Tensor, grays: torch.Tensor, prompts: Sequence[str]):
        if not (len(moments) == len(refs) == len(grays) == len(prompts)):
            raise ValueError("moments, refs, grays and prompts differ in length")
        self.moments, self.refs, self.grays, self.prompts = moments, refs, grays, list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, key) -> dict:
        idx = key[0] if isinstance(key, tuple) else key
        gray = (self.grays[idx].float() / 255.0)[:, :, None].expand(-1, -1, 3)  # (H, W, 3)
        return {"latents": self.moments[idx].float(), "hint": packed_hint_hwc(gray, self.refs[idx]),
                "txt": self.prompts[idx], "skipped": []}


class ReferencePairDataset(PairDataset):
    """``video-pairs`` folders (prompt.json with a ``reference`` column) read from image files;
    the reference is cropped like the target and VAE-encoded (posterior mean) by ``vae``.

    For ``ctrlnet train``-style runs on image folders; the recipe uses the faster cached
    :class:`ReferenceLatentDataset`.
    """

    def __init__(self, rows, root, vae, **kwargs):
        kwargs.pop("crop_size", None)  # a second crop would need the reference cropped alike
        super().__init__(rows, root, **kwargs)
        self.vae = vae

    def load(self, idx: int, seed: int | None = None) -> dict:
        item = super().load(idx, seed)
        row = self.rows[idx]
        if "reference" not in row:
            raise DataError(f"{self.name}: row {idx} has no 'reference' field")
        path = self._path(row["reference"])
        try:
            ref = load_image(path)
            target = load_image(self._path(row["target"]))
        except ImageError as e:
            raise DataError(f"{path}: {e}") from None
        # the same seed gives the same crop window as the (source, target) crop above
        rng = np.random.default_rng(seed) if (self.random_crop and seed is not None) else None
        ref, _ = crop_pair(ref, target, self.resolution, rng)
        x = torch.from_numpy(ref.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
        p = next(self.vae.parameters())
        with torch.no_grad():
            lat = self.vae.encode_latents(x.to(p.device, p.dtype))[0].float().cpu()  # (C, h, w)
        item["hint"] = packed_hint_hwc(torch.from_numpy(item["hint"]), lat).numpy()
        return item


def reference_dataset(path, vae, **kwargs) -> ReferencePairDataset:
    """A :class:`ReferencePairDataset` from a ``video-pairs`` output folder (or its prompt.json)."""
    from pathlib import Path

    from ctrlnet.training.builders import read_jsonl

    p = Path(path)
    pj = p / "prompt.json" if p.is_dir() else p
    if not pj.is_file():
        raise DataError(f"no prompt.json at {pj}")
    return ReferencePairDataset(read_jsonl(pj), pj.parent, vae, name=str(pj), **kwargs)
