"""The ``/v1`` routes: generation as a job (``/v1/jobs``) or synchronously (``/v1/generate``),
annotators alone (``/v1/annotate``), what the server has loaded (``/v1/models``).

Bodies are JSON with base64 images (or multipart with image files) and are turned into a
:class:`~ctrlnet.generation.request.GenerationRequest` only by
:func:`ctrlnet.interfaces.request_io.request_from_dict`; images are decoded only by
:mod:`.codec`. The pydantic models below document the bodies (the OpenAPI document adds this
server's bounds and enums to them, see :mod:`.openapi`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ctrlnet.generation.request import GenerationRequest
from ctrlnet.interfaces.api import codec
from ctrlnet.interfaces.api.context import ServiceContext
from ctrlnet.interfaces.api.errors import ErrorBody, http_error
from ctrlnet.interfaces.api.jobs import CANCELLED, DONE, FAILED, Job, JobExpired, JobNotFound

# ---- bodies (documentation and response shapes) -------------------------------------------------

# A 16x16 PNG (a white square on black) for the documented examples (and so a fuzzer's explicit
# examples reach the annotators and the units).
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAH0lEQVR42mNgGPqAEZnz//9/7IoYEcqYSLVhVMNIAQDU3gMQ"
               "8xD61AAAAABJRU5ErkJggg==")


class ControlBody(BaseModel):
    """One ControlNet unit (sd-webui-controlnet's unit fields, our names)."""

    image: Optional[str] = Field(None, description="base64 image (PNG/JPEG/WebP; a data: URL prefix is accepted); "
                                                   "null with an init_image: the unit uses the init image")
    model: Optional[str] = Field(None, description="a ControlNet name from GET /v1/models; null = the first")
    annotator: Optional[str] = Field(None, description="annotator run on the image; null/'none' = the image is a map")
    annotator_params: dict[str, Any] = Field(default_factory=dict,
                                             description="the annotator's settable parameters (GET /v1/models)")
    detect_resolution: Optional[int] = Field(None, description="short side the annotator runs at; null = the output's")
    pixel_perfect: bool = Field(False, description="run the annotator at the resolution that maps the image 1:1")
    strength: float = Field(1.0, ge=0, le=2, description="the unit's weight")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps where the unit starts acting")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps where it stops")
    control_mode: str = Field("balanced", description="balanced | prompt (my prompt is more important) | "
                                                      "controlnet (ControlNet is more important)")
    resize_mode: str = Field("crop_and_resize", description="how a map of another aspect is fitted")
    guess_mode: Optional[bool] = Field(None, description="true = control_mode 'controlnet'; null = the request's")
    hr_option: str = Field("both", description="the hires-fix passes it acts in: both | low_res_only | "
                                               "high_res_only (sd-webui-controlnet)")


