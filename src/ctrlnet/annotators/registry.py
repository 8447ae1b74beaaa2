"""Name -> annotator lookup, importing detector modules lazily."""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

# annotator name -> module under ctrlnet.annotators that defines it in its ANNOTATORS dict
_MODULES: dict[str, str] = {}


def _register(module: str, *names: str) -> None:
    for n in names:
        _MODULES[n] = module


# Classical detectors (no weights).
_register("canny", "canny")
_register("scribble", "scribble", "fake_scribble")
_register("simple", "invert", "shuffle", "tile", "inpaint", "recolor_luminance", "recolor_intensity", "none")
_register("mlsd_classic", "mlsd_classic")
# Networks (weights from a folder).
_register("hed", "hed")
_register("pidinet", "softedge_pidinet")
_register("mlsd", "mlsd")
_register("openpose", "openpose", "openpose_hand")
_register("lineart", "lineart", "lineart_coarse")
_register("lineart_anime", "lineart_anime")
_register("depth", "depth")
_register("normal", "normal")
_register("seg", "seg")
# No "pose_mediapipe": mediapipe 0.10.21 (the last wheel with its models inside) pins numpy<2 and
# protobuf 4.25, so even as an optional extra it would downgrade the main install's numpy.


def list_annotators() -> list[str]:
    """All registered annotator names."""
    return sorted(_MODULES)


def get_annotator(name: str) -> Callable[..., np.ndarray]:
    """The callable for ``name``; a clear KeyError lists the known names."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise KeyError(f"unknown annotator {name!r}; known: {', '.join(list_annotators())}") from None
    mod = importlib.import_module(f"ctrlnet.annotators.{module}")
    return mod.ANNOTATORS[name]


def run_annotator(name: str, image: np.ndarray, **params) -> np.ndarray:
    """Run annotator ``name`` on an image (any of gray/RGB/RGBA/16-bit); returns uint8 HWC."""
    from ctrlnet.image import HWC3

    return get_annotator(name)(HWC3(image), **params)
