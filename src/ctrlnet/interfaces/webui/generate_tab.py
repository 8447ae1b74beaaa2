"""txt2img, img2img and inpaint: one tab builder and one run function for all three.

A tab holds the prompts, the sampling settings (A1111's layout: sampler and schedule, steps,
size, batch count and size, CFG, seed with 🎲 and ♻), the mode's own inputs (init image and
denoising strength; a mask drawn with a brush on the image or uploaded, with blur, masked
content and inpaint area; hires fix in txt2img) and N ControlNet units. :func:`run_generation`
turns the values into requests through the one request reader (``request_io``), runs
``generate()`` once per batch (seeds continue across batches, as A1111), saves PNGs that record
their settings, and stops at the next step when the session's Interrupt flag is set.
"""

from __future__ import annotations

import contextvars
import random
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import numpy as np

from ctrlnet.generation.presets import PRESETS, get_preset
from ctrlnet.generation.preview import cheap_preview
from ctrlnet.generation.request import MAX_SEED
from ctrlnet.interfaces.webui.messages import error, read_upload
from ctrlnet.interfaces.webui.models import ModelHolder
from ctrlnet.interfaces.webui.runs import Runs
from ctrlnet.interfaces.webui.units import UnitBlock, UnitValues

MODES = ("txt2img", "img2img", "inpaint")
# A1111's "Masked content" labels
INPAINT_FILLS = [("original", "original"), ("fill", "fill"), ("latent noise", "latent_noise"),
                 ("latent nothing", "latent_nothing")]
UPSCALERS = [("Latent", "latent"), ("Lanczos", "lanczos")]
# UI bounds (A1111's slider ranges); generate() checks its own limits again
MAX_BATCH_SIZE, MAX_BATCH_COUNT, MAX_STEPS, MAX_SIDE = 8, 100, 150, 2048
PREVIEW_EVERY_S = 0.5  # how often a run's live preview is refreshed (A1111 polls about every 0.5-1 s)

# request fields each mode takes from its widgets (the rest keep the request's defaults)
_COMMON = ("prompt", "added_prompt", "negative_prompt", "width", "height", "steps", "sampler", "schedule", "guidance_scale",
           "seed", "num_images", "clip_skip")
_FIELDS = {
    "txt2img": _COMMON + ("hires_scale", "hires_steps", "hires_denoising_strength", "hires_upscaler"),
    "img2img": _COMMON + ("denoising_strength",),
    "inpaint": _COMMON + ("denoising_strength", "mask_blur", "inpaint_fill", "only_masked", "only_masked_padding"),
}


def preset_menu_values(name: str) -> tuple[str, str, int]:
    """A preset (``ctrlnet.generation.presets``) as the sampler and schedule menus name it, and its
    steps: ("UniPC order 1", "Karras Min", 10) for ``fast``. ValueError for an unknown preset."""
    from ctrlnet.sampling.names import SAMPLER_LABELS, SCHEDULE_LABELS, resolve_sampler

    p = get_preset(name)
    key, sched = resolve_sampler(p.sampler, p.schedule)
    auto = resolve_sampler(SAMPLER_LABELS[key])[1]
    return SAMPLER_LABELS[key], "Automatic" if sched == auto else SCHEDULE_LABELS[sched], p.steps


@dataclass
class RunOutput:
    """What a run shows: saved image files, the control maps of the last batch, the first image's
    seed and infotext, and a status line (how many steps ran, or where it was interrupted)."""

    images: list[str | np.ndarray]  # saved files; an interrupted batch's pictures so far as arrays
    maps: list[np.ndarray]
    seed: int | None
    info: str
    status: str
    seeds: list[int] = field(default_factory=list)