class GenerateBody(BaseModel):
    """A generation request: txt2img, img2img (init_image), inpainting (+ mask), hires fix, units."""

    model_config = {"json_schema_extra": {"examples": [
        {"prompt": "a house", "seed": 1, "steps": 2, "resolution": 64},
        {"prompt": "a box", "seed": 2, "steps": 2, "width": 64, "height": 64,
         "controls": [{"image": EXAMPLE_PNG, "annotator": "canny", "control_mode": "prompt"}]},
        {"prompt": "a box", "seed": 3, "steps": 2, "width": 64, "height": 64, "init_image": EXAMPLE_PNG,
         "mask": EXAMPLE_PNG, "denoising_strength": 0.5}]}}

    prompt: str = ""
    added_prompt: Optional[str] = Field(None, description="appended to the prompt; null = the model's default")
    negative_prompt: Optional[str] = Field(None, description="null = the model's default")
    controls: list[ControlBody] = Field(default_factory=list, description="ControlNet units")
    num_images: int = Field(1, description="images in the batch; image k uses seed + k")
    resolution: Optional[int] = Field(None, description="short side when width/height are not given; "
                                                        "null = the model's (GET /v1/models: defaults), else 512 "
                                                        "(at most the server's max_resolution)")
    width: Optional[int] = Field(None, description="output width (multiple of 8), with height; null = from resolution")
    height: Optional[int] = Field(None, description="output height (multiple of 8), with width")
    max_pixels: Optional[int] = Field(None, description="refuse outputs larger than this many pixels per image")
    steps: Optional[int] = Field(None, description="null = the model's, else 20 (at most the server's max_steps)")
    guidance_scale: Optional[float] = Field(None, description="CFG scale; null = the model's, else 9")
    seed: int = Field(-1, description="-1 = random; the seeds used are returned")
    eta: Optional[float] = Field(None, description="null = the sampler's (DDIM 0, ancestral/SDE samplers 1)")
    preset: Optional[str] = Field(None, description="sampler, schedule and steps by name (\"fast\": 10 steps "
                                                    "of UniPC order 1, Karras Min); the fields given here win")
    sampler: Optional[str] = Field(None, description="a key or an A1111 name: \"Euler a\", \"DPM++ 2M Karras\", "
                                                     "\"UniPC\"...; null = the preset's, else DDIM")
    schedule: Optional[str] = Field(None, description="null = the one in the sampler name, else the sampler's")
    guess_mode: bool = Field(False, description="every unit in 'controlnet' mode")
    only_mid_control: bool = False
    clip_skip: int = Field(1, description="1 or 2")
    prompt_chunks: int = Field(1, description="at least this many 75-token windows")
    init_image: Optional[str] = Field(None, description="img2img/inpaint: base64 image to start from")
    denoising_strength: float = Field(0.75, description="img2img: 0 = the image, 1 = pure noise")
    mask: Optional[str] = Field(None, description="inpaint: base64 mask, white = repaint (needs init_image)")
    mask_blur: float = Field(4.0, description="inpaint: Gaussian sigma of the mask, px")
    inpaint_fill: str = Field("original", description="what the masked area starts from")
    only_masked: bool = Field(False, description="inpaint the mask's box at full size and paste it back")
    only_masked_padding: int = Field(32, description="px around the mask's box with only_masked")
    hires_scale: float = Field(1.0, description="hires fix: > 1 upscales and runs a second pass")
    hires_steps: int = Field(0, description="hires pass steps; 0 = steps")
    hires_denoising_strength: float = 0.7
    hires_upscaler: str = Field("latent", description="latent | lanczos")
    tile_size: Optional[int] = Field(None, description="denoise and decode in tiles of this many px")
    tile_overlap: int = Field(64, description="px of feathered overlap between tiles")
    loras: list[tuple[str, float]] = Field(default_factory=list,
                                           description="[name, weight] pairs; names as the server lists them")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying 'parameters' (A1111 infotext) and 'ctrlnet' chunks")
    seeds: list[int] = Field(description="the seed of each image")
    infotexts: list[str] = Field(description="each image's A1111 'parameters' text")
    control_maps: list[str] = Field(description="base64 PNGs of the maps the units used")
    seed: int = Field(description="the batch's seed (image k used seed + k)")
    parameters: str = Field(description="the first image's infotext")
    request: dict[str, Any] = Field(description="the request with the seed used and its images: "
                                                "posted back as is, it makes the same images")


class JobStatus(BaseModel):
    id: str
    kind: str = Field(description="generate | annotate")
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    step: int = Field(description="sampling steps done")
    total: int = Field(description="sampling steps expected")
    eta_s: Optional[float] = Field(None, description="seconds until it should be done, from measured step times")
    position: Optional[int] = Field(None, description="0 = running, k = k-th waiting, null = finished")
    created: float = Field(description="Unix time")
    started: Optional[float] = None
    finished: Optional[float] = None
    error: Optional[str] = Field(None, description="why it failed")
    error_status: Optional[int] = Field(None, description="the HTTP status the failure maps to")
    result: Optional[GenerateResponse] = Field(None, description="when done (generate jobs)")


class AnnotateBody(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{"image": EXAMPLE_PNG, "annotator": "canny",
                                                        "params": {"low_threshold": 50}}]}}

    image: str = Field(description="base64 image")
    annotator: str
    params: dict[str, Any] = Field(default_factory=dict)
    resolution: Optional[int] = Field(None, description="resize the short side first, as the apps do")


class AnnotateResponse(BaseModel):
    image: str


# Statuses every /v1 route may answer with, with the shared error schema.
def _errors(*codes: int) -> dict:
    words = {400: "unreadable input", 401: "missing or wrong bearer token", 404: "unknown job",
             409: "the job was cancelled", 410: "the job's result expired", 413: "body or image too large",
             422: "a parameter out of range, unknown or of the wrong type", 429: "queue full; see Retry-After",
             503: "the server lacks a file this needs"}
    out = {c: {"model": ErrorBody, "description": words[c]} for c in codes}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"description": "seconds until a slot should free (measured)",
                                               "schema": {"type": "integer", "minimum": 1}}}
    return out


def _schema_extra(model: type[BaseModel], multipart: dict | None = None) -> dict:
    examples = model.model_config.get("json_schema_extra", {}).get("examples", [])
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"},
                                    "examples": {f"example{i}": {"value": v} for i, v in enumerate(examples)}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": multipart}}
    return {"requestBody": {"required": True, "content": content}}


