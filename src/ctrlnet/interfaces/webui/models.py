"""The models the web app uses: a holder that is swapped as a whole when the user loads others,
the scan of ``--models-dir`` for the model menus, and the option defaults a model file carries."""

from __future__ import annotations

import threading
from pathlib import Path

from ctrlnet.interfaces.model_args import LoadedModels, load_named
from ctrlnet.interfaces.request_io import MODEL_DEFAULT_FIELDS

EMBEDDED = "embedded demo model"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
# SD's settings, used where the model files carry none (official checkpoints)
FALLBACK_DEFAULTS = {"resolution": 512, "steps": 20, "guidance_scale": 7.0}


def scan_models_dir(folder) -> tuple[list[str], list[str]]:
    """(base models, ControlNets) found in a folder, by their keys where cheap to read, else by name."""
    if not folder:
        return [], []
    root = Path(folder).expanduser()
    if not root.is_dir():
        return [], []
    bases, nets = [], []
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            if (p / "model_index.json").is_file():
                bases.append(str(p))
            elif (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model.*")):
                nets.append(str(p))
            continue
        if p.suffix not in MODEL_SUFFIXES or p.parent.name in ("unet", "vae", "text_encoder", "controlnet"):
            continue
        is_base, is_net = _file_kind(p)
        if is_base:
            bases.append(str(p))
        if is_net:
            nets.append(str(p))
    return bases, nets


def _file_kind(p: Path) -> tuple[bool, bool]:
    if p.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:  # reads the header only
                keys = list(f.keys())
            base = any(k.startswith("model.diffusion_model.") for k in keys)
            net = any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in keys)
            return base, net
        except Exception:
            return False, False
    name = p.name.lower()  # pickles: reading keys means loading gigabytes, so go by name
    net = "control" in name
    return (not net) or name.startswith("control_sd15_"), net


class ModelHolder:
    """The models the app uses now; replaced as a whole when the user loads others.

    ``lock`` serialises use of the device: one generation (or annotator preview) at a time, as
    the Gradio queue's concurrency limit does for the generate events.
    """

    def __init__(self, loaded: LoadedModels | None, loader, device="auto", dtype="auto"):
        self.loaded, self.loader, self.device, self.dtype = loaded, loader, device, dtype
        self.lock = threading.Lock()

    def get(self) -> LoadedModels:
        if self.loaded is None:
            self.loaded = self.loader(None, {}, self.device, self.dtype)
        return self.loaded

    def load(self, base: str | None, controlnets: list[str]) -> LoadedModels:
        named = {}
        for c in controlnets:
            name = Path(c).stem
            while name in named:
                name += "_"
            named[name] = c
        with self.lock:
            self.loaded = self.loader(base, named, self.device, self.dtype)
        return self.loaded

    def net_names(self) -> list[str]:
        """Names of the loaded ControlNets ([] while nothing is loaded yet)."""
        return list(self.loaded.models.controlnets) if self.loaded is not None else []

    def option_defaults(self) -> dict:
        """Resolution, steps and guidance from the models' files (``Models.defaults``): the loaded
        models', or, when the embedded demo loads on first use, its files' (header read only)."""
        if self.loaded is not None:
            md = self.loaded.models.defaults
        elif self.loader is load_named:
            from ctrlnet.pipeline import DEMO_BASE, DEMO_CONTROL, demo_dir, file_defaults

            have = (demo_dir() / DEMO_BASE).is_file()
            md = file_defaults(None, {"demo": str(demo_dir() / DEMO_CONTROL)}) if have else {}
        else:  # a caller's own loader: its models are unknown until loaded
            md = {}
        return {k: md[k] for k in MODEL_DEFAULT_FIELDS if k in md}


def as_loaded(models) -> LoadedModels | None:
    """``Models`` or ``LoadedModels`` (or None) as ``LoadedModels``."""
    if models is None or isinstance(models, LoadedModels):
        return models
    return LoadedModels(models, models.base.source, {k: k for k in models.controlnets})


# preprocessor -> words in the names of the ControlNets trained on its maps (official names:
# control_v11p_sd15_softedge, control_sd15_hed, control_v11p_sd15s2_lineart_anime...)
_NET_WORDS = {"softedge_pidinet": ("softedge", "hed"), "hed": ("hed", "softedge"), "fake_scribble": ("scribble",),
              "openpose_hand": ("openpose", "pose"), "openpose": ("openpose", "pose"),
              "lineart_anime": ("lineart_anime", "anime"), "lineart_coarse": ("lineart",), "mlsd_classic": ("mlsd",),
              "recolor_luminance": ("recolor",), "recolor_intensity": ("recolor",), "invert": ("lineart", "scribble")}


def pick_controlnet(annotator: str | None, names: list[str], current: str | None = None) -> str | None:
    """The loaded ControlNet whose name holds a word of ``annotator``'s family (as
    sd-webui-controlnet's model filter), else ``current`` if still loaded, else the first."""
    if annotator and annotator != "none":
        for word in _NET_WORDS.get(annotator, (annotator,)):
            for n in names:
                if word in n.lower():
                    return n
    if current in names:
        return current
    return names[0] if names else None
