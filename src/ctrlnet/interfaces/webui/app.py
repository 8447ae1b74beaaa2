"""The Gradio app (``ctrlnet ui``): txt2img, img2img and inpaint with ControlNet units, PNG info,
and the colorization tabs; the model menu; optional login; launching.

Every event has a meaningful API name (``txt2img``, ``img2img``, ``inpaint``, ``interrupt``,
``png_info``, ``txt2img_preview_unit_0``, ...), so ``gradio_client`` scripts read well.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ctrlnet.interfaces.model_args import load_named
from ctrlnet.interfaces.request_io import MODEL_DEFAULT_FIELDS
from ctrlnet.interfaces.webui.colorize_tab import build_colorize_tab, build_lineart_tab, colorizer_loader
from ctrlnet.interfaces.webui.generate_tab import MODES, GenerateTab
from ctrlnet.interfaces.webui.messages import error
from ctrlnet.interfaces.webui.models import (EMBEDDED, FALLBACK_DEFAULTS, ModelHolder, as_loaded, pick_controlnet,
                                             scan_models_dir)
from ctrlnet.interfaces.webui.png_info import build_png_info_tab
from ctrlnet.interfaces.webui.runs import Runs

DEFAULT_UNITS = 3
MAX_UNITS = 10


def read_auth_file(path) -> list[tuple[str, str]]:
    """``user:password`` lines (blank lines and ``#`` comments skipped) -> Gradio's ``auth`` list.
    ValueError naming the line number (never its content) when a line has no ``:`` or an empty part."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{path}, line {n}: expected user:password")
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f"{path} holds no user:password line")
    return pairs


def _runs_in(models) -> str:
    """" (bfloat16 on cpu)": the dtype ``auto`` resolved to, shown beside the loaded models."""
    return f" ({str(models.dtype).replace('torch.', '')} on {models.device})"


def build_app(models_or_loader=None, models_dir=None, outputs_dir="outputs", device="auto", dtype="auto",
              defaults: dict | None = None, colorizer=None, units: int = DEFAULT_UNITS) -> gr.Blocks:
    """The Gradio app.

    ``models_or_loader``: loaded models (``Models`` or ``LoadedModels``), or a callable
    ``(base, {name: path}, device, dtype) -> LoadedModels`` used when the user picks models
    (default :func:`load_named`; ``None`` loads the embedded demo model on first use).
    ``defaults`` overrides option defaults (``resolution`` = width and height, ``steps``,
    ``guidance_scale``, ``sampler``, ``negative_prompt``); otherwise they come from the model files
    (128 px for the embedded demo) or SD's (512 px). ``colorizer``: models for the reference
    colorization tab (default: the shipped colorizer, loaded on first use). ``units``: ControlNet
    units per tab (1..10).
    """
    if not 1 <= int(units) <= MAX_UNITS:
        raise ValueError(f"units={units} is out of range: must be between 1 and {MAX_UNITS}")
    if callable(models_or_loader) and not hasattr(models_or_loader, "controlnets"):
        holder = ModelHolder(None, models_or_loader, device, dtype)
    else:
        holder = ModelHolder(as_loaded(models_or_loader), load_named, device, dtype)
    loaded = holder.loaded
    model_defaults = loaded.models.defaults if loaded else {}
    d = {**FALLBACK_DEFAULTS, "sampler": "DDIM", "added_prompt": model_defaults.get("added_prompt", ""),
         "negative_prompt": model_defaults.get("negative_prompt", ""), **holder.option_defaults(), **(defaults or {})}
    found_bases, found_nets = scan_models_dir(models_dir)
    root = Path(models_dir).expanduser() if models_dir else None

    def shown(p: str) -> str:  # menus name models relative to --models-dir, never by server path
        return str(Path(p).relative_to(root)) if root is not None else Path(p).name

    base_paths = {shown(p): p for p in found_bases}
    net_paths = {shown(p): p for p in found_nets}
    runs = Runs()

    with gr.Blocks(title="ctrlnet") as app:
        gr.Markdown("# ctrlnet: ControlNet for Stable Diffusion")
        with gr.Accordion("Models", open=False):
            current = loaded.base if loaded and loaded.base else EMBEDDED
            current = EMBEDDED if current == EMBEDDED else shown(current) if root and current in found_bases \
                else Path(current).name
            base_dd = gr.Dropdown(list(dict.fromkeys([EMBEDDED, *base_paths, current])), value=current,
                                  label="Base model")
            nets_dd = gr.Dropdown(list(net_paths), value=[], multiselect=True,
                                  label="ControlNets" + ("" if models_dir else " (start with --models-dir to list some)"))
            load_btn = gr.Button("Load")
            model_status = gr.Markdown(f"Loaded ControlNets: {', '.join(holder.net_names()) or 'none yet'}"
                                       + (_runs_in(loaded.models) if loaded else ""))
        with gr.Tabs() as tabs:
            gen_tabs = {m: GenerateTab(m, holder, outputs_dir, runs, d, int(units)) for m in MODES}
            build_png_info_tab({k: gen_tabs[k] for k in ("txt2img", "img2img")}, tabs)
            lineart_net = build_lineart_tab(holder, outputs_dir, d)
            colorize_holder = ModelHolder(as_loaded(colorizer), colorizer_loader, device, dtype)
            build_colorize_tab(colorize_holder, outputs_dir, d)

        unit_models = [u.model for t in gen_tabs.values() for u in t.units]
        sliders = [(t.settings[k], k) for t in gen_tabs.values() for k in ("width", "height", "steps",
                                                                             "guidance_scale")]

        def on_load(base, nets):
            if base != EMBEDDED and base not in base_paths and base != current:
                raise error(f"unknown base model {base!r}")
            base_path = None if base == EMBEDDED else base_paths.get(base, loaded.base if loaded else None)
            try:
                got = holder.load(base_path, [net_paths[n] for n in nets or [] if n in net_paths])
            except (ValueError, FileNotFoundError, KeyError) as e:
                raise error(e) from None
            names = list(got.models.controlnets)
            values = {k: got.models.defaults.get(k, FALLBACK_DEFAULTS[k]) for k in MODEL_DEFAULT_FIELDS}
            values["width"] = values["height"] = values["resolution"]
            return [f"Loaded ControlNets: {', '.join(names) or 'none'}{_runs_in(got.models)}",
                    *[gr.update(choices=names, value=pick_controlnet(None, names)) for _ in unit_models],
                    gr.update(choices=names, value=pick_controlnet("lineart", names)),
                    *[gr.update(value=values[k]) for _, k in sliders]]

        load_btn.click(on_load, [base_dd, nets_dd],
                       [model_status, *unit_models, lineart_net, *[c for c, _ in sliders]], api_name="load_models",
                       concurrency_limit=1, concurrency_id="device")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth_file=None,
           outputs_dir="outputs", **kwargs):
    """Start the server (blocking unless ``prevent_thread_lock=True`` is passed); with ``auth_file``,
    a login page asks for one of its ``user:password`` pairs."""
    auth = read_auth_file(auth_file) if auth_file else None
    return app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, auth=auth, allowed_paths=[str(outputs_dir)],
        auth_message="ctrlnet: log in with a user name and password from the server's auth file." if auth else None,
        **kwargs)