_GENERATE_MULTIPART = {
    "request": {"type": "string", "description": "JSON of GenerateBody without images"},
    "control": {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "control images, in the order of request.controls"},
    "init_image": {"type": "string", "format": "binary"},
    "mask": {"type": "string", "format": "binary"},
}


# ---- reading bodies -----------------------------------------------------------------------------

async def _read_json(request: Request) -> dict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the JSON body must be an object")
    return data


async def _read_form(request: Request, max_files: int):
    from ctrlnet.interfaces.api.app import BodyTooLarge

    try:
        return await request.form(max_files=max_files, max_fields=32)
    except BodyTooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's malformed body
        raise HTTPException(400, f"malformed multipart body: {e}") from None


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def _file(form, name: str) -> bytes | None:
    up = form.get(name)
    if up is None or up == "":
        return None
    if not hasattr(up, "read"):
        raise HTTPException(422, f"'{name}' must be a file")
    return await up.read()


async def read_generate(request: Request, ctx: ServiceContext):
    """The request body (JSON or multipart) -> a GenerationRequest, images decoded and every field
    checked (400/413/422 naming the cause)."""
    from ctrlnet.interfaces.request_io import request_from_dict, with_model_defaults

    lim = ctx.limits
    init_blob = mask_blob = None
    if _is_multipart(request):
        form = await _read_form(request, lim.max_controls + 2)
        try:
            data = json.loads(form.get("request") or "{}")
        except (json.JSONDecodeError, TypeError) as e:
            raise HTTPException(400, f"malformed JSON in the 'request' field: {e}") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the 'request' field must be a JSON object")
        uploads = form.getlist("control")
        if any(not hasattr(u, "read") for u in uploads):
            raise HTTPException(422, "'control' fields must be files")
        blobs = [await u.read() for u in uploads]
        init_blob, mask_blob = await _file(form, "init_image"), await _file(form, "mask")
        for k in ("init_image", "mask"):
            if data.get(k) is not None:
                raise HTTPException(422, f"multipart: send {k} as a file field, not inside 'request'")
    else:
        data = await _read_json(request)
        controls = data.get("controls") or []
        if not isinstance(controls, list):
            raise HTTPException(422, "controls must be a list")
        if len(controls) > lim.max_controls:
            raise HTTPException(422, f"{len(controls)} controls; the limit is {lim.max_controls}")
        blobs = []
        for i, c in enumerate(controls):
            if not isinstance(c, dict):
                raise HTTPException(422, f"controls[{i}] must be an object")
            img = c.get("image")
            blobs.append(None if img is None else codec.decode_b64(img, f"controls[{i}].image"))
        data = {**data, "controls": [{k: v for k, v in c.items() if k != "image"} for c in controls]}
        init_b64, mask_b64 = data.pop("init_image", None), data.pop("mask", None)
        init_blob = None if init_b64 is None else codec.decode_b64(init_b64, "init_image")
        mask_blob = None if mask_b64 is None else codec.decode_b64(mask_b64, "mask")
    if len(blobs) > lim.max_controls:
        raise HTTPException(422, f"{len(blobs)} controls; the limit is {lim.max_controls}")
    images = [None if b is None else codec.decode_image(b, f"controls[{i}].image", lim, keep_alpha=True)
              for i, b in enumerate(blobs)]
    init = None if init_blob is None else codec.decode_image(init_blob, "init_image", lim)
    mask = None if mask_blob is None else codec.decode_image(mask_blob, "mask", lim, keep_alpha=True)
    data = with_model_defaults(data, ctx.models.defaults)
    # without a model default, the request's default, within this server's bounds
    if data.get("resolution") is None:
        data["resolution"] = min(GenerationRequest.resolution, lim.max_resolution)
    if data.get("steps") is None:
        data["steps"] = min(GenerationRequest.steps, lim.max_steps)
    try:
        return request_from_dict(data, images, init_image=init, mask=mask)
    except (ValueError, KeyError) as e:
        raise http_error(e) from None


# ---- responses ----------------------------------------------------------------------------------

def postable_request(req, result) -> dict:
    """The request a response returns: ``result.request`` (seed and prompts as used) with the
    size fields as the client gave them (so a size decided by an image is decided again the same
    way) and its images as base64 PNGs, so that posting it back makes the same images."""
    d = result.request.to_dict()
    d.pop("noise_device", None)
    d["width"], d["height"] = req.width, req.height
    for i, c in enumerate(req.controls):
        if c.image is not None:
            d["controls"][i]["image"] = codec.png_b64(c.image)
    if req.init_image is not None:
        d["init_image"] = codec.png_b64(req.init_image)
    if req.mask is not None:
        d["mask"] = codec.png_b64(req.mask)
    return d


