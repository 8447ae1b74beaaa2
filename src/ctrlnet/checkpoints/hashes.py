"""Model file hashes as AUTOMATIC1111's webui shows them, so clients written for it find our models
under the names they already use.

- :func:`file_sha256`: the whole file's SHA-256 (A1111 ``modules/hashes.py``); its first 10 hex
  digits are the checkpoint's "short hash" in titles (``"v1-5-pruned-emaonly.safetensors
  [6ce0161689]"``) and the ``Model hash`` of infotexts. Reading a multi-GB file takes seconds, so
  results are cached by path, size and modification time (as A1111's ``cache.json``).
- :func:`legacy_hash`: A1111's old ``model_hash`` (SHA-256 of the 64 KiB at offset 1 MiB, 8 hex
  digits), which sd-webui-controlnet puts in its model titles (``"control_v11p_sd15_canny
  [d14c016b]"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

_log = logging.getLogger(__name__)
_BLOCK = 1 << 20


def legacy_hash(path) -> str:
    """A1111's legacy ``model_hash``: SHA-256 of bytes [0x100000, 0x110000) of the file (fewer when
    it is shorter), first 8 hex digits. Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path) -> str:
    """The file's SHA-256 (64 hex digits), read in 1 MiB blocks, uncached. Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def default_cache() -> Path:
    """``$CTRLNET_CACHE_DIR/hashes.json``, else ``$XDG_CACHE_HOME/ctrlnet/hashes.json``, else
    ``~/.cache/ctrlnet/hashes.json``."""
    root = os.environ.get("CTRLNET_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "ctrlnet")
    return Path(root) / "hashes.json"


def file_sha256(path, cache: Path | None = None) -> str:
    """The file's SHA-256 (64 hex digits): from ``cache`` (default :func:`default_cache`) when its
    entry has this file's size and modification time, else read in 1 MiB blocks and cached. A cache
    that cannot be read or written only costs the time (a warning is logged). Raises OSError when
    the file cannot be read."""
    from ctrlnet.atomic import atomic_path

    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache = default_cache() if cache is None else Path(cache)
    entries = {}
    try:
        entries = json.loads(cache.read_text())
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        _log.warning("hash cache %s unreadable (%s); starting a new one", cache, e)
        entries = {}
    digest = sha256_file(path)
    entries[key] = {"stamp": stamp, "sha256": digest}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True))
    except OSError as e:
        _log.warning("could not write the hash cache %s: %s", cache, e)
    return digest