def mask_from_editor(value) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image, mask) from an ``ImageMask`` value (``type="filepath"``: background and brush layers
    as files; arrays pass too): the background as (H, W, 3) uint8 and the union of the painted
    layers' alpha as an (H, W) uint8 mask, 255 = repaint (None when nothing is painted)."""
    if not isinstance(value, dict):
        return read_upload(value, "inpaint image"), None
    image = read_upload(value.get("background"), "inpaint image")
    if image is None:
        return None, None
    mask = np.zeros(image.shape[:2], np.uint8)
    for layer in value.get("layers") or []:
        arr = read_upload(layer, "brush layer", keep_alpha=True)
        if arr is None:
            continue
        if arr.shape[:2] != mask.shape:  # a layer at canvas size: fitted onto the image
            import cv2

            arr = cv2.resize(arr, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
        painted = arr[:, :, 3] if arr.ndim == 3 and arr.shape[2] == 4 else arr.max(axis=2) if arr.ndim == 3 else arr
        mask = np.maximum(mask, np.where(painted > 0, 255, 0).astype(np.uint8))
    return image, (mask if mask.any() else None)


def build_requests(mode: str, settings: dict, units: list[UnitValues], init=None, mask=None):
    """The first batch's request for a tab's values (``settings``: request fields by name plus
    ``batch_count``), images read; ``gr.Error`` naming the first bad value."""
    from ctrlnet.interfaces.request_io import request_from_dict

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    d = {k: settings[k] for k in _FIELDS[mode] if k in settings}
    for k in ("width", "height", "steps", "seed", "num_images", "clip_skip", "hires_steps", "only_masked_padding"):
        if d.get(k) is not None:
            d[k] = int(d[k])
    if "only_masked" in d:
        d["only_masked"] = d["only_masked"] in (True, "masked")
    if d.get("schedule") in ("Automatic", ""):
        d["schedule"] = None
    if mode == "txt2img" and not settings.get("hires_enabled"):
        for k in ("hires_scale", "hires_steps", "hires_denoising_strength", "hires_upscaler"):
            d.pop(k, None)
    try:
        req = request_from_dict(d)
    except ValueError as e:
        raise error(e) from None
    allow_no_image = mode != "txt2img"
    req.controls = [s for i, u in enumerate(units) if (s := u.spec(i, allow_no_image)) is not None]
    if mode != "txt2img":
        req.init_image = init
        if init is None:
            raise error("Add the image to " + ("paint on first." if mode == "inpaint" else "start from first."))
    if mode == "inpaint":
        if mask is None:
            raise error("Paint the area to repaint on the image with the brush, or upload a mask.")
        req.mask = mask
    try:
        req.validate(max_images=MAX_BATCH_SIZE, max_steps=MAX_STEPS)
    except ValueError as e:
        raise error(e) from None
    return req


def run_generation(holder: ModelHolder, outputs_dir, mode: str, settings: dict, units: list[UnitValues],
                   init=None, mask=None, cancel=None, progress=None, preview=None) -> RunOutput:
    """Generate ``settings["batch_count"]`` batches, save them, and say what happened.

    ``init``/``mask``: arrays or upload paths (img2img, inpaint). ``cancel()`` True stops the run
    at the next step (batches already finished are kept and shown, and the interrupted batch's
    pictures so far are shown unsaved, as A1111 does by default). ``progress(done, total)``
    counts steps over all batches; ``preview(x0)`` gets every step's x0 estimate (``generate``'s
    live-preview hook). Errors before any work are ``gr.Error`` with a readable message.
    """
    from ctrlnet.annotators.weights import MissingWeightsError
    from ctrlnet.generation.run import GenerationCancelled, generate
    from ctrlnet.image import ImageError
    from ctrlnet.interfaces.outputs import save_result

    init = read_upload(init, "init image")
    if mask is not None and not isinstance(mask, np.ndarray):
        mask = read_upload(mask, "mask")
    if mask is not None and mask.ndim == 3:
        mask = mask.max(axis=2)  # an uploaded mask: white (any channel) = repaint
    req = build_requests(mode, settings, units, init, mask)
    count = int(settings.get("batch_count") or 1)
    if not 1 <= count <= MAX_BATCH_COUNT:
        raise error(f"batch_count={count} is out of range: must be between 1 and {MAX_BATCH_COUNT}")
    loaded = holder.get()
    models = loaded.models
    if req.controls and not models.controlnets:
        raise error("A ControlNet unit is enabled but no ControlNet is loaded: load one under Models.")
    seed = random.randint(0, MAX_SEED) if req.seed == -1 else req.seed
    done = {"steps": 0, "total": 0}

    def report(batch):
        def cb(i, total):
            done["steps"] = batch * total + i
            done["total"] = count * total
            if progress is not None:
                progress(done["steps"], done["total"])
        return cb

    images, seeds, maps, info, status = [], [], [], "", ""
    try:
        for b in range(count):
            r = replace(req, seed=(seed + b * req.num_images) % (MAX_SEED + 1))
            with holder.lock:
                result = generate(models, r, report(b), cancel=cancel, allow_paths=False, keep_partial=True,
                                  preview=preview)
            saved = save_result(result, outputs_dir, loaded.base, loaded.controlnets, loaded.dtype_name,
                                vae=loaded.vae)
            images += [str(p) for p in saved.images]
            seeds += list(result.seeds)
            maps = list(result.control_maps)
            if not info:
                info = result.parameters_text(Path(loaded.base).name if loaded.base else "demo", 0)
        status = f"Done: {len(images)} image(s), {done['steps']} steps."
    except GenerationCancelled as e:
        status = (f"Interrupted after {done['steps']} of {done['total'] or '?'} steps; "
                  f"{len(images)} finished image(s) kept.")
        if e.partial is not None:  # shown, not saved (A1111's "save incomplete images" is off by default)
            images += list(e.partial.images)
            seeds += list(e.partial.seeds)
            maps = list(e.partial.control_maps)
            status += f" The last {len(e.partial.images)} show the unfinished batch (not saved)."
    except (ValueError, ImageError, MissingWeightsError, FileNotFoundError, KeyError) as e:
        raise error(e) from None
    return RunOutput(images, maps, seeds[0] if seeds else None, info, status, seeds)


class GenerateTab:
    """The widgets of one txt2img / img2img / inpaint tab and their events."""

    def __init__(self, mode: str, holder: ModelHolder, outputs_dir, runs: Runs, defaults: dict, n_units: int):
        self.mode, self.holder, self.outputs_dir, self.runs = mode, holder, outputs_dir, runs
        from ctrlnet.sampling.names import sampler_names, schedule_names

        m = mode
        net_names = holder.net_names()
        res = int(defaults["resolution"])
        s: dict[str, gr.components.Component] = {}
        self.settings = s
        self.init = self.editor = self.mask_upload = None
        with gr.Tab(mode, id=mode):
            with gr.Row():
                with gr.Column(scale=4):
                    s["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{m}-prompt")
                    s["negative_prompt"] = gr.Textbox(defaults.get("negative_prompt", ""), label="Negative prompt",
                                                      lines=2, elem_id=f"{m}-negative-prompt")
                with gr.Column(scale=1, min_width=160):
                    self.generate_btn = gr.Button("Generate", variant="primary", elem_id=f"{m}-generate")
                    self.interrupt_btn = gr.Button("Interrupt", variant="stop", elem_id=f"{m}-interrupt")
            with gr.Row():
                with gr.Column():
                    if mode == "img2img":
                        self.init = gr.Image(label="Image", type="filepath", image_mode=None, format="png",
                                             sources=["upload", "clipboard"], elem_id=f"{m}-init", height=320)
                    elif mode == "inpaint":
                        self.editor = gr.ImageMask(label="Image: paint the area to repaint", type="filepath",
                                                   format="png", sources=["upload", "clipboard"],
                                                   brush=gr.Brush(default_size=16, colors=["#ffffff"],
                                                                  color_mode="fixed"),
                                                   elem_id=f"{m}-editor", height=420)
                        with gr.Accordion("Upload a mask instead (white = repaint)", open=False):
                            self.mask_upload = gr.Image(label="Mask", type="filepath", image_mode=None,
                                                        format="png", sources=["upload"], elem_id=f"{m}-mask")
                    with gr.Row():
                        s["sampler"] = gr.Dropdown(sampler_names(), value=defaults["sampler"], label="Sampling method",
                                                   elem_id=f"{m}-sampler")
                        s["schedule"] = gr.Dropdown(schedule_names(), value="Automatic", label="Schedule type",
                                                    elem_id=f"{m}-schedule")
                        s["steps"] = gr.Slider(1, MAX_STEPS, value=int(defaults["steps"]), step=1,
                                               label="Sampling steps", elem_id=f"{m}-steps")
                        # fills the three menus above (the request carries what they then say)
                        self.preset = gr.Dropdown([("none", "")] + [(k, k) for k in sorted(PRESETS)], value="",
                                                  label="Preset", elem_id=f"{m}-preset", scale=0, min_width=120)
                    if mode == "txt2img":
                        with gr.Accordion("Hires. fix", open=False, elem_id=f"{m}-hires"):
                            s["hires_enabled"] = gr.Checkbox(False, label="Enable hires. fix",
                                                             elem_id=f"{m}-hires-enable")
                            with gr.Row():
                                s["hires_upscaler"] = gr.Dropdown(UPSCALERS, value="latent", label="Upscaler")
                                s["hires_steps"] = gr.Slider(0, MAX_STEPS, value=0, step=1,
                                                             label="Hires steps (0 = same as sampling)")
                            with gr.Row():
                                s["hires_denoising_strength"] = gr.Slider(0.0, 1.0, value=0.7, step=0.01,
                                                                          label="Denoising strength")
                                s["hires_scale"] = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by")
                    with gr.Row():
                        with gr.Column(scale=3):
                            s["width"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Width",
                                                   elem_id=f"{m}-width")
                            s["height"] = gr.Slider(64, MAX_SIDE, value=res, step=8, label="Height",
                                                    elem_id=f"{m}-height")
                        with gr.Column(scale=1):
                            s["batch_count"] = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count",
                                                         elem_id=f"{m}-batch-count")
                            s["num_images"] = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                                                        elem_id=f"{m}-batch-size")
                    s["guidance_scale"] = gr.Slider(0.0, 30.0, value=float(defaults["guidance_scale"]), step=0.5,
                                                    label="CFG Scale", elem_id=f"{m}-cfg")
                    if mode != "txt2img":
                        s["denoising_strength"] = gr.Slider(0.0, 1.0, value=0.75, step=0.01,
                                                            label="Denoising strength", elem_id=f"{m}-denoise")
                    if mode == "inpaint":
                        with gr.Row():
                            s["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur",
                                                       elem_id=f"{m}-mask-blur")
                            s["inpaint_fill"] = gr.Radio(INPAINT_FILLS, value="original", label="Masked content",
                                                         elem_id=f"{m}-fill")
                        with gr.Row():
                            s["only_masked"] = gr.Radio([("Whole picture", "whole"), ("Only masked", "masked")],
                                                        value="whole", label="Inpaint area", elem_id=f"{m}-area")
                            s["only_masked_padding"] = gr.Slider(0, 256, value=32, step=4,
                                                                 label="Only masked padding, pixels")
                    with gr.Row():
                        s["seed"] = gr.Number(-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed",
                                              elem_id=f"{m}-seed", scale=4)
                        self.random_btn = gr.Button("🎲", size="sm", elem_id=f"{m}-random-seed", scale=0,
                                                    min_width=40)
                        self.reuse_btn = gr.Button("♻", size="sm", elem_id=f"{m}-reuse-seed", scale=0, min_width=40)
                    with gr.Accordion("Advanced", open=False):
                        s["clip_skip"] = gr.Slider(1, 2, value=1, step=1, label="Clip skip")
                        s["added_prompt"] = gr.Textbox(defaults.get("added_prompt", ""), elem_id=f"{m}-added-prompt",
                                                       label="Added prompt (appended to the prompt, as the "
                                                             "original ControlNet apps do)")
                    self.units = [UnitBlock(m, i, net_names, hires=m == "txt2img") for i in range(n_units)]
                with gr.Column():
                    # the running batch's last x0 estimate (A1111's "Approx cheap" live preview)
                    self.live = gr.Image(label="Live preview", type="numpy", format="png", interactive=False,
                                         visible=False, height=256, elem_id=f"{m}-live-preview")
                    self.gallery = gr.Gallery(label="Output", columns=2, format="png", elem_id=f"{m}-gallery",
                                              height=420)
                    self.status = gr.Markdown("", elem_id=f"{m}-status")
                    self.last_seed = gr.Number(None, label="Seed used", precision=0, interactive=False,
                                               elem_id=f"{m}-seed-used")
                    self.info = gr.Textbox(label="Generation info", lines=4, interactive=False,
                                           elem_id=f"{m}-info")
                    self.maps = gr.Gallery(label="Control maps used", columns=3, format="png", height=200,
                                           elem_id=f"{m}-maps")
        self._wire()

    def inputs(self) -> set:
        comps = set(self.settings.values())
        for u in self.units:
            comps |= set(u.components().values())
        for c in (self.init, self.editor, self.mask_upload):
            if c is not None:
                comps.add(c)
        return comps

    def _wire(self) -> None:
        s = self.settings

        def on_generate(data, request: gr.Request, progress=gr.Progress()):
            session = getattr(request, "session_hash", None) or "default"
            flag = self.runs.start(session)
            settings = {k: data[c] for k, c in s.items()}
            units = [u.values(data) for u in self.units]
            init, mask = None, None
            if self.mode == "img2img":
                init = data[self.init]
            elif self.mode == "inpaint":
                init, mask = mask_from_editor(data[self.editor])
                if data[self.mask_upload] is not None:
                    mask = data[self.mask_upload]

            def report(done, total):
                progress((done, total), desc="sampling", unit="steps")

            latest: dict = {}

            def run():
                try:
                    latest["out"] = run_generation(self.holder, self.outputs_dir, self.mode, settings, units, init,
                                                   mask, cancel=flag.is_set, progress=report,
                                                   preview=lambda x0: latest.__setitem__("x0", x0))
                except BaseException as e:  # noqa: BLE001 - raised again in the event's own thread
                    latest["error"] = e
                finally:
                    self.runs.finish(session, flag)

            # the run goes on in a thread (with this event's context, so the progress bar follows it)
            # while this generator shows each new estimate, polled at most every half second
            worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
            worker.start()
            shown = None
            while worker.is_alive():
                worker.join(PREVIEW_EVERY_S)
                x0 = latest.get("x0")
                if x0 is not None and x0 is not shown and worker.is_alive() and x0.shape[1] == 4:
                    shown = x0  # (latents of other widths have no cheap-preview factors)
                    yield (gr.skip(),) * 5 + (gr.update(value=cheap_preview(x0), visible=True),)
            if "error" in latest:
                raise latest["error"]
            out = latest["out"]
            yield out.images, out.maps, out.seed, out.info, out.status, gr.update(value=None, visible=False)

        self.generate_btn.click(on_generate, self.inputs(), [self.gallery, self.maps, self.last_seed, self.info,
                                                             self.status, self.live],
                                api_name=self.mode, concurrency_limit=1, concurrency_id="device")

        def on_interrupt(request: gr.Request):
            session = getattr(request, "session_hash", None) or "default"
            self.runs.interrupt(session)

        # not queued: it must get through while the run holds the queue's one slot
        self.interrupt_btn.click(on_interrupt, None, None, api_name=f"interrupt_{self.mode}"
                                 if self.mode != "txt2img" else "interrupt", queue=False)
        self.preset.change(lambda name: [gr.update(value=v) for v in preset_menu_values(name)] if name
                           else [gr.update()] * 3, self.preset, [s["sampler"], s["schedule"], s["steps"]],
                           api_visibility="private", queue=False)
        self.random_btn.click(lambda: -1, None, s["seed"], api_visibility="private", queue=False)
        self.reuse_btn.click(lambda v: -1 if v is None else int(v), self.last_seed, s["seed"],
                             api_visibility="private", queue=False)
        size = (s["width"], s["height"])
        for u in self.units:
            u.wire(size, self.holder.net_names, self.mode)
        source = self.init if self.init is not None else self.editor
        if source is not None:
            fitted = gr.State(None)  # the (h, w) of the image the size was last set from

            def fit_size(value, last):
                img = mask_from_editor(value)[0] if isinstance(value, dict) else read_upload(value, "image")
                if img is None or tuple(img.shape[:2]) == (tuple(last) if last else None):
                    return gr.update(), gr.update(), last  # a brush stroke, or no image: the size stays
                h, w = img.shape[:2]
                return (min(MAX_SIDE, max(64, round(w / 8) * 8)), min(MAX_SIDE, max(64, round(h / 8) * 8)),
                        (h, w))

            # A new image sets the size to its own (rounded to 8), so it is not stretched. The image
            # input reports it on change. The editor (Gradio 6) sends change with an id of blobs it
            # posts first, but its first change after an upload comes before the canvas has the
            # image: no blob is posted, the server resolves the id to an empty value and no later
            # change follows until a stroke. Its upload event carries the uploaded layers, so it
            # listens to both; fit_size ignores values with no image or an unchanged size.
            source.change(fit_size, [source, fitted], [s["width"], s["height"], fitted], api_visibility="private",
                          api_name=f"{self.mode}_fit_size")
            if self.editor is not None:
                self.editor.upload(fit_size, [source, fitted], [s["width"], s["height"], fitted],
                                   api_visibility="private")

    def apply(self, fields: dict) -> list:
        """Widget updates (settings, then each unit's widgets) for request fields from PNG info;
        units beyond this tab's count are dropped, unit images are kept."""
        s = self.settings
        ups = {c: gr.update() for c in self.outputs_for_apply()}
        simple = ("prompt", "added_prompt", "negative_prompt", "steps", "guidance_scale", "seed", "width", "height", "clip_skip",
                  "denoising_strength", "mask_blur", "hires_steps", "hires_denoising_strength", "hires_scale",
                  "hires_upscaler")
        for k in simple:
            if k in s and fields.get(k) is not None:
                ups[s[k]] = gr.update(value=fields[k])
        if "only_masked" in s and fields.get("only_masked") is not None:
            ups[s["only_masked"]] = gr.update(value="masked" if fields["only_masked"] else "whole")
        if "prompt" in fields and "added_prompt" not in fields:  # an infotext: its prompt has it all
            ups[s["added_prompt"]] = gr.update(value="")
        if fields.get("sampler"):
            try:  # the label and the schedule, as the menus name them
                from ctrlnet.sampling.names import SAMPLER_LABELS, SCHEDULE_LABELS, resolve_sampler

                key, sched = resolve_sampler(fields["sampler"], fields.get("schedule"))
                ups[s["sampler"]] = gr.update(value=SAMPLER_LABELS[key])
                auto = resolve_sampler(SAMPLER_LABELS[key])[1]
                ups[s["schedule"]] = gr.update(value="Automatic" if sched == auto else SCHEDULE_LABELS[sched])
            except ValueError:
                pass  # an unknown name: the menus keep their choice
        if "hires_enabled" in s:
            ups[s["hires_enabled"]] = gr.update(value=float(fields.get("hires_scale") or 1.0) > 1.0)
        if "num_images" in s:
            ups[s["num_images"]] = gr.update(value=1)
            ups[s["batch_count"]] = gr.update(value=1)
        controls = fields.get("controls") or []
        names = self.holder.net_names()
        for u, c in zip(self.units, controls + [None] * len(self.units)):
            if c is None:
                ups[u.enabled] = gr.update(value=False)
                continue
            ups[u.enabled] = gr.update(value=True)
            ann = c.get("annotator") or "none"
            ups[u.annotator] = gr.update(value=ann)
            for k, up in u.param_updates(ann, c.get("annotator_params") or {}).items():
                ups[u.params[k]] = up
            if c.get("model") in names:
                ups[u.model] = gr.update(value=c["model"])
            for k, w in (("strength", u.weight), ("start", u.start), ("end", u.end),
                         ("control_mode", u.control_mode), ("resize_mode", u.resize_mode),
                         ("pixel_perfect", u.pixel_perfect), ("detect_resolution", u.detect_resolution)):
                if c.get(k) is not None:
                    ups[w] = gr.update(value=c[k])
            if u.hr_option is not None:
                ups[u.hr_option] = gr.update(value=c.get("hr_option") or "both")
        return [ups[c] for c in self.outputs_for_apply()]

    def outputs_for_apply(self) -> list:
        out = list(self.settings.values())
        for u in self.units:
            out += [*u.params.values(), u.enabled, u.annotator, u.model, u.weight, u.start, u.end, u.control_mode, u.resize_mode,
                    u.pixel_perfect, u.detect_resolution]
            if u.hr_option is not None:
                out.append(u.hr_option)
        return out