def generation_payload(ctx: ServiceContext, req, result) -> dict:
    """A finished generation as the /v1 responses return it (see :class:`GenerateResponse`)."""
    chunks = [ctx.image_chunks(result, k) for k in range(len(result.images))]
    return {"images": [codec.png_b64(im, ch) for im, ch in zip(result.images, chunks)],
            "seeds": list(result.seeds), "infotexts": [ch["parameters"] for ch in chunks],
            "control_maps": [codec.png_b64(m) for m in result.control_maps],
            "seed": result.seed, "parameters": chunks[0]["parameters"] if chunks else "",
            "request": postable_request(req, result)}


def job_status(ctx: ServiceContext, job: Job) -> dict:
    snap = job.snapshot()
    out = {**snap, "position": ctx.queue.position(job),
           "error": None, "error_status": None, "result": None}
    if job.state == FAILED and job.error is not None:
        err = http_error(job.error, before_work=False)
        out["error"], out["error_status"] = err.detail, err.status_code
    elif job.state == DONE and out["kind"] == "generate":
        out["result"] = job.result
    return out


JobId = Path(pattern="^[0-9a-f]{32}$", description="the id POST /v1/jobs returned")


def _lookup(ctx: ServiceContext, job_id: str) -> Job:
    try:
        return ctx.queue.get(job_id)
    except JobExpired as e:
        raise HTTPException(410, str(e.args[0])) from None
    except JobNotFound as e:
        raise HTTPException(404, str(e.args[0])) from None


async def _answer(ctx, request, job):
    """A synchronous route's answer once its job ends: the result, 409 when cancelled, the job's
    error mapped to a status, or 499 (job cancelled) when the client went away meanwhile."""
    if not await wait_or_cancel(ctx, request, job):
        return JSONResponse({"detail": "client disconnected; job cancelled"}, status_code=499)
    if job.state == DONE:
        return job.result
    if job.state == CANCELLED:
        raise HTTPException(409, f"job {job.id} was cancelled")
    raise http_error(job.error, before_work=False)


async def wait_or_cancel(ctx: ServiceContext, request: Request, job: Job, poll_s: float = 0.25) -> bool:
    """Wait for ``job``; if the client goes away first, cancel the job (it stops at its next step)
    and return False."""
    waiter = asyncio.ensure_future(ctx.queue.wait(job))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll_s)
            if done:
                return True
            if await request.is_disconnected():
                ctx.queue.cancel(job.id)
                return False
    finally:
        if not waiter.done():
            waiter.cancel()


# ---- the router ---------------------------------------------------------------------------------

