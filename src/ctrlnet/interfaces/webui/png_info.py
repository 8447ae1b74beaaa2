"""The "PNG info" tab: read the settings an image was made with and send them to txt2img / img2img.

An image made by ctrlnet carries the A1111 ``parameters`` text and our ``ctrlnet`` JSON record
(:mod:`ctrlnet.interfaces.outputs`); the record is exact (sampler and schedule keys, control and
resize modes, annotator parameters, seed), so it is used while the text shown is the image's own.
Text pasted from A1111 (or edited here) is parsed by :func:`ctrlnet.generation.infotext.parse_parameters`.
Either way the fields pass through the one request reader (``request_io``), which checks them,
before any widget changes. Unit images are not in the text: the target tab keeps its own.
"""

from __future__ import annotations

import json
from dataclasses import replace

import gradio as gr
import numpy as np

from ctrlnet.interfaces.webui.generate_tab import MAX_STEPS
from ctrlnet.interfaces.webui.messages import error


def read_png_info(path) -> tuple[str, str]:
    """(``parameters`` text, ``ctrlnet`` record JSON or "") of an uploaded image; ``gr.Error`` for
    a file that is not an image. Images without chunks give ("", "")."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return "", ""
    try:
        with Image.open(path) as im:
            chunks = {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError):
        from ctrlnet.interfaces.webui.messages import _describe
        from pathlib import Path

        raise error(f"The dropped file is not an image: {_describe(Path(path))}") from None
    return chunks.get("parameters", ""), chunks.get("ctrlnet", "")


def settings_from(text: str, record: str, record_text: str) -> tuple[dict, list[str]]:
    """Request fields to send to a tab, and notes on what was not carried over.

    ``record`` (our JSON) is used when ``text`` is still the image's own ``record_text``;
    otherwise ``text`` is parsed as an A1111 infotext. ``gr.Error`` names a bad field.
    """
    from ctrlnet.generation.infotext import parse_parameters
    from ctrlnet.interfaces.request_io import request_from_dict

    try:
        if record and text.strip() == (record_text or "").strip():
            try:
                d = dict(json.loads(record)["request"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"the image's ctrlnet record is damaged ({e})") from None
            notes = []
        else:
            d, notes = parse_parameters(text)
        req = request_from_dict(d, allow_server_fields=True)
        # ranges checked as a run would; images are not in the text (the target tab supplies them),
        # so a stand-in init image lets the units' checks run
        replace(req, init_image=np.zeros((8, 8, 3), np.uint8)).validate(max_steps=MAX_STEPS)
    except ValueError as e:
        raise error(e) from None
    full = req.to_dict()
    fields = {k: full[k] for k in d if k in full}  # only what the source says
    if "controls" in d:
        fields["controls"] = full["controls"]
    return fields, notes


def build_png_info_tab(targets: dict, tabs: gr.Tabs) -> None:
    """The tab; ``targets``: {"txt2img": GenerateTab, "img2img": GenerateTab} to send settings to
    (``tabs`` switches to the target)."""
    with gr.Tab("PNG info", id="png_info"):
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Source image", type="filepath", image_mode=None, format="png",
                                 sources=["upload", "clipboard"], elem_id="png-info-image")
                text = gr.Textbox(label="Parameters (or paste A1111's generation parameters here)", lines=8,
                                  elem_id="png-info-text")
                record = gr.Textbox(visible=False, elem_id="png-info-record")
                record_text = gr.Textbox(visible=False)
                with gr.Row():
                    buttons = {name: gr.Button(f"Send to {name}", elem_id=f"png-info-to-{name}") for name in targets}
            with gr.Column():
                notes_md = gr.Markdown("", elem_id="png-info-notes")

        def on_image(path):
            params, rec = read_png_info(path)
            if path is not None and not params and not rec:
                return "", "", "", "This image carries no generation parameters."
            return params, rec, params, "Record found: settings are exact." if rec else ""

        image.change(on_image, image, [text, record, record_text, notes_md], api_name="png_info")

        for name, tab in targets.items():
            def send(t, rec, rec_t, _tab=tab, _name=name):
                fields, notes = settings_from(t, rec, rec_t)
                dropped = len(fields.get("controls") or []) - len(_tab.units)
                if dropped > 0:
                    notes.append(f"{dropped} ControlNet unit(s) beyond this tab's {len(_tab.units)} were left out")
                msg = "Sent. " + (" ".join(f"{n}." for n in notes) if notes else "")
                return [*_tab.apply(fields), msg, gr.Tabs(selected=_name)]

            buttons[name].click(send, [text, record, record_text], [*tab.outputs_for_apply(), notes_md, tabs],
                                api_name=f"png_info_to_{name}", queue=False)
