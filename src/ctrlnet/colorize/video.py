"""Video files through PyAV (``pip install av``): read RGB frames, write frames with a rate and size."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ctrlnet.atomic import atomic_path


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("video needs PyAV: pip install av") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int  # from the container; 0 when it does not say


def probe(path) -> VideoInfo:
    """Size, frame rate and (if stored) frame count of the first video stream."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise ValueError(f"{path} has no video stream")
            s = c.streams.video[0]
            fps = s.average_rate or s.guessed_rate or Fraction(25)
            return VideoInfo(s.codec_context.width, s.codec_context.height, Fraction(fps), int(s.frames or 0))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None


def read_frames(path) -> Iterator[np.ndarray]:
    """Decoded frames of the first video stream as (H, W, 3) uint8 RGB."""
    av = _av()
    try:
        with av.open(str(path)) as c:
            for frame in c.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode ({e})") from None


def count_frames(path) -> int:
    """Frames actually decodable (not the container's claim)."""
    return sum(1 for _ in read_frames(path))


def _codec_for(av) -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(frames: Iterable[np.ndarray], path, fps, size: tuple[int, int] | None = None,
                crf: int = 17) -> int:
    """Encode RGB frames to ``path`` at ``fps``; ``size`` = (width, height), default the first
    frame's. H.264 (``crf``) when FFmpeg has libx264, else MPEG-4 Part 2. The file is
    written under a temporary name and renamed, so a crash never leaves a truncated video.
    Returns the number of frames written."""
    import cv2

    av = _av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_path(path, keep_suffix=True) as tmp, av.open(str(tmp), mode="w") as c:
        stream = None
        for frame in frames:
            if stream is None:
                w, h = size or (frame.shape[1], frame.shape[0])
                codec = _codec_for(av)
                stream = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001 * 1000))
                stream.width, stream.height = w, h
                # 4:2:0 needs even sides; odd sizes keep full chroma (H.264) instead of being cropped
                even = w % 2 == 0 and h % 2 == 0
                stream.pix_fmt = "yuv420p" if even or codec != "libx264" else "yuv444p"
                if codec == "libx264":
                    stream.options = {"crf": str(crf)}
                else:
                    stream.bit_rate = 8_000_000
            if frame.shape[:2] != (h, w):
                frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(vf):
                c.mux(packet)
            n += 1
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode(None):
            c.mux(packet)
    return n
