"""Which annotators can run on this machine, checked without loading anything.

Network annotators need files that are never downloaded for the user (see :mod:`.weights`):
official ``lllyasviel/Annotators`` files found in ``$CTRLNET_ANNOTATOR_DIR`` or the Hugging Face
cache, or a local ``transformers`` model folder named by an environment variable (depth, seg).
:func:`missing_weights` says, for a menu or an error shown to a remote user, what is missing and
where to put it, naming files, download addresses and variables but no path on this machine.
"""

from __future__ import annotations

import importlib

from ctrlnet.annotators.weights import ENV_DIR, MissingWeightsError, find_weights, weights_url

# annotator -> (module, attribute naming its weight file(s) in that module). The attribute is a
# file name, or a dict {annotator: file name}; the module constants stay the one source.
_FILES = {
    "hed": ("hed", "WEIGHTS"),
    "softedge_pidinet": ("pidinet", "WEIGHTS"),
    "mlsd": ("mlsd", "WEIGHTS"),
    "lineart": ("lineart", "WEIGHTS"),
    "lineart_coarse": ("lineart", "WEIGHTS"),
    "lineart_anime": ("lineart_anime", "WEIGHTS"),
    "openpose": ("openpose", "BODY_WEIGHTS"),
    "openpose_hand": ("openpose", ("BODY_WEIGHTS", "HAND_WEIGHTS")),
}
# annotator -> (module with ENV_MODEL, an example hub model to download into the folder)
_FOLDERS = {
    "depth": ("depth", "Intel/dpt-hybrid-midas"),
    "seg": ("seg", "openmmlab/upernet-convnext-small"),
}


def weight_files(name: str) -> list[str]:
    """The official weight file names annotator ``name`` loads ([] for classical detectors and
    folder-based models)."""
    if name not in _FILES:
        return []
    module, attrs = _FILES[name]
    mod = importlib.import_module(f"ctrlnet.annotators.{module}")
    files = []
    for attr in (attrs,) if isinstance(attrs, str) else attrs:
        value = getattr(mod, attr)
        files.append(value[name] if isinstance(value, dict) else value)
    return files


def missing_weights(name: str) -> str | None:
    """``None`` when annotator ``name`` has what it needs here, else a one-paragraph message
    saying which file or model folder is missing and where to put it (no local paths, no
    angle brackets, so it survives being shown as HTML)."""
    import os

    from ctrlnet.annotators.depth import WEIGHT_FILES

    if name in _FOLDERS:
        module, example = _FOLDERS[name]
        env = importlib.import_module(f"ctrlnet.annotators.{module}").ENV_MODEL
        folder = os.environ.get(env)
        ok = bool(folder) and os.path.isfile(os.path.join(folder, "config.json")) and any(
            os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES)
        if ok:
            return None
        return (f"The {name} preprocessor needs a local transformers model folder: download one "
                f"(for example huggingface-cli download {example} --local-dir FOLDER) and start the "
                f"server with ${env}=FOLDER.")
    missing = []
    for f in weight_files(name):
        try:
            find_weights(f)
        except MissingWeightsError:
            missing.append(f)
    if not missing:
        return None
    urls = ", ".join(weights_url(f) for f in missing)
    return (f"The {name} preprocessor needs {' and '.join(missing)}: download {urls} into the server's "
            f"annotator folder (the folder ${ENV_DIR} names, or the Hugging Face cache of "
            f"lllyasviel/Annotators).")
