"""The colorization tabs: line art coloured by a line-art ControlNet (a txt2img run with one unit),
and a grayscale image coloured after a colour reference by the shipped reference colorizer."""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr

from ctrlnet.generation.request import MAX_SEED
from ctrlnet.interfaces.model_args import LoadedModels
from ctrlnet.interfaces.webui.generate_tab import run_generation
from ctrlnet.interfaces.webui.messages import error, read_upload
from ctrlnet.interfaces.webui.models import ModelHolder, pick_controlnet
from ctrlnet.interfaces.webui.units import UnitValues

LINEART_PREPROCESSORS = ("invert", "lineart", "lineart_anime", "lineart_coarse")


def run_lineart(holder: ModelHolder, outputs_dir, image, opts: dict, progress=None):
    """Colour line art: ``image`` through ``opts["annotator"]`` into the line-art ControlNet, at the
    size the original apps use (short side ``opts["resolution"]``, sides rounded to 64).
    Returns (image files, control maps, seed)."""
    from ctrlnet.generation.preprocess import legacy_size

    img = read_upload(image, "line art", keep_alpha=True)
    if img is None:
        raise error("Add the line art first.")
    h, w = legacy_size(img, int(opts["resolution"]))
    unit = UnitValues(enabled=True, image=img, annotator=opts["annotator"], model=opts.get("controlnet"),
                      detect_resolution=int(opts["resolution"]))
    settings = {"prompt": opts.get("prompt") or "", "added_prompt": opts.get("added_prompt"), "width": w, "height": h,
                "steps": opts["steps"], "sampler": "DDIM", "guidance_scale": opts["guidance_scale"],
                "seed": opts["seed"], "num_images": 1, "batch_count": 1}
    out = run_generation(holder, outputs_dir, "txt2img", settings, [unit],
                         progress=None if progress is None else lambda d, t: progress((d, t), desc="sampling"))
    return out.images, out.maps, out.seed


def run_colorize(holder: ModelHolder, outputs_dir, gray, reference, opts: dict, progress=None):
    """The reference colorization tab: colour ``gray`` after ``reference`` with the colorizer in
    ``holder``, save the PNG; returns (image, file, seed)."""
    from ctrlnet.colorize.reference import ColorizeOptions, colorize_image
    from ctrlnet.image import ImageError, save_image
    from ctrlnet.interfaces.outputs import free_name

    if gray is None or reference is None:
        raise error("Add the grayscale image and a colour reference first.")
    gray, reference = read_upload(gray, "grayscale image"), read_upload(reference, "colour reference")
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
        raise error(e) from None
    out = Path(outputs_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = (f"reference colorization, Steps: {options.steps}, Seed: {seed}, Control strength: {options.strength}, "
                f"Keep luminance: {options.keep_luminance}")
    path = save_image(image, free_name(out, f"colorized-{seed}"), {"parameters": settings})
    return image, str(path), seed


def colorizer_loader(base, named, device, dtype) -> LoadedModels:
    from ctrlnet.colorize.reference import load_colorizer_models

    return LoadedModels(load_colorizer_models(device=device, dtype=dtype), "demo", {"colorizer": "shipped"})


def build_lineart_tab(holder: ModelHolder, outputs_dir, d: dict) -> gr.Dropdown:
    """The line-art tab; returns its ControlNet menu (updated when other models are loaded)."""
    names = holder.net_names()
    with gr.Tab("Line-art colorization", id="lineart"):
        gr.Markdown("Black-on-white line art is inverted (or traced by a line-art preprocessor) and coloured "
                    "by a line-art ControlNet, as the original apps do.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Line art", type="filepath", image_mode=None, format="png",
                                 sources=["upload", "clipboard"], elem_id="input-lineart")
                opts = {
                    "prompt": gr.Textbox(label="Prompt", elem_id="prompt-lineart"),
                    "annotator": gr.Dropdown(list(LINEART_PREPROCESSORS), value="invert", label="Preprocessor"),
                    "controlnet": gr.Dropdown(names, value=pick_controlnet("lineart", names), label="ControlNet"),
                }
                run = gr.Button("Run", variant="primary", elem_id="run-lineart")
                with gr.Accordion("Options", open=False):
                    opts.update({
                        "resolution": gr.Slider(64, 1024, value=d["resolution"], step=64, label="Image resolution"),
                        "steps": gr.Slider(1, 150, value=d["steps"], step=1, label="Steps"),
                        "guidance_scale": gr.Slider(0.0, 30.0, value=d["guidance_scale"], step=0.5, label="CFG Scale"),
                        "seed": gr.Number(-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1 = random)"),
                        "added_prompt": gr.Textbox(d.get("added_prompt", ""), label="Added prompt"),
                    })
            with gr.Column():
                gallery = gr.Gallery(label="Results", columns=2, format="png", elem_id="gallery-lineart")
                maps = gr.Gallery(label="Control map", columns=2, format="png", elem_id="map-lineart", height=200)
                seed_out = gr.Number(None, label="Seed used", precision=0, interactive=False, elem_id="seed-lineart")

        def on_run(data, progress=gr.Progress()):
            return run_lineart(holder, outputs_dir, data[image], {k: data[c] for k, c in opts.items()}, progress)

        run.click(on_run, {image, *opts.values()}, [gallery, maps, seed_out], api_name="lineart",
                  concurrency_limit=1, concurrency_id="device")
    return opts["controlnet"]


def build_colorize_tab(holder: ModelHolder, outputs_dir, d: dict) -> None:
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

        run.click(on_run, {gray, ref, *opts.values()}, [result, file_out, seed_out], api_name="colorize",
                  concurrency_limit=1, concurrency_id="device")
