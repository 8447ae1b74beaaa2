"""AUTOMATIC1111-compatible routes (``/sdapi/v1/*``) and sd-webui-controlnet's (``/controlnet/*``).

Tools written for A1111 with the ControlNet extension (``webuiapi``, drawing-program plugins,
bots) talk to ``ctrlnet serve`` unchanged. The bodies are translated by :mod:`.a1111_payload`;
generation runs through the service's one job queue, so these requests queue with ``/v1`` jobs,
show in ``/sdapi/v1/progress`` and stop at the next step on ``/sdapi/v1/interrupt``.

Auth is the service's: with a token set, ``Authorization: Bearer <token>`` or HTTP Basic with the
token as the password (any user name; A1111's ``--api-auth`` clients send Basic). Errors have
A1111's shape ``{"error", "detail", "body", "errors"}`` and never name a server folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ctrlnet.interfaces import a1111_modules
from ctrlnet.interfaces.api import codec
from ctrlnet.interfaces.api.a1111_payload import Catalog, response, translate
from ctrlnet.interfaces.api.context import ServiceContext
from ctrlnet.interfaces.api.errors import ErrorBody, http_error, scrub_paths
from ctrlnet.interfaces.api.jobs import CANCELLED, DONE, QueueFull

CONTROLNET_API_VERSION = 3  # what sd-webui-controlnet's /controlnet/version answers today


class A1111Error(BaseModel):
    """A1111's error body: the exception's type name, the message (twice, as A1111 sends it)."""

    error: str = Field(description="the kind of error")
    detail: str = Field(description="a readable message naming the cause; never a server path")
    body: str = ""
    errors: str = ""


_WORDS = {400: "unreadable input (not base64, not an image, malformed JSON)", 401: "missing or wrong token",
          409: "interrupted", 413: "body or image too large",
          422: "a field out of range, unknown, or refused (see README: Using A1111 API clients)",
          429: "queue full; see Retry-After", 503: "the server lacks a file this needs"}


def _errors(*codes: int) -> dict:
    # 401 (the service's auth) and 413 (its body limit) are answered before these routes run, in
    # the service's own error shape
    return {c: {"model": ErrorBody if c in (401, 413) else A1111Error, "description": _WORDS[c]} for c in codes}


def _query_flag(request: Request, name: str) -> bool:
    """A query flag read as a browser form would send it: 1/true/yes/on, anything else is no (a
    malformed flag is not a validation error, as A1111's routes are forgiving here)."""
    return request.query_params.get(name, "").lower() in ("1", "true", "yes", "on")


def short_hash(label: str) -> str:
    """An 8-hex-digit id for a model that has no file to hash (a folder, the embedded or a random
    model), from its public name: stable and distinct."""
    return hashlib.sha256(label.encode()).hexdigest()[:8]


def base_short_hash(ctx: ServiceContext) -> str:
    """The checkpoint's id in titles and infotexts: A1111's short hash (the file's SHA-256, 10
    digits), or the name-derived id when it was not loaded from one file."""
    return ctx.base_sha256[:10] if ctx.base_sha256 else short_hash(ctx.base_label)


def catalog_for(ctx: ServiceContext) -> Catalog:
    """Titles as A1111 and sd-webui-controlnet show them: "name [short sha256]" for the checkpoint,
    "name [legacy hash]" for ControlNets."""
    return Catalog(f"{ctx.base_label} [{base_short_hash(ctx)}]",
                   {k: f"{k} [{ctx.nets_hash.get(k) or short_hash(label)}]" for k, label in ctx.nets_label.items()})


def _error(status: int, detail: str, kind: str = "HTTPException", headers=None) -> JSONResponse:
    """A1111's error body (``modules/api/api.py`` ``handle_exception``)."""
    detail = scrub_paths(str(detail))
    return JSONResponse({"error": kind, "detail": detail, "body": "", "errors": detail},
                        status_code=status, headers=headers)


def _as_error(exc: BaseException) -> JSONResponse:
    if isinstance(exc, QueueFull):
        return _error(429, str(exc), "QueueFull", {"Retry-After": str(exc.retry_after_s)})
    e = http_error(exc, before_work=True)
    return _error(e.status_code, str(e.detail), type(exc).__name__, getattr(e, "headers", None))


async def _json(request: Request) -> dict:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the JSON body must be an object")
    return data


def _body_schemas(ctx: ServiceContext, cat: Catalog) -> dict[str, dict]:
    """JSON schemas of the bodies (parsed by hand, so published here) with this server's bounds and
    names: the fields most clients send; any other A1111 field is accepted too (see README)."""
    from ctrlnet.sampling.names import sampler_names, schedule_names

    lim = ctx.limits
    num = lambda lo, hi, **kw: {"type": "number", "minimum": lo, "maximum": hi, **kw}  # noqa: E731
    size = {"type": "integer", "minimum": 64, "maximum": lim.max_resolution, "multipleOf": 8}
    b64 = {"type": "string", "description": "base64 image (PNG/JPEG/WebP; a data: URL prefix is accepted)"}
    unit = {"type": "object", "properties": {
        "enabled": {"type": "boolean"}, "image": b64, "mask": {**b64, "nullable": True},
        "module": {"type": "string", "enum": sorted({n for m in a1111_modules.MODULES for n in (m.name, m.label)})},
        "model": {"type": "string", "enum": list(cat.controlnets.values()) + list(cat.controlnets)},
        "weight": num(0, 2), "resize_mode": {"type": "string", "enum": ["Just Resize", "Crop and Resize", "Resize and Fill"]},
        "processor_res": {"type": "integer", "minimum": 64, "maximum": lim.max_resolution},
        "threshold_a": {"type": "number"}, "threshold_b": {"type": "number"},
        "guidance_start": num(0, 1), "guidance_end": num(0, 1),
        "control_mode": {"type": "string", "enum": ["Balanced", "My prompt is more important",
                                                    "ControlNet is more important"]},
        "pixel_perfect": {"type": "boolean"}}, "required": ["model"]}
    common = {
        "prompt": {"type": "string", "maxLength": lim.max_prompt_chars},
        "negative_prompt": {"type": "string", "maxLength": lim.max_prompt_chars},
        "seed": {"type": "integer", "minimum": -1, "maximum": 2**32 - 1},
        "sampler_name": {"type": "string", "enum": sampler_names(with_schedules=True)},
        "scheduler": {"type": "string", "enum": schedule_names()},
        "steps": {"type": "integer", "minimum": 1, "maximum": lim.max_steps}, "cfg_scale": num(0, 50),
        "width": size, "height": size, "batch_size": {"type": "integer", "minimum": 1, "maximum": lim.max_images},
        "n_iter": {"type": "integer", "minimum": 1, "maximum": 1}, "send_images": {"type": "boolean"},
        "alwayson_scripts": {"type": "object", "properties": {"controlnet": {
            "type": "object", "properties": {"args": {"type": "array", "items": unit,
                                                      "maxItems": lim.max_controls}}}}}}
    txt = {"type": "object", "properties": {**common, "enable_hr": {"type": "boolean"},
                                            "hr_scale": num(1, 8), "denoising_strength": num(0, 1)}}
    img = {"type": "object", "required": ["init_images"], "properties": {
        **common, "init_images": {"type": "array", "items": b64, "minItems": 1, "maxItems": 1},
        "mask": b64, "denoising_strength": num(0, 1), "mask_blur": {"type": "integer", "minimum": 0, "maximum": 64},
        "inpainting_fill": {"type": "integer", "enum": [0, 1, 2, 3]}, "inpaint_full_res": {"type": "boolean"},
        "inpaint_full_res_padding": {"type": "integer", "minimum": 0, "maximum": 256},
        "inpainting_mask_invert": {"type": "integer", "enum": [0, 1]},
        "resize_mode": {"type": "integer", "enum": [0, 1, 2, 3]}}}
    detect = {"type": "object", "required": ["controlnet_module", "controlnet_input_images"], "properties": {
        "controlnet_module": unit["properties"]["module"],
        "controlnet_input_images": {"type": "array", "items": b64, "minItems": 1, "maxItems": lim.max_controls},
        "controlnet_processor_res": unit["properties"]["processor_res"],
        "controlnet_threshold_a": {"type": "number"}, "controlnet_threshold_b": {"type": "number"}}}
    return {"txt2img": txt, "img2img": img, "detect": detect}


def _body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _progress_state(job, label: str | None) -> dict:
    """A1111's ``ProgressResponse`` from a job (None = idle)."""
    if job is None:
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.started_wall or job.created_wall))
    interrupted = job.cancel_event.is_set()
    state = {"skipped": False, "interrupted": interrupted, "stopping_generation": False, "job": label or job.kind,
             "job_count": 1, "job_timestamp": stamp, "job_no": 0, "sampling_step": job.step,
             "sampling_steps": job.total}
    return {"progress": round(job.step / max(1, job.total), 4), "eta_relative": round(job.eta_s or 0.0, 3),
            "state": state, "current_image": None, "textinfo": None}


