"""Data set builders: fill50k-style circles, control maps from images, captions from sidecar files.

All builders write the original ``prompt.json`` layout (one JSON object a line with ``source``,
``target``, ``prompt``; paths relative to the data set folder). Images are written atomically and
``prompt.json`` last, so an interrupted build never looks complete. The output folder follows
:mod:`ctrlnet.training.run_folder`: a fresh build refuses a folder with anything in it; ``resume``
continues an interrupted build with the same settings (recorded in ``job.json``), skipping the
examples already written; ``overwrite`` moves the earlier folder aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from ctrlnet.atomic import atomic_path
from ctrlnet.image import ImageError, load_image, save_image
from ctrlnet.training.colors import COLORS, color_pairs, fill50k_prompt
from ctrlnet.training.run_folder import claim_job_folder

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def write_jsonl(path, rows: Iterable[Mapping]) -> Path:
    """Write one JSON object a line, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a JSON-lines file; a malformed line is reported with its (1-based) number.

    ``required``: fields every row must have; the first row that is not a JSON object or lacks
    one raises ValueError naming the line, the missing fields and the fields it has (so a data set
    written with other column names fails before any model loads, not row by row in training).
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if required:
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: a row must be a JSON object with fields "
                                     f"{', '.join(map(repr, required))}; got {type(row).__name__}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ValueError(f"{path}:{i}: no {' or '.join(map(repr, missing))} field (has "
                                     f"{', '.join(map(repr, sorted(row))) or 'none'}); every row needs "
                                     f"{', '.join(map(repr, required))}")
            rows.append(row)
    return rows


