"""The work list of a batch job: one output per input, a seed per item, finished items skipped.

Pure bookkeeping (no torch, no models), so that every process of a multi-process job computes the
same list and the same seeds:

- inputs are the images directly in a folder (:data:`IMAGE_SUFFIXES`, hidden files left out),
  sorted by name; output ``k`` is ``OUT/<input stem>.png`` (PNG, whatever the input format);
- item seeds come from the job's seed and the item's *name* (:func:`item_seed`), not its position,
  so adding files to the folder or splitting the list over processes changes no image;
- an item is finished when its output exists: writers rename a complete temp file over the final
  name (:mod:`ctrlnet.atomic`), so a file under the final name is never half written, and the
  temp files of killed writers (``.NAME.<pid>.tmp``) are not outputs.

Follows A1111's "Batch" img2img tab (a folder in, the same names out) with its per-image seeds made
independent of the order of the work.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from ctrlnet.generation.request import MAX_SEED

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class BatchItem:
    """One input: its index in the sorted folder, its file, its output file and its seed."""

    index: int
    source: Path
    output: Path
    seed: int

    @property
    def done(self) -> bool:
        """Whether the output exists (complete by construction: it is renamed into place)."""
        return self.output.is_file()


def item_seed(seed: int, name: str) -> int:
    """The seed of the item whose input file is called ``name``: ``seed`` plus the CRC-32 of the name,
    modulo 2**32. The same for every process and every rerun; different files get different noise."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is out of range: a batch job needs a fixed seed between 0 and {MAX_SEED}")
    return (seed + zlib.crc32(name.encode("utf-8"))) % (MAX_SEED + 1)


def list_images(folder) -> list[Path]:
    """The image files directly in ``folder`` (by suffix, any case; hidden files skipped), sorted by
    name. ValueError when ``folder`` is missing, not a folder, or holds no images."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"input {folder} is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"input folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def output_name(source: Path) -> str:
    """The output file name of an input: its stem with ``.png``."""
    return f"{source.stem}.png"


def plan_items(inputs: list[Path], out_dir, seed: int, reserved_suffixes: tuple[str, ...] = ()) -> list[BatchItem]:
    """Items for ``inputs`` writing into ``out_dir``. ``reserved_suffixes``: other files each item
    writes next to its output, as name suffixes of its stem (``".control0.png"``).

    ValueError when the output folder is the input folder (outputs would replace inputs) or two
    items would write one file (``a.png`` and ``a.jpg``; ``a.png`` and an ``a.control0`` input).
    """
    out = Path(out_dir).expanduser()
    if inputs and out.resolve() == inputs[0].parent.resolve():
        raise ValueError(f"the output folder {out} is the input folder: choose another --out")
    owner: dict[str, Path] = {}
    items = []
    for i, src in enumerate(inputs):
        names = [output_name(src)] + [src.stem + s for s in reserved_suffixes]
        for name in names:
            if name in owner:
                raise ValueError(f"{src.name} and {owner[name].name} would both write {out / name}; "
                                 "rename one of them")
            owner[name] = src
        items.append(BatchItem(i, src, out / output_name(src), item_seed(seed, src.name)))
    return items


def pending(items: list[BatchItem]) -> list[BatchItem]:
    """The items whose output is not there yet, in order."""
    return [it for it in items if not it.done]
