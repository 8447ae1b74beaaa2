"""What every router of the service shares: the models, the limits, the one job queue, the auth
dependency and the public names of the models; plus the service-level steps all routers take
(check a request against the limits, run it as a job, label its images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import HTTPException

from ctrlnet.generation.request import GenerationRequest
from ctrlnet.interfaces.api.errors import http_error
from ctrlnet.interfaces.api.jobs import Job, JobQueue
from ctrlnet.interfaces.limits import Limits


def public_name(spec) -> str:
    """A model spec without the server's folders (responses never reveal paths)."""
    if spec is None:
        return "demo"
    s = str(spec)
    return s if s.startswith("random:") or s == "demo" else Path(s).name


@dataclass
class ServiceContext:
    """``models``: the loaded :class:`~ctrlnet.generation.bundle.Models`; ``auth``: a FastAPI
    dependency (raises 401 without the bearer token when one is set); ``base_label`` and
    ``nets_label`` (ControlNet key -> public name): model names safe to show clients;
    ``dtype_label``: "float32", "float16"...; ``base_sha256``: the checkpoint file's SHA-256 and
    ``nets_hash``: ControlNet key -> A1111's legacy 8-digit file hash, for models loaded from
    single files (A1111 clients know models by these; see :mod:`ctrlnet.checkpoints.hashes`)."""

    models: object
    limits: Limits
    queue: JobQueue
    auth: Callable
    base_label: str
    nets_label: dict[str, str]
    dtype_label: str
    base_sha256: str | None = None
    nets_hash: dict[str, str] = field(default_factory=dict)

    def check(self, req: GenerationRequest):
        """Check ``req`` against the limits and the loaded models and plan it (nothing heavy runs).
        Returns the :class:`~ctrlnet.generation.plan.Plan`. Raises HTTPException 422 (400 for an
        unreadable image) naming the first problem."""
        from ctrlnet.generation.plan import make_plan

        lim = self.limits
        if len(req.controls) > lim.max_controls:
            raise HTTPException(422, f"{len(req.controls)} controls; the limit is {lim.max_controls}")
        for k in ("prompt", "added_prompt", "negative_prompt"):
            v = getattr(req, k)
            if isinstance(v, str) and len(v) > lim.max_prompt_chars:
                raise HTTPException(422, f"{k} is {len(v)} characters; the limit is {lim.max_prompt_chars}")
        for k in ("width", "height"):
            v = getattr(req, k)
            if v is not None and v > lim.max_resolution:
                raise HTTPException(422, f"{k}={v} is out of range: must be at most {lim.max_resolution}")
        # the request's own per-image bound can only be tightened by the client
        req.max_pixels = min(req.max_pixels, lim.max_output_pixels)
        if req.controls and not self.models.controlnets:
            raise HTTPException(422, "controls given but the server has no ControlNet loaded")
        for i, c in enumerate(req.controls):
            if c.model is not None and c.model not in self.models.controlnets:
                raise HTTPException(422, f"controls[{i}].model={c.model!r} is not loaded; loaded: "
                                         f"{', '.join(self.models.controlnets)}")
            if c.detect_resolution is not None and not 64 <= c.detect_resolution <= lim.max_resolution:
                raise HTTPException(422, f"controls[{i}].detect_resolution={c.detect_resolution} is out of range: "
                                         f"must be between 64 and {lim.max_resolution}")
        try:
            req.validate(max_images=lim.max_images, max_resolution=lim.max_resolution, max_steps=lim.max_steps)
            plan = make_plan(self.models, req, allow_paths=False)
        except Exception as e:  # noqa: BLE001 - mapped to 4xx/503 by one table
            raise http_error(e, before_work=True) from None
        h, w = plan.out_size
        total = h * w * req.num_images
        if total > lim.max_output_pixels:
            raise HTTPException(422, f"the request would make {req.num_images} x {w}x{h} = {total} output pixels; "
                                     f"the limit is {lim.max_output_pixels} (lower the size, images or hires scale)")
        return plan

    def submit(self, req: GenerationRequest, encode: Callable, plan=None, keep_partial: bool = False) -> Job:
        """Check ``req`` (see :meth:`check`) and queue its generation; the job's result is
        ``encode(result)`` (run on the worker, so PNG encoding does not block the event loop).
        ``keep_partial``: a cancelled job keeps ``encode(images so far)`` as its result (A1111's
        interrupt answers with them). While it runs, ``job.preview`` holds the last step's x0
        estimate (for live previews). Raises HTTPException 422 before queueing, and ``QueueFull``
        (429) when busy."""
        from ctrlnet.generation.run import GenerationCancelled, generate

        plan = plan or self.check(req)
        models = self.models
        holder: dict[str, Job] = {}  # the job, once queued (the worker may start it before submit returns)

        def keep_preview(x0):
            if "job" in holder:
                holder["job"].preview = x0

        def work(progress, cancel):
            try:
                result = generate(models, req, progress=progress, cancel=cancel, allow_paths=False,
                                  keep_partial=keep_partial, preview=keep_preview)
            except GenerationCancelled as e:
                if e.partial is not None:
                    e.partial = encode(e.partial)  # the job keeps the answer, encoded like a whole one
                raise
            return encode(result)

        holder["job"] = job = self.queue.submit(work, plan.total_steps, kind="generate")
        return job

    def image_chunks(self, result, k: int) -> dict[str, str]:
        """PNG text chunks for image ``k`` of a result: A1111 ``parameters`` and our ``ctrlnet`` record."""
        from ctrlnet.interfaces.outputs import result_chunks

        return result_chunks(result, self.base_label, self.nets_label, self.dtype_label, k=k)
