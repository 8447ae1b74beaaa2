"""The web app (Gradio): one tab per control type, a thin layer over :func:`ctrlnet.pipeline.generate`.

Each tab has its input (an upload, or a drawing canvas for scribbles), the annotator's own
parameters (built from the annotator's keyword defaults, not written here), and the options of the
original apps. Results are saved as PNGs that record their settings (``ctrlnet generate --from-png``
redoes them) and shown in a gallery with the control map and the seed used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from ctrlnet.interfaces.model_args import LoadedModels, load_named
from ctrlnet.interfaces.outputs import save_result
from ctrlnet.interfaces.request_io import MODEL_DEFAULT_FIELDS, public_params
from ctrlnet.pipeline import MAX_SEED, ControlSpec, GenerationRequest, generate

EMBEDDED = "embedded demo model"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class TabSpec:
    key: str
    title: str
    annotators: tuple[str, ...]  # the first is the default; "none" = the input is the map
    keywords: tuple[str, ...]  # a loaded ControlNet whose name holds one is preselected
    canvas: bool = False
    help: str = ""


TABS = (
    TabSpec("canny", "Canny edges", ("canny",), ("canny",), help="Edges of a photo or drawing."),
    TabSpec("mlsd", "Straight lines", ("mlsd", "mlsd_classic"), ("mlsd",),
            help="Straight line segments (rooms, buildings)."),
    TabSpec("hed", "Soft edges", ("hed", "softedge_pidinet"), ("hed", "softedge"),
            help="Soft boundaries (HED or PiDiNet)."),
    TabSpec("scribble", "Scribble", ("scribble",), ("scribble",), canvas=True,
            help="Draw black lines on the white canvas (or upload a sketch)."),
    TabSpec("openpose", "Pose", ("openpose", "openpose_hand"), ("openpose", "pose"),
            help="Human body (and hand) skeletons."),
    TabSpec("depth", "Depth", ("depth",), ("depth",), help="Monocular depth map."),
    TabSpec("normal", "Normal map", ("normal",), ("normal",), help="Surface normals from depth."),
    TabSpec("seg", "Segmentation", ("seg",), ("seg",), help="ADE20K semantic segmentation."),
    TabSpec("lineart", "Line-art colorization", ("invert", "lineart", "lineart_anime"), ("lineart",),
            help="Black-on-white line art is inverted and coloured by a line-art ControlNet."),
    TabSpec("none", "Ready-made map", ("none",), (), help="The uploaded image is already a control map."),
)

# Slider ranges for annotator parameters (defaults come from the annotators' own signatures).
_RANGES = {
    "low_threshold": (1, 255, 1), "high_threshold": (1, 255, 1), "threshold": (1, 254, 1),
    "thr_v": (0.01, 2.0, 0.01), "thr_d": (0.01, 20.0, 0.01), "min_length": (0, 100, 1), "max_lines": (1, 1000, 1),
    "a": (0.0, 12.6, 0.1), "bg_th": (0.0, 1.0, 0.01), "nms_threshold": (1, 254, 1), "sigma": (0.1, 10.0, 0.1),
    "gamma_correction": (0.1, 2.0, 0.01), "down_sampling_rate": (1.0, 8.0, 0.1), "mask_blur": (0.0, 20.0, 0.5),
}


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
    """The models the app uses now; replaced as a whole when the user loads others."""

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


def _runs_in(models) -> str:
    """" (bfloat16 on cpu)": the dtype ``auto`` resolved to, shown beside the loaded models."""
    return f" ({str(models.dtype).replace('torch.', '')} on {models.device})"


def _as_loaded(models) -> LoadedModels:
    if models is None or isinstance(models, LoadedModels):
        return models
    return LoadedModels(models, models.base.source, {k: k for k in models.controlnets})


def _pick_controlnet(tab: TabSpec, names: list[str]) -> str | None:
    for n in names:
        if any(k in n.lower() for k in tab.keywords):
            return n
    return names[0] if names else None


def _canvas_image(value) -> np.ndarray | None:
    """The drawing from a Sketchpad value (a dict with the flattened 'composite'), or an array."""
    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        return None
    arr = np.asarray(value)
    return arr if arr.size else None


def _uploaded(value, keep_alpha: bool = False):
    """An uploaded image read by the one loader (``load_image``: EXIF orientation, 16-bit and
    float ranges, alpha), from the file path that ``gr.Image(type="filepath")`` passes as the
    browser sent it; arrays (Python callers) pass through."""
    from ctrlnet.image import ImageError, load_image

    if not isinstance(value, (str, Path)):
        return value
    try:
        return load_image(value, keep_alpha=keep_alpha)
    except ImageError as e:
        raise gr.Error(f"The uploaded file is not a usable image: {e}") from None


def run_tab(holder: ModelHolder, tab: TabSpec, outputs_dir, image, annotator: str, params: dict, opts: dict,
            progress=None):
    """Build the request from the tab's values, generate, save; returns (control map, files, seed)."""
    from ctrlnet.image import ImageError

    img = _canvas_image(image) if tab.canvas else _uploaded(image, keep_alpha=True)  # alpha: see ControlSpec
    if img is None:
        raise gr.Error("Add an input image first" + (" (or draw on the canvas)." if tab.canvas else "."))
    loaded = holder.get()
    models = loaded.models
    if not models.controlnets:
        raise gr.Error("No ControlNet is loaded: pick one under Models and press Load.")
    net = opts["controlnet"] if opts["controlnet"] in models.controlnets else None
    spec = ControlSpec(image=img, model=net, annotator=None if annotator == "none" else annotator,
                       annotator_params=params, detect_resolution=int(opts["detect_resolution"]),
                       strength=float(opts["strength"]), guess_mode=bool(opts["guess_mode"]))
    req = GenerationRequest(
        prompt=opts["prompt"] or "", added_prompt=opts["added_prompt"] or "",
        negative_prompt=opts["negative_prompt"] or "", controls=[spec], num_images=int(opts["num_images"]),
        resolution=int(opts["resolution"]), steps=int(opts["steps"]), guidance_scale=float(opts["guidance_scale"]),
        seed=int(opts["seed"]), eta=float(opts["eta"]), guess_mode=bool(opts["guess_mode"]),
    )

    def report(i, total):
        if progress is not None:
            progress((i, total), desc="sampling", unit="steps")

    try:
        req.validate()
        with holder.lock:
            result = generate(models, req, report, allow_paths=False)
    except (ValueError, ImageError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    saved = save_result(result, outputs_dir, loaded.base, loaded.controlnets, loaded.dtype_name)
    return result.control_maps[0], [str(p) for p in saved.images], result.seed


def run_colorize(holder: ModelHolder, outputs_dir, gray, reference, opts: dict, progress=None):
    """The reference colorization tab: colour ``gray`` after ``reference`` with the colorizer in
    ``holder``, save the PNG; returns (image, file, seed)."""
    import random

    from ctrlnet.colorize.reference import ColorizeOptions, colorize_image
    from ctrlnet.image import ImageError, save_image
    from ctrlnet.interfaces.outputs import free_name

    if gray is None or reference is None:
        raise gr.Error("Add the grayscale image and a colour reference first.")
    gray, reference = _uploaded(gray), _uploaded(reference)
    seed = int(opts["seed"])
    seed = random.randint(0, MAX_SEED) if seed < 0 else seed
    options = ColorizeOptions(steps=int(opts["steps"]), seed=seed, strength=float(opts["strength"]),
                              keep_luminance=bool(opts["keep_luminance"]))

    def report(i, total):
        if progress is not None:
            progress((i, total), desc="sampling", unit="steps")

    try:  # generate() validates the settings
        models = holder.get().models
        with holder.lock:
            image = colorize_image(models, gray, reference, options, report)
    except (ValueError, ImageError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    out = Path(outputs_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = (f"reference colorization, Steps: {options.steps}, Seed: {seed}, Control strength: {options.strength}, "
                f"Keep luminance: {options.keep_luminance}")
    path = save_image(image, free_name(out, f"colorized-{seed}"), {"parameters": settings})
    return image, str(path), seed


def _model_option_defaults(holder: ModelHolder) -> dict:
    """Resolution, steps and guidance from the models' files (``Models.defaults``): the loaded
    models', or, when the embedded demo loads on first use, its files' (header read only)."""
    if holder.loaded is not None:
        md = holder.loaded.models.defaults
    elif holder.loader is load_named:
        from ctrlnet.pipeline import DEMO_BASE, DEMO_CONTROL, demo_dir, file_defaults

        have = (demo_dir() / DEMO_BASE).is_file()
        md = file_defaults(None, {"demo": str(demo_dir() / DEMO_CONTROL)}) if have else {}
    else:  # a caller's own loader: its models are unknown until loaded
        md = {}
    return {k: md[k] for k in MODEL_DEFAULT_FIELDS if k in md}


def _colorizer_loader(base, named, device, dtype) -> LoadedModels:
    from ctrlnet.colorize.reference import load_colorizer_models

    return LoadedModels(load_colorizer_models(device=device, dtype=dtype), "demo", {"colorizer": "shipped"})


def _colorize_tab(holder: ModelHolder, outputs_dir, d: dict) -> None:
    with gr.Tab("Reference colorization", id="colorize"):
        gr.Markdown("Colour a grayscale image after a colour reference (e.g. a coloured frame of the same shot). "
                    "The result keeps the input's lightness exactly. Uses the shipped colorizer.")
        with gr.Row():
            with gr.Column():
                # file paths, read by ctrlnet's loader (EXIF orientation, 16-bit, alpha)
                gray = gr.Image(label="Grayscale image", type="filepath", image_mode=None,
                                sources=["upload", "clipboard"], elem_id="input-colorize")
                ref = gr.Image(label="Colour reference", type="filepath", image_mode=None,
                               sources=["upload", "clipboard"], elem_id="reference-colorize")
                run = gr.Button("Run", variant="primary", elem_id="run-colorize")
                with gr.Accordion("Options", open=False):
                    opts = {
                        "steps": gr.Slider(1, 100, value=d["steps"], step=1, label="Steps"),
                        "strength": gr.Slider(0.0, 2.0, value=1.0, step=0.01, label="Control strength"),
                        "seed": gr.Number(0, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1 = random)"),
                        "keep_luminance": gr.Checkbox(True, label="Keep the input's lightness (Lab merge)"),
                    }
            with gr.Column():
                result = gr.Image(label="Result", type="numpy", interactive=False, format="png",
                                  elem_id="result-colorize")
                file_out = gr.File(label="Saved PNG", elem_id="file-colorize")
                seed_out = gr.Number(None, label="Seed used", precision=0, interactive=False, elem_id="seed-colorize")

        def on_run(data, progress=gr.Progress()):
            return run_colorize(holder, outputs_dir, data[gray], data[ref], {k: data[c] for k, c in opts.items()},
                                progress)

        run.click(on_run, {gray, ref, *opts.values()}, [result, file_out, seed_out], concurrency_limit=1)


def _param_component(name: str, default):
    label = name.replace("_", " ")
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label)
    if isinstance(default, (int, float)):
        lo, hi, step = _RANGES.get(name, (0, max(2 * abs(default), 1), 1 if isinstance(default, int) else 0.01))
        return gr.Slider(lo, hi, value=default, step=step, label=label)
    return gr.Textbox(value=str(default), label=label)


def _tab_handler(holder, tab, outputs_dir, image, ann_dd, param_comps, opts):
    """The Run callback of one tab: read its components' values and call :func:`run_tab`."""

    def on_run(data, progress=gr.Progress()):
        ann = data[ann_dd]
        params = {name: data[c] for (a, name), c in param_comps.items() if a == ann}
        values = {k: data[c] for k, c in opts.items()}
        return run_tab(holder, tab, outputs_dir, data[image], ann, params, values, progress)

    return on_run


def build_app(models_or_loader=None, models_dir=None, outputs_dir="outputs", device="auto", dtype="auto",
              defaults: dict | None = None, colorizer=None) -> gr.Blocks:
    """The Gradio app.

    ``models_or_loader``: loaded models (``Models`` or ``LoadedModels``), or a callable
    ``(base, {name: path}, device, dtype) -> LoadedModels`` used when the user picks models
    (default :func:`load_named`; ``None`` loads the embedded demo model on first use).
    ``defaults`` overrides the option defaults (``steps``, ``resolution``, ``num_images``...).
    ``colorizer``: models for the reference colorization tab (default: the shipped colorizer on
    the embedded base, loaded on first use).
    """
    if callable(models_or_loader) and not hasattr(models_or_loader, "controlnets"):
        holder = ModelHolder(None, models_or_loader, device, dtype)
    else:
        holder = ModelHolder(_as_loaded(models_or_loader), load_named, device, dtype)
    loaded = holder.loaded
    d = {"steps": 20, "resolution": 512, "num_images": 1, "guidance_scale": 9.0, "strength": 1.0,
         "detect_resolution": 512, "eta": 0.0, **_model_option_defaults(holder), **(defaults or {})}
    net_names = list(loaded.models.controlnets) if loaded else []
    model_defaults = loaded.models.defaults if loaded else {}
    found_bases, found_nets = scan_models_dir(models_dir)

    with gr.Blocks(title="ctrlnet") as app:
        gr.Markdown("# ctrlnet: ControlNet for Stable Diffusion\nPick a tab, give it an image, press **Run**.")
        with gr.Accordion("Models", open=False):
            current = loaded.base if loaded and loaded.base else EMBEDDED
            base_dd = gr.Dropdown([EMBEDDED, *found_bases] + ([current] if current not in found_bases and
                                                              current != EMBEDDED else []),
                                  value=current, label="Base model", allow_custom_value=False)
            nets_dd = gr.Dropdown(found_nets, value=[], multiselect=True,
                                  label=f"ControlNets from {models_dir or '(no --models-dir given)'}")
            load_btn = gr.Button("Load")
            model_status = gr.Markdown(f"Loaded ControlNets: {', '.join(net_names) or 'none yet'}"
                                       + (_runs_in(loaded.models) if loaded else ""))
        tab_net_dropdowns = []
        model_sliders = []  # each tab's resolution, steps, guidance: reset to a newly loaded model's defaults
        for tab in TABS:
            with gr.Tab(tab.title, id=tab.key):
                gr.Markdown(tab.help)
                with gr.Row():
                    with gr.Column():
                        if tab.canvas:
                            # a white page, so the brush is ready (black on white, as the original app)
                            image = gr.Sketchpad(np.full((512, 512, 3), 255, np.uint8), label="Draw here",
                                                 type="numpy", canvas_size=(512, 512),
                                                 sources=["upload"], elem_id=f"input-{tab.key}")
                        else:
                            # a file path, read by ctrlnet's loader (EXIF orientation, 16-bit, alpha)
                            image = gr.Image(label="Input image", type="filepath", image_mode=None,
                                             sources=["upload", "clipboard"], elem_id=f"input-{tab.key}")
                        prompt = gr.Textbox(label="Prompt", elem_id=f"prompt-{tab.key}")
                        run = gr.Button("Run", variant="primary", elem_id=f"run-{tab.key}")
                        ann_dd = gr.Dropdown(list(tab.annotators), value=tab.annotators[0], label="Preprocessor",
                                             visible=len(tab.annotators) > 1)
                        param_groups, param_comps = [], {}
                        for i, ann in enumerate(tab.annotators):
                            try:
                                params = public_params(ann) if ann != "none" else {}
                            except Exception:  # an annotator whose module cannot import here
                                params = {}
                            with gr.Group(visible=i == 0) as grp:
                                for name, default in params.items():
                                    param_comps[(ann, name)] = _param_component(name, default)
                            param_groups.append(grp)
                        ann_dd.change(lambda a, _t=tab: [gr.update(visible=a == x) for x in _t.annotators],
                                      ann_dd, param_groups)
                        with gr.Accordion("Options", open=False):
                            net_dd = gr.Dropdown(net_names, value=_pick_controlnet(tab, net_names), label="ControlNet")
                            tab_net_dropdowns.append((tab, net_dd))
                            opts = {
                                "controlnet": net_dd,
                                "num_images": gr.Slider(1, 12, value=d["num_images"], step=1, label="Images"),
                                "resolution": gr.Slider(64, 1024, value=d["resolution"], step=64,
                                                        label="Image resolution"),
                                "detect_resolution": gr.Slider(128, 1024, value=d["detect_resolution"], step=1,
                                                               label="Preprocessor resolution"),
                                "strength": gr.Slider(0.0, 2.0, value=d["strength"], step=0.01,
                                                      label="Control strength"),
                                "guess_mode": gr.Checkbox(False, label="Guess mode (follow the control, no prompt)"),
                                "steps": gr.Slider(1, 100, value=d["steps"], step=1, label="Steps"),
                                "guidance_scale": gr.Slider(0.1, 30.0, value=d["guidance_scale"], step=0.1,
                                                            label="Guidance scale"),
                                "seed": gr.Number(-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                                  label="Seed (-1 = random)"),
                                "eta": gr.Number(d["eta"], minimum=0.0, maximum=1.0, label="eta (DDIM)"),
                                "added_prompt": gr.Textbox(model_defaults.get("added_prompt", ""), label="Added prompt"),
                                "negative_prompt": gr.Textbox(model_defaults.get("negative_prompt", ""),
                                                              label="Negative prompt"),
                            }
                            opts["prompt"] = prompt
                            model_sliders.extend(opts[k] for k in MODEL_DEFAULT_FIELDS)
                    with gr.Column():
                        cmap = gr.Image(label="Control map", type="numpy", interactive=False, format="png",
                                        elem_id=f"map-{tab.key}")
                        gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id=f"gallery-{tab.key}")
                        seed_out = gr.Number(None, label="Seed used", precision=0, interactive=False,
                                             elem_id=f"seed-{tab.key}")

                inputs = {image, ann_dd, *param_comps.values(), *opts.values()}

                on_run = _tab_handler(holder, tab, outputs_dir, image, ann_dd, param_comps, opts)
                run.click(on_run, inputs, [cmap, gallery, seed_out], concurrency_limit=1)

        def on_load(base, nets):
            try:
                got = holder.load(None if base == EMBEDDED else base, list(nets or []))
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(str(e)) from None
            names = list(got.models.controlnets)
            ups = [gr.update(choices=names, value=_pick_controlnet(t, names)) for t, _ in tab_net_dropdowns]
            fallback = {"resolution": 512, "steps": 20, "guidance_scale": 9.0, **(defaults or {})}
            values = {k: got.models.defaults.get(k, fallback[k]) for k in MODEL_DEFAULT_FIELDS}
            sliders = [gr.update(value=values[k]) for _ in TABS for k in MODEL_DEFAULT_FIELDS]
            return [f"Loaded ControlNets: {', '.join(names) or 'none'}{_runs_in(got.models)}", *ups, *sliders]

        colorize_holder = ModelHolder(_as_loaded(colorizer), _colorizer_loader, device, dtype)
        _colorize_tab(colorize_holder, outputs_dir, d)

        load_btn.click(on_load, [base_dd, nets_dd],
                       [model_status, *[dd for _, dd in tab_net_dropdowns], *model_sliders])
    return app