def draw_fill50k(size: int, center: tuple[int, int], radius: int, circle_rgb, background_rgb,
                 thickness: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(hint, target) uint8 HWC: a white circle outline on black, and the filled circle."""
    hint = np.zeros((size, size, 3), np.uint8)
    cv2.circle(hint, center, radius, (255, 255, 255), thickness, lineType=cv2.LINE_AA)
    target = np.empty((size, size, 3), np.uint8)
    target[:] = background_rgb
    cv2.circle(target, center, radius, tuple(int(c) for c in circle_rgb), -1, lineType=cv2.LINE_AA)
    return hint, target


def make_fill50k(out, n: int, size: int = 512, seed: int = 0, colors: Mapping = COLORS,
                 min_radius_frac: float = 0.12, max_radius_frac: float = 0.38,
                 pairs: Sequence[tuple[str, str]] | None = None, resume: bool = False,
                 overwrite: bool = False, say=print) -> Path:
    """Write ``n`` fill50k-style examples under ``out`` and return the ``prompt.json`` path.

    Each example draws a (circle, background) pair uniformly from ``pairs`` (default: every pair
    of ``colors`` far enough apart, :func:`~ctrlnet.training.colors.color_pairs`). Each row also
    carries ``circle: [cx, cy, r]`` and the colour names, which ``benchmarks/fidelity.py`` uses;
    the training data sets ignore extra keys. Every example is a pure function of (settings,
    index), so ``resume`` writes only the missing images and ends with the same files as an
    uninterrupted build. ValueError for an empty ``pairs`` or a pair naming a colour ``colors``
    lacks; ``OutputInUse`` (a ``ValueError``) for a folder that holds an earlier build, unless
    ``resume`` or ``overwrite``.
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    given = None if pairs is None else [tuple(p) for p in pairs]
    pairs = color_pairs(dict(colors)) if given is None else given
    if not pairs:
        raise ValueError("no colour pairs to draw from")
    unknown = sorted({c for p in pairs for c in p} - set(colors))
    if unknown:
        raise ValueError(f"pairs name colours outside the vocabulary: {unknown[:5]}")
    # pairs=None is recorded as such (the default pairs follow from the colours); given pairs by a
    # digest, as a vocabulary's thousands of pairs would swell the record
    digest = None if given is None else hashlib.sha256(json.dumps(given).encode()).hexdigest()[:16]
    settings = {"builder": "fill50k", "n": n, "size": size, "seed": seed, "colors": dict(colors),
                "radius": [min_radius_frac, max_radius_frac], "pairs": digest}
    out = claim_job_folder(out, settings, resume=resume, overwrite=overwrite, kind="data set", say=say)
    rng = np.random.default_rng(seed)
    rows = []
    width = len(str(n - 1))
    thickness = max(1, size // 64)
    for i in range(n):
        circle, background = pairs[rng.integers(len(pairs))]
        r = int(rng.integers(int(size * min_radius_frac), int(size * max_radius_frac) + 1))
        margin = r + thickness + 1
        cx, cy = (int(v) for v in rng.integers(margin, size - margin + 1, size=2))
        name = f"{i:0{width}d}.png"
        missing = [k for k in ("source", "target") if not (out / k / name).is_file()]  # all, unless resumed
        if missing:
            drawn = dict(zip(("source", "target"),
                             draw_fill50k(size, (cx, cy), r, colors[circle], colors[background], thickness)))
            for k in missing:
                save_image(drawn[k], out / k / name)
        rows.append({"source": f"source/{name}", "target": f"target/{name}",
                     "prompt": fill50k_prompt(circle, background), "circle": [cx, cy, r],
                     "circle_color": circle, "background_color": background})
    return write_jsonl(out / "prompt.json", rows)


def _images_in(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def sidecar_caption(image: Path) -> str | None:
    """The caption in ``image.txt``'s twin (same stem, ``.txt``), or None."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip()
    return None


def annotate(images, out, annotator: str = "canny", params: Mapping | None = None,
             resolution: int | None = None, strict: bool = False, resume: bool = False,
             overwrite: bool = False, say=print) -> tuple[Path, list[str]]:
    """Make control maps for every image under ``images`` (the original gradio_annotator step).

    Writes ``out/target/`` (copies as PNG), ``out/source/`` (control maps) and ``out/prompt.json``
    with captions from sidecar ``.txt`` files (empty when absent). Unreadable images are skipped
    with a warning and returned by name; ``strict=True`` raises on the first one instead.
    ``resume`` continues an interrupted run with the same settings, skipping images whose pair is
    written; a folder holding earlier output needs ``resume`` or ``overwrite`` (``OutputInUse``).
    """
    from ctrlnet.annotators import run_annotator
    from ctrlnet.image import resize_image

    files = _images_in(images)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {images}")
    settings = {"builder": "annotate", "images": str(Path(images).resolve()), "annotator": annotator,
                "params": dict(params or {}), "resolution": resolution}
    out = claim_job_folder(out, settings, resume=resume, overwrite=overwrite, kind="data set", inputs=[images],
                           say=say)
    rows, bad = [], []
    root = Path(images)
    for path in files:
        rel = path.relative_to(root).with_suffix(".png")
        if (out / "target" / rel).is_file() and (out / "source" / rel).is_file():  # done before a resume
            rows.append({"source": f"source/{rel.as_posix()}", "target": f"target/{rel.as_posix()}",
                         "prompt": sidecar_caption(path) or ""})
            continue
        try:
            img = load_image(path)
        except ImageError as e:
            if strict:
                raise
            warnings.warn(f"skipping {path}: {e}")
            bad.append(str(path))
            continue
        if resolution:
            img = resize_image(img, resolution)
        control = run_annotator(annotator, img, **dict(params or {}))
        save_image(img, out / "target" / rel)
        save_image(control, out / "source" / rel)
        rows.append({"source": f"source/{rel.as_posix()}", "target": f"target/{rel.as_posix()}",
                     "prompt": sidecar_caption(path) or ""})
    write_jsonl(out / "prompt.json", rows)
    return out / "prompt.json", bad


def merge_captions(root, captions: str | os.PathLike | None = None, overwrite: bool = True) -> tuple[int, list[str]]:
    """Fill ``prompt`` in ``root/prompt.json`` from sidecar ``.txt`` files.

    The caption of a row is ``<captions>/<target stem>.txt`` if ``captions`` is given, else the
    ``.txt`` next to the target image. Returns (rows updated, targets without a caption).
    ``overwrite=False`` keeps prompts that are already non-empty.
    """
    root = Path(root)
    pj = root / "prompt.json"
    rows = read_jsonl(pj)
    updated, missing = 0, []
    for row in rows:
        if not overwrite and row.get("prompt"):
            continue
        target = root / row["target"]
        txt = (Path(captions) / target.name).with_suffix(".txt") if captions else target.with_suffix(".txt")
        if txt.is_file():
            row["prompt"] = txt.read_text(encoding="utf-8").strip()
            updated += 1
        else:
            missing.append(row["target"])
    write_jsonl(pj, rows)
    return updated, missing
