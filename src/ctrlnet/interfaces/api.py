"""HTTP API (FastAPI): a thin layer over :func:`ctrlnet.pipeline.generate`.

Endpoints: ``POST /v1/generate`` (JSON with base64 images, or multipart), ``POST /v1/annotate``,
``GET /v1/models``, ``GET /health``; the OpenAPI schema is at ``/openapi.json`` (docs at ``/docs``).

Everything a request could make expensive is checked before work starts: body size (413), image
pixels (413), resolution/steps/images per request (422). One job runs at a time per server (one
device); at most ``Limits.max_queue`` jobs wait or run, more get 429 with ``Retry-After``. With a
token set, ``/v1/*`` needs ``Authorization: Bearer <token>``. Clients never name files: models are
chosen by the names the server loaded, annotator folders and devices are the operator's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ctrlnet.image import ImageError, load_image, resize_image
from ctrlnet.interfaces.limits import Limits
from ctrlnet.interfaces.outputs import png_bytes, result_chunks
from ctrlnet.interfaces.request_io import (check_annotator_params, public_params, request_from_dict,
                                           with_model_defaults)


# ---- schema (documentation and response shapes) -----------------------------------------------

class ControlBody(BaseModel):
    image: str = Field(description="base64 image (PNG/JPEG/WebP; a data: URL prefix is accepted)")
    model: Optional[str] = Field(None, description="a ControlNet name from GET /v1/models; default the first")
    annotator: Optional[str] = Field(None, description="annotator to run on the image; null/'none' = the image is a control map")
    annotator_params: dict[str, Any] = Field(default_factory=dict, description="the annotator's settable parameters")
    detect_resolution: Optional[int] = None
    strength: float = Field(1.0, ge=0, le=2)
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)
    guess_mode: Optional[bool] = None


class GenerateBody(BaseModel):
    prompt: str = ""
    added_prompt: Optional[str] = Field(None, description="null = the model's default")
    negative_prompt: Optional[str] = Field(None, description="null = the model's default")
    controls: list[ControlBody] = Field(default_factory=list)
    num_images: int = 1
    resolution: Optional[int] = Field(None, description="null = the model's (GET /v1/models: defaults), else 512")
    preset: Optional[str] = Field(None, description="sampler, schedule and steps by name (\"fast\": 10 Euler "
                                                    "steps); the fields given here win")
    steps: Optional[int] = Field(None, description="null = the preset's, else the model's, else 20")
    guidance_scale: Optional[float] = Field(None, description="null = the model's, else 9")
    seed: int = Field(-1, description="-1 = random; the seed used is returned")
    eta: Optional[float] = Field(None, description="null = the sampler's (DDIM 0, ancestral/SDE samplers 1)")
    sampler: Optional[str] = Field(None, description="a key or an A1111 name: \"Euler a\", \"DPM++ 2M Karras\", "
                                                     "\"UniPC\"...; null = the preset's, else ddim")
    schedule: Optional[str] = Field(None, description="null = the one in the sampler name, else the sampler's")
    guess_mode: bool = False
    only_mid_control: bool = False
    clip_skip: int = 1


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs carrying 'parameters' and 'ctrlnet' text chunks")
    control_maps: list[str]
    seed: int
    parameters: str
    request: dict[str, Any]


class AnnotateBody(BaseModel):
    image: str = Field(description="base64 image")
    annotator: str
    params: dict[str, Any] = Field(default_factory=dict)
    resolution: Optional[int] = Field(None, description="resize the short side first, as the apps do")


class AnnotateResponse(BaseModel):
    image: str


# ---- plumbing --------------------------------------------------------------------------------

class BodyTooLarge(Exception):
    pass


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` by header, and stop reading past it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            resp = JSONResponse({"detail": f"request body is {int(length)} bytes; the limit is {self.max_bytes}"},
                                status_code=413)
            return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return msg

        await self.app(scope, limited, send)


class JobQueue:
    """One worker thread (one device) and a cap on jobs admitted; over the cap -> QueueFull."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrlnet-job")
        self._avg_s = 2.0  # running mean of job time, for Retry-After

    async def run(self, fn):
        with self._lock:
            if self.pending >= self.capacity:
                raise QueueFull(max(1, math.ceil(self._avg_s * self.pending)))
            self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn)
        finally:
            with self._lock:
                self.pending -= 1

    def _timed(self, fn):
        t = time.monotonic()
        try:
            return fn()
        finally:
            self._avg_s = 0.7 * self._avg_s + 0.3 * (time.monotonic() - t)

    def shutdown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _image_from_bytes(data: bytes, where: str, limits: Limits, keep_alpha: bool = False):
    """Decode an uploaded image, refusing huge ones from the header (413) and non-images (400);
    ``keep_alpha`` for control images (see ``load_image``)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:
        raise HTTPException(400, f"{where} is not a readable image (PNG, JPEG or WebP expected)") from None
    if w * h > limits.max_pixels:
        raise HTTPException(413, f"{where} is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
    try:
        return load_image(data, max_pixels=limits.max_pixels, keep_alpha=keep_alpha)
    except ImageError as e:
        raise HTTPException(400, f"{where}: {e}") from None


def _decode_b64(s, where: str) -> bytes:
    if not isinstance(s, str) or not s:
        raise HTTPException(422, f"{where} must be a base64 string")
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"{where} is not valid base64") from None


async def _read_json(request: Request) -> dict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the JSON body must be an object")
    return data


async def _read_form(request: Request, limits: Limits):
    try:
        return await request.form(max_files=limits.max_controls + 1, max_fields=32)
    except BodyTooLarge:
        raise
    except Exception as e:
        raise HTTPException(400, f"malformed multipart body: {e}") from None


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def _schema_extra(model: type[BaseModel], multipart: dict | None = None) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": multipart}}
    return {"requestBody": {"required": True, "content": content}}


def _public_name(spec) -> str:
    """A model spec without the server's folders (responses never reveal paths)."""
    if spec is None:
        return "demo"
    s = str(spec)
    return s if s.startswith("random:") or s == "demo" else Path(s).name


