"""The ControlNet unit block (sd-webui-controlnet's unit panel), built once per unit in every tab.

A unit has: enable, image, preprocessor (every registry annotator; the ones whose weights are
missing here are marked, and choosing one says what to download and where to put it), the
preprocessor's own parameters (from its signature), preprocessor resolution or pixel perfect, a
**Preview** that runs only the annotator and shows the map (and "Use this map", which makes the
map the unit's image with preprocessor none), the ControlNet, weight, start/end, control mode and
resize mode. :class:`UnitValues` is what a unit's widgets hold, turned into a
:class:`~ctrlnet.generation.request.ControlSpec` by the one request reader (``request_io``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from ctrlnet.interfaces.webui.messages import error, read_upload
from ctrlnet.interfaces.webui.models import pick_controlnet

# sd-webui-controlnet's labels for the modes (its UI strings), with our values
CONTROL_MODES = [("Balanced", "balanced"), ("My prompt is more important", "prompt"),
                 ("ControlNet is more important", "controlnet")]
RESIZE_MODES = [("Just Resize", "just_resize"), ("Crop and Resize", "crop_and_resize"),
                ("Resize and Fill", "resize_and_fill")]
HR_OPTIONS = [("Both", "both"), ("Low res only", "low_res_only"), ("High res only", "high_res_only")]

# Slider ranges for annotator parameters (defaults come from the annotators' own signatures).
_RANGES = {
    "low_threshold": (1, 255, 1), "high_threshold": (1, 255, 1), "threshold": (1, 254, 1),
    "thr_v": (0.01, 2.0, 0.01), "thr_d": (0.01, 20.0, 0.01), "min_length": (0, 100, 1), "max_lines": (1, 1000, 1),
    "a": (0.0, 12.6, 0.1), "bg_th": (0.0, 1.0, 0.01), "nms_threshold": (1, 254, 1), "sigma": (0.1, 10.0, 0.1),
    "gamma_correction": (0.1, 2.0, 0.01), "down_sampling_rate": (1.0, 8.0, 0.1), "mask_blur": (0.0, 20.0, 0.5),
    "noise_cell": (8, 1024, 8),
}


def annotator_params() -> dict[str, dict[str, object]]:
    """annotator -> {parameter: default} for every registered annotator ("none" has none)."""
    from ctrlnet.annotators import list_annotators
    from ctrlnet.interfaces.request_io import public_params

    out = {}
    for a in list_annotators():
        try:
            out[a] = public_params(a)
        except Exception:  # an annotator whose module cannot import here: offered without parameters
            out[a] = {}
    return out


def annotator_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the preprocessor menu: "none" first, then every annotator, the
    ones missing weights labelled so."""
    from ctrlnet.annotators import list_annotators
    from ctrlnet.annotators.availability import missing_weights

    out = [("none", "none")]
    for a in list_annotators():
        if a == "none":
            continue
        out.append((f"{a} (weights missing)" if missing_weights(a) else a, a))
    return out


@dataclass
class UnitValues:
    """What one unit's widgets hold (the web app's names; see :class:`ControlSpec` for meanings)."""

    enabled: bool = False
    image: object = None  # a file path from the browser, or an array
    annotator: str = "none"
    params: dict = field(default_factory=dict)
    model: str | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    control_mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    pixel_perfect: bool = False
    detect_resolution: int = 512
    hr_option: str = "both"

    def spec(self, index: int, allow_no_image: bool = False):
        """The unit as a ``ControlSpec`` (``None`` when disabled); ``gr.Error`` naming the unit when
        it has no image (img2img and inpaint units may use the init image: ``allow_no_image``)."""
        from ctrlnet.interfaces.request_io import control_from_dict

        if not self.enabled:
            return None
        image = read_upload(self.image, f"image of ControlNet unit {index + 1}", keep_alpha=True)
        if image is None and not allow_no_image and self.annotator != "inpaint":
            raise error(f"ControlNet unit {index + 1} is enabled but has no image: add one or untick Enable.")
        d = {"model": self.model or None, "annotator": self.annotator or "none",
             "annotator_params": dict(self.params) if self.annotator not in (None, "none") else {},
             "detect_resolution": None if self.pixel_perfect else int(self.detect_resolution),
             "pixel_perfect": bool(self.pixel_perfect), "strength": float(self.weight), "start": float(self.start),
             "end": float(self.end), "control_mode": self.control_mode, "resize_mode": self.resize_mode,
             "hr_option": self.hr_option or "both"}
        try:
            return control_from_dict(d, index, image)
        except ValueError as e:
            raise error(f"ControlNet unit {index + 1}: {e}") from None


