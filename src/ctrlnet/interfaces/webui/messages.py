"""What the browser is told when something goes wrong: readable, and free of server paths.

Every handler turns the errors it expects (bad settings, unusable uploads, missing weights) into
``gr.Error`` through :func:`error`; Gradio shows them as a toast. Messages are plain text: paths on
this machine are reduced to their file name, and angle brackets (which the toast would read as
HTML tags and drop, cutting "weights_dir=<folder>" to "weights_dir=") become ‹ ›.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

# An absolute POSIX or Windows path (a run of non-space characters after a leading / or X:\).
_PATH = re.compile(r"(?<![\w/:.])(?:[A-Za-z]:\\|/)(?:[^\s'\",;()\[\]]+)")


def scrub(text: str) -> str:
    """``text`` with every absolute path replaced by its last component and ``<``/``>`` replaced.
    URLs are kept (their ``//`` is not a path start)."""
    def short(m: re.Match) -> str:
        name = Path(m.group(0).rstrip(".:")).name
        tail = m.group(0)[len(m.group(0).rstrip(".:")):]
        return (name or "…") + tail

    text = _PATH.sub(short, str(text))
    return text.replace("<", "‹").replace(">", "›")


def error(e: BaseException | str) -> gr.Error:
    """A ``gr.Error`` for an exception (or a message), shown until closed for long messages."""
    from ctrlnet.annotators.weights import MissingWeightsError

    if isinstance(e, MissingWeightsError):
        msg = f"Missing weights: {e}"
    elif isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    else:
        msg = str(e) if isinstance(e, str) else (str(e) or type(e).__name__)
    msg = scrub(msg)
    return gr.Error(msg, duration=None if len(msg) > 120 else 10, print_exception=False)


def read_upload(value, what: str, keep_alpha: bool = False):
    """An uploaded image read by ctrlnet's one loader (EXIF orientation, 16-bit and float ranges,
    alpha) from the file path Gradio hands over; arrays (Python callers) pass through; ``None``
    stays ``None``. An unusable file raises ``gr.Error`` naming ``what`` and what the file is."""
    from ctrlnet.image import ImageError, load_image

    if value is None or not isinstance(value, (str, Path)):
        return value
    try:
        return load_image(value, keep_alpha=keep_alpha)
    except ImageError as e:
        raise error(f"The {what} is not a usable image: {_describe(Path(value))} ({e})") from None


def _describe(path: Path) -> str:
    """What an unreadable upload looks like (its name, size and the kind its first bytes suggest)."""
    try:
        head = path.read_bytes()[:16]
        size = path.stat().st_size
    except OSError:
        return f"{path.name} could not be read"
    kinds = [(b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "a gzip file"),
             (b"GIF8", "a GIF image"), (b"\x89PNG", "a PNG file"), (b"\xff\xd8", "a JPEG file"),
             (b"RIFF", "a RIFF (WebP/AVI/WAV) file"), (b"<", "an HTML/XML/SVG text file"), (b"{", "a JSON text")]
    kind = next((k for magic, k in kinds if head.startswith(magic)), None)
    if kind is None:
        kind = "a text file" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown data"
    return f"{path.name} ({size} bytes) looks like {kind}"