def create_app(models, limits: Limits | None = None, token: str | None = None, base_name: str | None = None,
               controlnet_names: dict[str, str] | None = None) -> FastAPI:
    """The API app over loaded models (a ``Models`` or a ``LoadedModels`` from ``model_args``)."""
    from ctrlnet.pipeline import generate

    if hasattr(models, "models"):  # LoadedModels: take the specs it remembers
        base_name = base_name or models.base
        controlnet_names = controlnet_names or models.controlnets
        models = models.models
    limits = limits or Limits()
    base_label = _public_name(base_name if base_name is not None else models.base.source)
    nets_label = {k: _public_name((controlnet_names or {}).get(k, k)) for k in models.controlnets}
    queue = JobQueue(limits.max_queue)
    app = FastAPI(title="ctrlnet", version="1", description=__doc__.split("\n\n")[0])
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.queue = queue

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc):
        return JSONResponse({"detail": f"request body is over the limit of {limits.max_body_bytes} bytes"},
                            status_code=413)

    @app.exception_handler(QueueFull)
    async def _busy(request, exc):
        return JSONResponse({"detail": f"busy: {queue.pending} jobs queued (limit {queue.capacity}); retry later"},
                            status_code=429, headers={"Retry-After": str(exc.retry_after)})

    def auth(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), token.encode())):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health():
        return {"status": "ok", "queue": queue.pending, "capacity": queue.capacity, "device": str(models.device)}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    def list_models():
        from ctrlnet.annotators import list_annotators

        annotators = {}
        for name in list_annotators():
            try:
                annotators[name] = public_params(name)
            except Exception:  # an annotator whose module cannot import here (optional dependency)
                continue
        return {"base": base_label, "config": models.config.name, "controlnets": list(nets_label),
                "defaults": models.defaults, "annotators": annotators, "limits": asdict(limits)}

    def build_request(data: dict, images: list):
        if len(images) > limits.max_controls:
            raise HTTPException(422, f"{len(images)} controls; the limit is {limits.max_controls}")
        for k in ("prompt", "added_prompt", "negative_prompt"):
            v = data.get(k)
            if isinstance(v, str) and len(v) > limits.max_prompt_chars:
                raise HTTPException(422, f"{k} is {len(v)} characters; the limit is {limits.max_prompt_chars}")
        try:
            req = request_from_dict(with_model_defaults(data, models.defaults), images)
            req.validate(max_images=limits.max_images, max_resolution=limits.max_resolution,
                         max_steps=limits.max_steps)
        except (ValueError, KeyError) as e:
            raise HTTPException(422, str(e.args[0] if isinstance(e, KeyError) else e)) from None
        for i, c in enumerate(req.controls):
            if c.model is not None and c.model not in models.controlnets:
                raise HTTPException(422, f"controls[{i}].model={c.model!r} is not loaded; loaded: "
                                         f"{', '.join(models.controlnets) or 'none'}")
            if c.detect_resolution is not None and not 64 <= c.detect_resolution <= limits.max_resolution:
                raise HTTPException(422, f"controls[{i}].detect_resolution={c.detect_resolution} is out of range: "
                                         f"must be between 64 and {limits.max_resolution}")
        if req.controls and not models.controlnets:
            raise HTTPException(422, "controls given but the server has no ControlNet loaded")
        return req

    @app.post("/v1/generate", dependencies=[Depends(auth)], response_model=GenerateResponse,
              openapi_extra=_schema_extra(GenerateBody, {
                  "request": {"type": "string", "description": "JSON of GenerateBody without control images"},
                  "control": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "control images, in the order of request.controls"}}))
    async def generate_endpoint(request: Request):
        if _is_multipart(request):
            form = await _read_form(request, limits)
            try:
                data = json.loads(form.get("request") or "{}")
            except json.JSONDecodeError as e:
                raise HTTPException(400, f"malformed JSON in the 'request' field: {e}") from None
            if not isinstance(data, dict):
                raise HTTPException(400, "the 'request' field must be a JSON object")
            uploads = form.getlist("control")
            blobs = [await u.read() if hasattr(u, "read") else None for u in uploads]
            if any(b is None for b in blobs):
                raise HTTPException(422, "'control' fields must be files")
        else:
            data = await _read_json(request)
            controls = data.get("controls") or []
            if not isinstance(controls, list):
                raise HTTPException(422, "controls must be a list")
            if len(controls) > limits.max_controls:
                raise HTTPException(422, f"{len(controls)} controls; the limit is {limits.max_controls}")
            blobs = []
            for i, c in enumerate(controls):
                if not isinstance(c, dict):
                    raise HTTPException(422, f"controls[{i}] must be an object")
                blobs.append(_decode_b64(c.get("image"), f"controls[{i}].image"))
            data = {**data, "controls": [{k: v for k, v in c.items() if k != "image"} for c in controls]}
        images = [_image_from_bytes(b, f"controls[{i}].image", limits, keep_alpha=True) for i, b in enumerate(blobs)]
        req = build_request(data, images)

        def job():
            result = generate(models, req, allow_paths=False)  # clients name LoRAs; no server paths
            chunks = result_chunks(result, base_label, nets_label, str(models.dtype).replace("torch.", ""))
            return {"images": [_b64(png_bytes(im, chunks)) for im in result.images],
                    "control_maps": [_b64(png_bytes(m)) for m in result.control_maps],
                    "seed": result.seed, "parameters": chunks["parameters"],
                    "request": result.request.to_dict()}

        try:
            return await queue.run(job)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        except (ValueError, KeyError) as e:  # e.g. an annotator's own argument check
            raise HTTPException(422, str(e.args[0] if isinstance(e, KeyError) else e)) from None
        except FileNotFoundError as e:  # annotator weights missing on the server
            raise HTTPException(503, f"the server lacks a file this needs: {e}") from None

    @app.post("/v1/annotate", dependencies=[Depends(auth)], response_model=AnnotateResponse,
              openapi_extra=_schema_extra(AnnotateBody, {
                  "image": {"type": "string", "format": "binary"}, "annotator": {"type": "string"},
                  "params": {"type": "string", "description": "JSON object"},
                  "resolution": {"type": "integer"}}))
    async def annotate_endpoint(request: Request):
        from ctrlnet.annotators import list_annotators, run_annotator

        if _is_multipart(request):
            form = await _read_form(request, limits)
            up = form.get("image")
            if up is None or not hasattr(up, "read"):
                raise HTTPException(422, "the 'image' field must be a file")
            blob = await up.read()
            try:
                params = json.loads(form.get("params") or "{}")
            except json.JSONDecodeError as e:
                raise HTTPException(400, f"malformed JSON in 'params': {e}") from None
            res = form.get("resolution")
            data = {"annotator": form.get("annotator"), "params": params,
                    "resolution": int(res) if res and str(res).isdigit() else None}
        else:
            data = await _read_json(request)
            blob = _decode_b64(data.get("image"), "image")
        name = data.get("annotator")
        if name not in list_annotators():
            raise HTTPException(422, f"annotator={name!r} is unknown; known: {', '.join(list_annotators())}")
        res = data.get("resolution")
        if res is not None and (not isinstance(res, int) or not 64 <= res <= limits.max_resolution):
            raise HTTPException(422, f"resolution={res!r} is out of range: must be between 64 and {limits.max_resolution}")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise HTTPException(422, "params must be an object")
        try:
            params = check_annotator_params(name, params, "params") if params else {}
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        img = _image_from_bytes(blob, "image", limits)

        def job():
            src = resize_image(img, res) if res else img
            return {"image": _b64(png_bytes(run_annotator(name, src, **params)))}

        try:
            return await queue.run(job)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        except FileNotFoundError as e:
            raise HTTPException(503, f"the server lacks a file this annotator needs: {e}") from None
        except (ValueError, TypeError) as e:
            raise HTTPException(422, str(e)) from None

    # the request bodies are parsed by hand (one endpoint, two encodings); publish their schemas
    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (GenerateBody, AnnotateBody):
                s = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[m.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