def router_for(ctx: ServiceContext) -> APIRouter:
    """The A1111 and sd-webui-controlnet routes over ``ctx``."""
    r = APIRouter(dependencies=[Depends(ctx.auth)], tags=["a1111"])
    lim = ctx.limits
    labels: OrderedDict[str, str] = OrderedDict()  # job id -> "txt2img"/"img2img" (for progress)
    bodies = _body_schemas(ctx, catalog_for(ctx))

    def decode(s, where):
        return codec.image_from_b64(s, where, lim, keep_alpha=where.startswith("controlnet"))

    async def run(request: Request, mode: str):
        from ctrlnet.interfaces.api.v1 import wait_or_cancel

        cat = catalog_for(ctx)
        try:
            body = await _json(request)
            t = translate(body, mode, cat, decode, max_controls=lim.max_controls)
            job = ctx.submit(t.request, lambda result: response(result, t, cat, codec.png_b64, version="ctrlnet"),
                             keep_partial=True)
        except Exception as e:  # noqa: BLE001 - one map to statuses (422 bad field, 400 bad image, ...)
            return _as_error(e)
        labels[job.id] = mode
        while len(labels) > 64:
            labels.popitem(last=False)
        if not await wait_or_cancel(ctx, request, job):
            return _error(499, "client disconnected; job cancelled")
        if job.state == DONE:
            return job.result
        if job.state == CANCELLED and job.result is not None:
            return job.result  # A1111 answers an interrupted run with the images so far
        if job.state == CANCELLED:
            # stopped before its first step: nothing to show, and the answer says why (never a 5xx)
            info = {"ctrlnet_interrupted": True, "ctrlnet_ignored": t.ignored, "infotexts": [], "all_seeds": [],
                    "seed": t.request.seed, "job_timestamp": t.timestamp}
            return {"images": [], "parameters": t.echo, "info": json.dumps(info)}
        e = http_error(job.error, before_work=False)
        return _error(e.status_code, str(e.detail), type(job.error).__name__)

    @r.post("/sdapi/v1/txt2img", responses=_errors(400, 401, 413, 422, 429, 503), openapi_extra=_body(bodies["txt2img"]))
    async def txt2img(request: Request) -> Any:
        """A1111 txt2img with ``alwayson_scripts.controlnet.args`` units; see README for the fields."""
        return await run(request, "txt2img")

    @r.post("/sdapi/v1/img2img", responses=_errors(400, 401, 413, 422, 429, 503), openapi_extra=_body(bodies["img2img"]))
    async def img2img(request: Request) -> Any:
        """A1111 img2img (init_images, mask, inpainting fields) with ControlNet units."""
        return await run(request, "img2img")

    @r.get("/sdapi/v1/progress", responses=_errors(401))
    def progress(request: Request) -> dict:
        """The running job's progress (any job of this server, /v1 ones included). ``current_image``:
        a live preview of the last step's x0 estimate (A1111's "Approx cheap": latent resolution,
        the batch as a grid, base64 PNG), null before the first step or with
        ``?skip_current_image=true`` (read by hand like ``alias_names``: a malformed flag means no)."""
        skip_current_image = _query_flag(request, "skip_current_image")
        job = ctx.queue.current()
        out = _progress_state(job, labels.get(job.id) if job is not None else None)
        x0 = job.preview if job is not None else None
        if x0 is not None and not skip_current_image:
            from ctrlnet.generation.preview import cheap_preview

            try:
                out["current_image"] = codec.png_b64(cheap_preview(x0))
            except ValueError:  # latents without preview factors (not 4 channels): no preview
                pass
        return out

    @r.post("/sdapi/v1/interrupt", responses=_errors(401))
    def interrupt() -> dict:
        """Stop the running job at its next step (A1111's interrupt)."""
        job = ctx.queue.current()
        if job is not None:
            ctx.queue.cancel(job.id)
        return {}

    @r.post("/sdapi/v1/skip", responses=_errors(401))
    def skip() -> dict:
        """A1111 skips to the next image of a batch count; here a request is one job, so skip stops it
        like interrupt."""
        return interrupt()

    @r.get("/sdapi/v1/samplers", responses=_errors(401))
    def samplers() -> list[dict]:
        from ctrlnet.sampling.names import COMBINED_ALIASES, SAMPLER_ALIASES, SAMPLER_LABELS
        from ctrlnet.sampling.registry import sampler_spec

        out = []
        for key, label in SAMPLER_LABELS.items():
            aliases = [key] + [a for a, k in SAMPLER_ALIASES.items() if k == key] + \
                      [a for a, (k, _) in COMBINED_ALIASES.items() if k == key]
            opts = {name: str(o.default) for name, o in sampler_spec(key).options.items()}
            out.append({"name": label, "aliases": aliases, "options": opts})
        return out

    @r.get("/sdapi/v1/schedulers", responses=_errors(401))
    def schedulers() -> list[dict]:
        from ctrlnet.sampling.names import SCHEDULE_ALIASES, SCHEDULE_LABELS

        rows = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}]
        for key, label in SCHEDULE_LABELS.items():
            aliases = [a for a, k in SCHEDULE_ALIASES.items() if k == key] or None
            rows.append({"name": key, "label": label, "aliases": aliases,
                         "default_rho": {"karras": 7.0, "karras_min": 3.0}.get(key, -1), "need_inner_model": False})
        return rows

    @r.get("/sdapi/v1/sd-models", responses=_errors(401))
    def sd_models() -> list[dict]:
        cat = catalog_for(ctx)
        name = ctx.base_label
        return [{"title": cat.base_title, "model_name": name.rsplit(".", 1)[0] if "." in name else name,
                 "hash": base_short_hash(ctx), "sha256": ctx.base_sha256, "filename": name, "config": None}]

    @r.get("/sdapi/v1/options", responses=_errors(401))
    def options() -> dict:
        return {"sd_model_checkpoint": catalog_for(ctx).base_title, "sd_checkpoint_hash": ctx.base_sha256,
                "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png",
                "eta_noise_seed_delta": 0, "control_net_unit_count": lim.max_controls,
                "control_net_no_detectmap": False}

    @r.post("/sdapi/v1/options", responses=_errors(400, 401, 413, 422))
    async def set_options(request: Request) -> Any:
        """A1111 stores settings server-wide; here nothing is shared between requests, so only a
        ``sd_model_checkpoint`` naming the loaded model is accepted (another one is refused) and every
        other key is answered in ``ctrlnet_ignored`` (send it per request in ``override_settings``)."""
        try:
            body = await _json(request)
            want = body.get("sd_model_checkpoint")
            if want is not None and not (isinstance(want, str) and catalog_for(ctx).is_base(want)):
                raise ValueError(f"sd_model_checkpoint={want!r}: this server has only "
                                 f"{catalog_for(ctx).base_title!r} loaded")
        except Exception as e:  # noqa: BLE001
            return _as_error(e)
        return {"ctrlnet_ignored": {k: "settings are per request here: send it in override_settings"
                                    for k in body if k != "sd_model_checkpoint"}}

    @r.get("/sdapi/v1/scripts", responses=_errors(401))
    def scripts() -> dict:
        # webuiapi asks this to learn which extensions exist: ControlNet is built in
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @r.get("/controlnet/version", responses=_errors(401))
    def cn_version() -> dict:
        return {"version": CONTROLNET_API_VERSION}

    @r.get("/controlnet/model_list", responses=_errors(401))
    def cn_model_list() -> dict:
        return {"model_list": list(catalog_for(ctx).controlnets.values())}

    @r.get("/controlnet/module_list", responses=_errors(401))
    def cn_module_list(request: Request) -> dict:
        """``?alias_names=true`` for the UI labels. (Query flags are read by hand, so a malformed one
        means "no" as in a browser form, rather than a validation error.)"""
        alias_names = _query_flag(request, "alias_names")
        return {"module_list": a1111_modules.module_list(alias_names),
                "module_detail": a1111_modules.module_detail(alias_names)}

    @r.get("/controlnet/settings", responses=_errors(401))
    def cn_settings() -> dict:
        return {"control_net_unit_count": lim.max_controls}

    @r.post("/controlnet/detect", responses=_errors(400, 401, 409, 413, 422, 429, 503),
            openapi_extra=_body(bodies["detect"]))
    async def cn_detect(request: Request) -> Any:
        """Run a module on images: ``controlnet_module``, ``controlnet_input_images`` (webuiapi sends
        ``controlnet_images``), ``controlnet_processor_res``, ``controlnet_threshold_a``/``_b``."""
        from ctrlnet.annotators import run_annotator
        from ctrlnet.image import resize_image
        from ctrlnet.interfaces.api.v1 import wait_or_cancel

        try:
            body = await _json(request)
            module = a1111_modules.resolve_module(body.get("controlnet_module", "none"), "controlnet_module")
            if module.annotator == "inpaint":
                raise ValueError("controlnet_module: inpaint maps are built from an init image and a mask at "
                                 "generation time; there is nothing to detect")
            images = body.get("controlnet_input_images", body.get("controlnet_images")) or []
            if not isinstance(images, list) or not images:
                raise ValueError("controlnet_input_images: no image given")
            if len(images) > lim.max_controls:
                raise ValueError(f"{len(images)} images; the limit is {lim.max_controls}")
            arrays = [decode(s, f"controlnet_input_images[{i}]") for i, s in enumerate(images)]
            params = module.params({"threshold_a": body.get("controlnet_threshold_a", -1),
                                    "threshold_b": body.get("controlnet_threshold_b", -1)})
            res = module.resolution(body.get("controlnet_processor_res", -1))
            if res is not None and res > lim.max_resolution:
                raise ValueError(f"controlnet_processor_res={res} is out of range: must be at most {lim.max_resolution}")
        except Exception as e:  # noqa: BLE001
            return _as_error(e)

        def work(progress, cancel):
            from ctrlnet.image import HWC3

            out = []
            for k, img in enumerate(arrays):
                src = resize_image(HWC3(img), res) if res else HWC3(img)
                out.append(codec.png_b64(src if module.annotator is None else
                                         run_annotator(module.annotator, src, **params)))
                progress(k + 1, len(arrays))
            return {"images": out, "info": "Success"}

        try:
            job = ctx.queue.submit(work, len(arrays), kind="annotate")
        except QueueFull as e:
            return _as_error(e)
        if not await wait_or_cancel(ctx, request, job):
            return _error(499, "client disconnected")
        if job.state == DONE:
            return job.result
        if job.state == CANCELLED:
            return _error(409, "detection was interrupted")
        e = http_error(job.error, before_work=False)
        return _error(e.status_code, str(e.detail), type(job.error).__name__)

    return r
