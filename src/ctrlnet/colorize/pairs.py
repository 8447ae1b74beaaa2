"""Training triples for the reference colorizer from videos: ``ctrlnet data video-pairs``.

For each reference frame i, the first later frame j with ``j - i >= min_gap`` (looking at most
``max_gap`` frames ahead) whose similarity to frame i lies in ``[low, high]`` makes a pair (the search for frame i
stops at the first candidate less similar than ``low``, as motion rarely returns to it): the
colour frame i is the reference, frame j gives the grayscale target (its Lab lightness) and the
colour target. After a pair, the next reference is at least ``stride`` frames later.

Similarity measure: the mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 = 0.01,
K2 = 0.03, 8-bit range) of the two frames' Lab lightness, after shrinking both so the short side
is at most 256 px. 1 means identical; 0.94-0.97 is the same shot a little later with visible
motion: similar enough for the reference's colours to apply, different enough to teach the model
to move them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ctrlnet.colorize.lab import lightness, to_gray

SIMILARITY_SIZE = 256


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W) uint8/float images in 0..255 (Gaussian 11x11 window, sigma 1.5)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def similarity_key(frame: np.ndarray, size: int = SIMILARITY_SIZE) -> np.ndarray:
    """What the similarity compares: the lightness, short side shrunk to at most ``size``."""
    L = lightness(frame)
    h, w = L.shape
    k = size / min(h, w)
    if k < 1:
        L = cv2.resize(L, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    return L


def frame_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The documented similarity of two RGB frames (see the module docstring)."""
    return ssim(similarity_key(a), similarity_key(b))


@dataclass(frozen=True)
class Pair:
    reference: int
    target: int
    similarity: float