def preview_map(values: UnitValues, size: tuple[int, int]) -> np.ndarray:
    """Run only the unit's annotator, as generation would for an output of ``size`` = (h, w):
    at the preprocessor resolution (or pixel perfect); (H, W, 3) uint8, the map before it is
    fitted to the output. ``gr.Error`` for a missing image, weights or a bad setting."""
    from ctrlnet.annotators.availability import missing_weights
    from ctrlnet.annotators.weights import MissingWeightsError
    from ctrlnet.generation import preprocess
    from ctrlnet.image import HWC3, ImageError

    if values.image is None:
        raise error("Add an image to the unit first.")
    if values.annotator in (None, "none"):
        raise error("Pick a preprocessor first (with none, the image is used as the map as it is).")
    note = missing_weights(values.annotator)
    if note:
        raise error(note)
    spec = UnitValues(**{**values.__dict__, "enabled": True}).spec(0)
    try:
        raw = preprocess.annotate(spec, spec.image, size)
    except (ValueError, ImageError, MissingWeightsError, KeyError) as e:
        raise error(e) from None
    return HWC3(raw[:, :, 0] if raw.shape[2] == 1 else raw)


class UnitBlock:
    """The widgets of one unit, inside the caller's layout (an accordion per unit)."""

    def __init__(self, prefix: str, index: int, net_names: list[str], detect_resolution: int = 512,
                 hires: bool = False):
        """``hires``: the tab has a hires fix, so the unit offers sd-webui-controlnet's "Hires-fix
        option" (the passes it acts in)."""
        self.index = index
        params = annotator_params()
        self.param_owner = params  # annotator -> its parameters
        names: dict[str, object] = {}  # every parameter name once, with the first default seen
        for a in sorted(params):
            for k, v in params[a].items():
                names.setdefault(k, v)
        eid = f"{prefix}-unit{index}"
        with gr.Accordion(f"ControlNet Unit {index}", open=index == 0, elem_id=eid):
            with gr.Row():
                with gr.Column():
                    self.image = gr.Image(label="Control image", type="filepath", image_mode=None, format="png",
                                          sources=["upload", "clipboard"], elem_id=f"{eid}-image", height=256)
                with gr.Column():
                    self.preview = gr.Image(label="Preprocessor preview", type="numpy", interactive=False,
                                            format="png", elem_id=f"{eid}-preview", height=256)
            with gr.Row():
                self.enabled = gr.Checkbox(False, label="Enable", elem_id=f"{eid}-enable")
                self.pixel_perfect = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{eid}-pixel-perfect")
                self.preview_btn = gr.Button("Preview", size="sm", elem_id=f"{eid}-preview-btn")
                self.use_map_btn = gr.Button("Use this map", size="sm", elem_id=f"{eid}-use-map")
            with gr.Row():
                self.annotator = gr.Dropdown(annotator_choices(), value="none", label="Preprocessor",
                                             elem_id=f"{eid}-annotator")
                self.model = gr.Dropdown(net_names, value=net_names[0] if net_names else None, label="Model",
                                         elem_id=f"{eid}-model")
            self.weights_note = gr.Markdown("", visible=False, elem_id=f"{eid}-weights-note")
            with gr.Row():
                self.params = {}
                for k, default in names.items():
                    self.params[k] = _param_component(k, default, f"{eid}-param-{k}")
            with gr.Row():
                self.weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control Weight",
                                        elem_id=f"{eid}-weight")
                self.start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting Control Step",
                                       elem_id=f"{eid}-start")
                self.end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending Control Step",
                                     elem_id=f"{eid}-end")
            self.detect_resolution = gr.Slider(64, 2048, value=detect_resolution, step=8,
                                               label="Preprocessor Resolution", elem_id=f"{eid}-resolution")
            self.control_mode = gr.Radio(CONTROL_MODES, value="balanced", label="Control Mode",
                                         elem_id=f"{eid}-control-mode")
            self.resize_mode = gr.Radio(RESIZE_MODES, value="crop_and_resize", label="Resize Mode",
                                        elem_id=f"{eid}-resize-mode")
            self.hr_option = gr.Radio(HR_OPTIONS, value="both", label="Hires-fix option (the passes it acts in)",
                                      elem_id=f"{eid}-hr-option") if hires else None

    def components(self) -> dict[str, gr.components.Component]:
        """The input widgets by :class:`UnitValues` field (``params`` flattened as ``param:NAME``)."""
        out = {k: getattr(self, k) for k in ("enabled", "image", "annotator", "model", "weight", "start", "end",
                                              "control_mode", "resize_mode", "pixel_perfect", "detect_resolution")}
        if self.hr_option is not None:
            out["hr_option"] = self.hr_option
        out.update({f"param:{k}": c for k, c in self.params.items()})
        return out

    def values(self, data: dict) -> UnitValues:
        """The unit's values from a handler's ``{component: value}`` dict."""
        comps = self.components()
        ann = data[self.annotator] or "none"
        own = self.param_owner.get(ann, {})
        kw = {k: data[c] for k, c in comps.items() if not k.startswith("param:")}
        kw["params"] = {k: _typed(data[self.params[k]], default) for k, default in own.items()}
        kw["annotator"] = ann
        return UnitValues(**kw)

    def param_updates(self, annotator: str | None, values: dict | None = None) -> dict:
        """Updates of the parameter widgets for ``annotator``: its own shown, with ``values`` or
        its defaults; the others hidden."""
        own = self.param_owner.get(annotator or "none", {})
        values = values or {}
        return {k: gr.update(visible=k in own, **({"value": values.get(k, own[k])} if k in own else {}))
                for k in self.params}

    def wire(self, tab_size, holder_names, api_prefix: str) -> None:
        """Events: the preprocessor menu shows its parameters, its weights note and a fitting model;
        uploading an image enables the unit; Preview runs the annotator; "Use this map" takes it."""
        def on_annotator(ann, current):
            from ctrlnet.annotators.availability import missing_weights

            ups = list(self.param_updates(ann).values())
            note = missing_weights(ann) if ann and ann != "none" else None
            names = holder_names()
            return [*ups, gr.update(value=f"**{note}**" if note else "", visible=bool(note)),
                    gr.update(choices=names, value=pick_controlnet(ann, names, current))]

        # .input (the user's choice) not .change: settings sent from PNG info set the menu and
        # the parameters together, and must not be reset to the defaults by this handler
        self.annotator.input(on_annotator, [self.annotator, self.model],
                              [*self.params.values(), self.weights_note, self.model], api_visibility="private",
                              api_name=f"{api_prefix}_unit_{self.index}_preprocessor",
                              queue=False)
        self.image.upload(lambda: True, None, self.enabled, api_visibility="private", queue=False,
                          api_name=f"{api_prefix}_unit_{self.index}_enable")

        def on_preview(data):
            h, w = int(data[tab_size[1]]), int(data[tab_size[0]])
            return preview_map(self.values(data), (h, w))

        self.preview_btn.click(on_preview, {*self.components().values(), *tab_size}, self.preview,
                               api_name=f"{api_prefix}_preview_unit_{self.index}", concurrency_limit=1,
                               concurrency_id="device")

        def use_map(cmap):
            if cmap is None:
                raise error("Press Preview first: there is no map to use yet.")
            return [cmap, "none", True, gr.update(visible=False), *self.param_updates("none").values()]

        self.use_map_btn.click(use_map, self.preview, [self.image, self.annotator, self.enabled, self.weights_note,
                                                       *self.params.values()],
                               api_visibility="private", queue=False, api_name=f"{api_prefix}_unit_{self.index}_use_map")


def _typed(value, default):
    """A widget's value in its parameter's type (Gradio sliders hand back floats)."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and value is not None and float(value).is_integer():
        return int(value)
    if isinstance(default, float) and value is not None:
        return float(value)
    return value


def _param_component(name: str, default, elem_id: str):
    label = name.replace("_", " ")
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label, visible=False, elem_id=elem_id)
    if isinstance(default, (int, float)):
        lo, hi, step = _RANGES.get(name, (0, max(2 * abs(default), 1), 1 if isinstance(default, int) else 0.01))
        return gr.Slider(lo, hi, value=default, step=step, label=label, visible=False, elem_id=elem_id)
    return gr.Textbox(value=str(default), label=label, visible=False, elem_id=elem_id)
