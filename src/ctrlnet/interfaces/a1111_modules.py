"""sd-webui-controlnet preprocessor ("module") names -> our annotators, with its sliders.

sd-webui-controlnet names each preprocessor twice: an internal name (``/controlnet/module_list``)
and a UI label (``?alias_names=true``; e.g. "hed" / "softedge_hed", "depth" / "depth_midas").
Clients send either. Its two generic sliders ``threshold_a``/``threshold_b`` mean something
different per module; here each is bound to one of our annotator's parameters with the slider's
default and range, and, as its ``bound_check_params`` does, a value outside the range (webuiapi
sends 64 for every module; -1 means "default") gives the default. Modules without a slider ignore
the value, as there. ``processor_res`` is the annotator's resolution (-1 or out of 64..2048 gives
512, the slider's default).

Modules whose detector is not implemented here are refused by name (a different map would be a
different picture); a close stand-in is accepted only with a ``note`` that the API reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Slider:
    """A threshold slider bound to an annotator parameter (name/value/min/max/step as the
    extension's ``PreprocessorParameter.api_json``)."""

    param: str
    label: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def pick(self, v) -> float | int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.min <= v <= self.max:
            v = self.value
        return int(round(v)) if float(self.step).is_integer() else float(v)

    def api_json(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


RESOLUTION = Slider("", "Preprocessor Resolution", 512, 64, 2048, 1)


@dataclass(frozen=True)
class A1111Module:
    """One module: internal ``name``, UI ``label``, our ``annotator`` (None = the image is the map)
    with ``fixed`` parameters, its sliders, whether it has a resolution, and a ``note`` when it is
    a stand-in."""

    name: str
    label: str
    annotator: str | None
    fixed: dict = field(default_factory=dict)
    a: Slider | None = None
    b: Slider | None = None
    uses_resolution: bool = True
    note: str = ""

    def params(self, unit: dict) -> dict:
        """Annotator parameters from a unit's (or detect call's) threshold_a/threshold_b."""
        out = dict(self.fixed)
        for slider, key in ((self.a, "threshold_a"), (self.b, "threshold_b")):
            if slider is not None:
                out[slider.param] = slider.pick(unit.get(key, -1))
        return out

    def resolution(self, processor_res) -> int | None:
        return RESOLUTION.pick(processor_res if processor_res is not None else -1) if self.uses_resolution else None

    def sliders(self) -> list[dict]:
        return [s.api_json() for s in ((RESOLUTION if self.uses_resolution else None), self.a, self.b) if s]


_CANNY = (Slider("low_threshold", "Canny Low Threshold", 100, 1, 255), Slider("high_threshold", "Canny High Threshold", 200, 1, 255))
_MLSD = (Slider("thr_v", "MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01), Slider("thr_d", "MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01))
_GAMMA = Slider("gamma_correction", "Gamma Correction", 1.0, 0.1, 2.0, 0.001)

MODULES: list[A1111Module] = [
    A1111Module("none", "none", None, uses_resolution=False),
    A1111Module("canny", "canny", "canny", a=_CANNY[0], b=_CANNY[1]),
    A1111Module("depth", "depth_midas", "depth"),
    A1111Module("normal_map", "normal_midas", "normal",
                a=Slider("bg_th", "Normal Background Threshold", 0.4, 0.0, 1.0, 0.01)),
    A1111Module("openpose", "openpose", "openpose"),
    A1111Module("openpose_hand", "openpose_hand", "openpose_hand"),
    A1111Module("openpose_full", "openpose_full", "openpose_hand",
                note="openpose_full: body and hands are drawn; face keypoints are not detected here"),
    A1111Module("lineart", "lineart_realistic", "lineart"),
    A1111Module("lineart_coarse", "lineart_coarse", "lineart_coarse"),
    A1111Module("lineart_anime", "lineart_anime", "lineart_anime"),
    A1111Module("hed", "softedge_hed", "hed", {"safe": False}),
    A1111Module("hed_safe", "softedge_hedsafe", "hed", {"safe": True}),
    A1111Module("pidinet", "softedge_pidinet", "softedge_pidinet", {"safe": False}),
    A1111Module("pidinet_safe", "softedge_pidisafe", "softedge_pidinet", {"safe": True}),
    A1111Module("scribble_hed", "scribble_hed", "fake_scribble"),
    A1111Module("mlsd", "mlsd", "mlsd", a=_MLSD[0], b=_MLSD[1]),
    A1111Module("segmentation", "seg_ufade20k", "seg",
                note="seg_ufade20k: the server's ADE20K segmenter is used (same palette), not UniFormer"),
    A1111Module("oneformer_ade20k", "seg_ofade20k", "seg",
                note="seg_ofade20k: the server's ADE20K segmenter is used (same palette)"),
    A1111Module("shuffle", "shuffle", "shuffle"),
    A1111Module("tile_resample", "tile_resample", "tile", uses_resolution=False,
                a=Slider("down_sampling_rate", "Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
    A1111Module("invert", "invert (from white bg & black line)", "invert"),
    A1111Module("inpaint_only", "inpaint_only", "inpaint", uses_resolution=False),
    A1111Module("inpaint", "inpaint_global_harmonious", "inpaint", uses_resolution=False,
                note="inpaint_global_harmonious: the unit acts as inpaint_only (the result is composited)"),
    A1111Module("recolor_luminance", "recolor_luminance", "recolor_luminance", a=_GAMMA, uses_resolution=False),
    A1111Module("recolor_intensity", "recolor_intensity", "recolor_intensity", a=_GAMMA, uses_resolution=False),
    # ours, under our own names (no sd-webui-controlnet equivalent)
    A1111Module("mlsd_classic", "mlsd_classic", "mlsd_classic", a=_MLSD[0], b=_MLSD[1]),
    A1111Module("scribble", "scribble", "scribble", a=Slider("threshold", "Binarization Threshold", 127, 0, 255)),
]

# sd-webui-controlnet names with no counterpart here (refused with this list in the message)
UNSUPPORTED = ("depth_leres", "depth_leres++", "depth_zoe", "depth_anything", "depth_anything_v2",
               "depth_hand_refiner", "normal_bae", "normal_dsine", "openpose_face", "openpose_faceonly",
               "dw_openpose_full", "animal_openpose", "lineart_standard", "lineart_anime_denoise",
               "scribble_pidinet", "pidinet_scribble", "scribble_xdog", "softedge_teed", "pidinet_sketch",
               "t2ia_sketch_pidi", "oneformer_coco", "seg_ofcoco", "seg_anime_face", "mediapipe_face",
               "clip_vision", "reference_only", "reference_adain", "reference_adain+attn", "tile_colorfix",
               "tile_colorfix+sharp", "inpaint_only+lama", "color", "t2ia_color_grid", "revision_clipvision",
               "ip-adapter_clip_sd15", "ip-adapter_clip_h", "threshold")


def _table() -> dict[str, A1111Module]:
    t = {}
    for m in MODULES:
        t.setdefault(m.name.lower(), m)
        t.setdefault(m.label.lower(), m)
    return t


_BY_NAME = _table()


def resolve_module(name, where: str = "module") -> A1111Module:
    """The module for an internal name or UI label (any case); ValueError otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a name")
    m = _BY_NAME.get(name.strip().lower())
    if m is None:
        known = ", ".join(sorted({x.label for x in MODULES}))
        why = "has no detector on this server" if name.strip().lower() in UNSUPPORTED else "is unknown"
        raise ValueError(f"{where}={name!r} {why}; available: {known}")
    return m


def module_list(alias_names: bool = False) -> list[str]:
    return [m.label if alias_names else m.name for m in MODULES]


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    """As ``/controlnet/module_list``'s ``module_detail``: model_free and the visible sliders."""
    return {(m.label if alias_names else m.name): {"model_free": m.annotator in (None, "invert", "shuffle", "tile",
                                                                                 "inpaint", "canny", "scribble",
                                                                                 "recolor_luminance",
                                                                                 "recolor_intensity", "mlsd_classic"),
                                                    "sliders": m.sliders()} for m in MODULES}
