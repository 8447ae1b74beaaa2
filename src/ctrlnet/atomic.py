"""Atomic file writes, and the temp files that killed writers leave behind.

Every writer in ctrlnet makes ``NAME`` by writing ``.NAME.<pid>.tmp`` in the same folder first
(``.NAME.<pid>.tmp.EXT`` where the encoder picks the format from the extension: images, video),
flushing it to disk and renaming it over ``NAME`` with :func:`os.replace`. A reader therefore sees
the old file or the new one, never half of one. A process killed in the middle (SIGKILL, power
loss) cannot remove its temp file; because the name carries the writer's process id, a later job
can tell an abandoned temp file (its process is gone) from a write still in progress, and
:func:`remove_stale_temps` removes only the former, and only names of this pattern.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# ".NAME.PID.tmp" or ".NAME.PID.tmp.EXT"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(?P<ext>\.[A-Za-z0-9]{1,8})?$")


def temp_path(path, keep_suffix: bool = False) -> Path:
    """The temp name our writers use for ``path``: ``.NAME.<pid>.tmp`` (``.NAME.<pid>.tmp.EXT``
    with ``keep_suffix``, for writers that choose the format by extension)."""
    path = Path(path)
    ext = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{ext}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, keep_suffix: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield the temp path to write ``path`` to; on success it is synced and renamed over
    ``path``, on any error (or ``KeyboardInterrupt``) it is removed and ``path`` is untouched.

    >>> with atomic_path("out/model.safetensors") as tmp:
    ...     save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temp_owner(path) -> int | None:
    """The process id in a temp name of our pattern, or None for any other name."""
    m = _TEMP.match(Path(path).name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (True when that cannot be told)."""
    if pid <= 0:
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_temps(folder, recursive: bool = True, names: tuple[str, ...] | None = None) -> list[Path]:
    """Temp files of our pattern under ``folder`` whose writer is no longer alive, sorted.
    ``names`` restricts them to temps of those final file names (e.g. one output file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _, files in walker:
        for f in files:
            m = _TEMP.match(f)
            if m is None or (names is not None and m.group("name") not in names):
                continue
            p = Path(root) / f
            if p.is_file() and not p.is_symlink() and not pid_alive(int(m.group("pid"))):
                found.append(p)
    return sorted(found)


def remove_stale_temps(folder, recursive: bool = True, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove :func:`stale_temps` and return what was removed."""
    removed = []
    for p in stale_temps(folder, recursive, names):
        try:
            p.unlink()
        except FileNotFoundError:  # another cleaner was quicker
            continue
        removed.append(p)
    return removed