def router_for(ctx: ServiceContext) -> APIRouter:
    """The /v1 routes over ``ctx`` (auth applied to each)."""
    r = APIRouter(prefix="/v1", dependencies=[Depends(ctx.auth)], tags=["v1"])
    lim = ctx.limits

    def submit_generation(req):
        return ctx.submit(req, lambda result: generation_payload(ctx, req, result))

    @r.get("/models", responses=_errors(401))
    def list_models() -> dict[str, Any]:
        """The loaded models, their defaults, the annotators with their settable parameters, the limits."""
        from ctrlnet.annotators import list_annotators
        from ctrlnet.interfaces.request_io import public_params
        from ctrlnet.sampling.names import sampler_names, schedule_names

        annotators = {}
        for name in list_annotators():
            try:
                annotators[name] = public_params(name)
            except Exception:  # noqa: BLE001 - an annotator whose module cannot import here
                continue
        return {"base": ctx.base_label, "config": ctx.models.config.name, "controlnets": list(ctx.nets_label),
                "defaults": ctx.models.defaults, "annotators": annotators, "samplers": sampler_names(),
                "schedules": schedule_names(), "limits": asdict(lim),
                "seconds_per_step": round(ctx.queue.seconds_per_step(), 4)}

    @r.post("/generate", response_model=GenerateResponse, responses=_errors(400, 401, 409, 413, 422, 429, 503),
            openapi_extra=_schema_extra(GenerateBody, _GENERATE_MULTIPART))
    async def generate_now(request: Request):
        """Generate and wait for the images. A client that disconnects cancels its job."""
        req = await read_generate(request, ctx)
        job = submit_generation(req)
        return await _answer(ctx, request, job)

    @r.post("/jobs", status_code=202, response_model=JobStatus, responses=_errors(400, 401, 413, 422, 429),
            openapi_extra=_schema_extra(GenerateBody, _GENERATE_MULTIPART))
    async def submit_job(request: Request):
        """Queue a generation; poll GET /v1/jobs/{id} or stream GET /v1/jobs/{id}/events."""
        req = await read_generate(request, ctx)
        job = submit_generation(req)
        return JSONResponse(job_status(ctx, job), status_code=202)

    @r.get("/jobs", response_model=list[JobStatus], responses=_errors(401))
    def list_jobs():
        """Every job still kept (finished ones oldest first, then the running one, then the queue), without results."""
        return [{**job_status(ctx, j), "result": None} for j in ctx.queue.jobs()]

    @r.get("/jobs/{job_id}", response_model=JobStatus, responses=_errors(401, 404, 410, 422))
    def get_job(job_id: str = JobId):
        """State, progress, ETA, queue position; the images once done."""
        return job_status(ctx, _lookup(ctx, job_id))

    @r.delete("/jobs/{job_id}", response_model=JobStatus, responses=_errors(401, 404, 410, 422))
    def cancel_job(job_id: str = JobId):
        """Cancel: a queued job never starts, a running one stops at its next step (state turns
        'cancelled' then); a finished one is left as it is."""
        return job_status(ctx, ctx.queue.cancel(_lookup(ctx, job_id).id))

    @r.get("/jobs/{job_id}/events", responses={
        200: {"description": "server-sent events: 'queued'/'running' with the job's progress, then one of "
                             "'done'/'failed'/'cancelled' (the stream ends)",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **_errors(401, 404, 410, 422)})
    async def job_events(job_id: str = JobId):
        """Progress as server-sent events (each event's data is the JSON of JobStatus without the result)."""
        from sse_starlette.sse import EventSourceResponse

        job = _lookup(ctx, job_id)

        async def stream():
            async for snap in ctx.queue.events(job):
                data = dict(snap)
                if snap["state"] == FAILED and job.error is not None:
                    err = http_error(job.error, before_work=False)
                    data.update(error=err.detail, error_status=err.status_code)
                yield {"event": snap["state"], "data": json.dumps(data)}

        return EventSourceResponse(stream(), ping=10)

    @r.post("/annotate", response_model=AnnotateResponse, responses=_errors(400, 401, 413, 422, 429, 503),
            openapi_extra=_schema_extra(AnnotateBody, {
                "image": {"type": "string", "format": "binary"}, "annotator": {"type": "string"},
                "params": {"type": "string", "description": "JSON object"},
                "resolution": {"type": "integer"}}))
    async def annotate(request: Request):
        """Run one annotator on an image and return the control map."""
        from ctrlnet.annotators import list_annotators, run_annotator
        from ctrlnet.image import resize_image
        from ctrlnet.interfaces.request_io import check_annotator_params

        if _is_multipart(request):
            form = await _read_form(request, 1)
            blob = await _file(form, "image")
            if blob is None:
                raise HTTPException(422, "the 'image' field must be a file")
            try:
                params = json.loads(form.get("params") or "{}")
            except (json.JSONDecodeError, TypeError) as e:
                raise HTTPException(400, f"malformed JSON in 'params': {e}") from None
            res = form.get("resolution")
            try:
                res = int(res) if res not in (None, "") else None
            except (TypeError, ValueError):
                raise HTTPException(422, f"resolution={res!r} must be a whole number") from None
            data = {"annotator": form.get("annotator"), "params": params, "resolution": res}
        else:
            data = await _read_json(request)
            blob = codec.decode_b64(data.get("image"), "image")
        name = data.get("annotator")
        if not isinstance(name, str) or name not in list_annotators():
            raise HTTPException(422, f"annotator={name!r} is unknown; known: {', '.join(list_annotators())}")
        res = data.get("resolution")
        if res is not None and (isinstance(res, bool) or not isinstance(res, int)
                                or not 64 <= res <= lim.max_resolution):
            raise HTTPException(422, f"resolution={res!r} is out of range: must be between 64 and {lim.max_resolution}")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise HTTPException(422, "params must be an object")
        try:
            params = check_annotator_params(name, params, "params") if params else {}
        except ValueError as e:
            raise http_error(e) from None
        img = codec.decode_image(blob, "image", lim)

        def work(progress, cancel):
            src = resize_image(img, res) if res else img
            out = {"image": codec.png_b64(run_annotator(name, src, **params))}
            progress(1, 1)
            return out

        job = ctx.queue.submit(work, 1, kind="annotate")
        return await _answer(ctx, request, job)

    return r