def select_pairs(frames: Iterable[np.ndarray], low: float = 0.94, high: float = 0.97, min_gap: int = 3,
                 max_gap: int = 30, stride: int | None = None, on_pair=None) -> list[Pair]:
    """Pairs from a frame stream, holding at most ``max_gap + 1`` frames in memory.

    ``on_pair(pair, reference_frame, target_frame)`` is called for each pair as it is found.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"similarity range must satisfy 0 <= low <= high <= 1, got {low}, {high}")
    if min_gap < 1 or max_gap < min_gap:
        raise ValueError(f"need 1 <= min_gap <= max_gap, got {min_gap}, {max_gap}")
    stride = min_gap if stride is None else stride
    buf: deque = deque()  # (index, frame, similarity key)
    pairs: list[Pair] = []
    next_ref = 0

    def process_front():
        nonlocal next_ref
        i, fi, ki = buf[0]
        if i >= next_ref:
            for j, fj, kj in buf:
                if j - i < min_gap:
                    continue
                s = ssim(ki, kj)
                if s < low:
                    break  # frames further on are, as a rule, less similar still
                if s <= high:
                    p = Pair(i, j, s)
                    pairs.append(p)
                    if on_pair is not None:
                        on_pair(p, fi, fj)
                    next_ref = i + max(stride, 1)
                    break
        buf.popleft()

    for idx, frame in enumerate(frames):
        buf.append((idx, frame, similarity_key(frame)))
        if idx - buf[0][0] >= max_gap:
            process_front()
    while buf:
        process_front()
    return pairs


def _resize_short(img: np.ndarray, resolution: int | None) -> np.ndarray:
    if not resolution:
        return img
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))), interpolation=interp)


PROGRESS = "progress"  # out/progress/<k>.jsonl: the rows of each finished source, until prompt.json is written


def frame_pairs(sources: Sequence[tuple[str, Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]]], out,
                low: float = 0.94, high: float = 0.97, min_gap: int = 3, max_gap: int = 30,
                stride: int | None = None, resolution: int | None = None, prompt: str = "",
                progress: bool = False, resume: bool = False, overwrite: bool = False,
                settings: Mapping | None = None, inputs: Iterable = (), say=print) -> list[dict]:
    """Write ``out/{reference,gray,color}/*.png`` and ``out/prompt.json`` for the pairs of each
    ``(name, frames)`` source (RGB uint8 frames, streamed; ``frames`` may be a zero-argument
    callable, called only for a source that is not finished yet); returns the rows (``source`` =
    gray target, ``target`` = colour target, ``reference`` = colour reference, plus ``prompt``,
    ``similarity``, ``video`` (the name), ``frames``).

    Resumable by source: the rows of each finished source are kept in ``out/progress/`` until
    ``prompt.json`` is written, and ``resume`` (same settings: the pair settings, the source names
    and ``settings``, which says what the sources are; see
    :func:`~ctrlnet.training.run_folder.claim_job_folder`) skips those sources. A folder holding
    earlier output needs ``resume`` or ``overwrite`` (``OutputInUse``, a ``ValueError``)."""
    import shutil

    from ctrlnet.image import save_image
    from ctrlnet.training.builders import read_jsonl, write_jsonl
    from ctrlnet.training.run_folder import claim_job_folder

    sources = list(sources)
    record = {"builder": "frame-pairs", "sources": [str(name) for name, _ in sources], **(settings or {}),
              "similarity": [low, high], "min_gap": min_gap, "max_gap": max_gap, "stride": stride,
              "resolution": resolution, "prompt": prompt}
    out = claim_job_folder(out, record, resume=resume, overwrite=overwrite, kind="data set", inputs=inputs,
                           say=say)
    if resume and (out / "prompt.json").is_file() and not (out / PROGRESS).exists():
        return read_jsonl(out / "prompt.json")  # finished already
    for sub in ("reference", "gray", "color", PROGRESS):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for k, (name, frames) in enumerate(sources):
        stem = f"{k:03d}_{Path(str(name)).stem}"
        done = out / PROGRESS / f"{k:03d}.jsonl"
        if done.is_file():  # finished before an interruption
            rows += read_jsonl(done)
            continue
        first = len(rows)

        def write(p: Pair, ref: np.ndarray, tgt: np.ndarray, stem=stem, name=name):
            fname = f"{stem}_{p.reference:06d}_{p.target:06d}.png"
            ref, tgt = _resize_short(ref, resolution), _resize_short(tgt, resolution)
            save_image(ref, out / "reference" / fname)
            save_image(to_gray(tgt), out / "gray" / fname)
            save_image(tgt, out / "color" / fname)
            rows.append({"source": f"gray/{fname}", "target": f"color/{fname}", "reference": f"reference/{fname}",
                         "prompt": prompt, "similarity": round(p.similarity, 5), "video": str(name),
                         "frames": [p.reference, p.target]})

        found = select_pairs(frames() if callable(frames) else frames, low, high, min_gap, max_gap, stride,
                             on_pair=write)
        write_jsonl(done, rows[first:])
        if progress:
            print(f"{name}: {len(found)} pairs", flush=True)
    write_jsonl(out / "prompt.json", rows)
    shutil.rmtree(out / PROGRESS)
    return rows


def video_pairs(videos: Sequence, out, low: float = 0.94, high: float = 0.97, min_gap: int = 3,
                max_gap: int = 30, stride: int | None = None, resolution: int | None = None,
                prompt: str = "", progress: bool = False, resume: bool = False, overwrite: bool = False,
                say=print) -> list[dict]:
    """:func:`frame_pairs` of video files (decoded with PyAV, one at a time; a resumed run does
    not decode the videos finished before). The job record names each video by resolved path and
    size, so resuming with other files is refused."""
    from ctrlnet.colorize.video import read_frames

    settings = {"builder": "video-pairs", "videos": [str(Path(v).resolve()) for v in videos],
                "video_bytes": [Path(v).stat().st_size for v in videos]}
    return frame_pairs([(Path(v), lambda v=v: read_frames(v)) for v in videos], out, low, high, min_gap, max_gap,
                       stride, resolution, prompt, progress, resume=resume, overwrite=overwrite,
                       settings=settings, inputs=videos, say=say)
