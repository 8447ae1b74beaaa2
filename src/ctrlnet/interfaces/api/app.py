"""The HTTP service (FastAPI): ``create_app(models)`` mounts the routers over one job queue.

Routes: ``/v1/jobs`` (async generation: submit, poll, cancel, server-sent events),
``/v1/generate`` (synchronous; a client that disconnects cancels its job), ``/v1/annotate``,
``/v1/models``, ``/health``; the A1111-compatible routes when :mod:`.a1111` is present; the OpenAPI
document at ``/openapi.json`` with its docs at ``/docs`` served without any CDN.

Everything a request could make expensive is checked before work starts: body size (413), image
pixels (413), resolution/steps/images/output pixels (422). One job runs at a time (one device); at
most ``Limits.max_queue`` jobs wait or run, more get 429 with a ``Retry-After`` measured from the
server's own step times. With a token set, the API routes need ``Authorization: Bearer <token>`` (or HTTP
Basic with the token as the password, as A1111 clients send).
Clients never name files: models are chosen by the names the server loaded, annotator folders and
devices are the operator's, and no error message names a server folder.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import secrets
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ctrlnet.checkpoints.hashes import file_sha256, legacy_hash
from ctrlnet.interfaces.api.context import ServiceContext, public_name
from ctrlnet.interfaces.api.errors import scrub_paths
from ctrlnet.interfaces.api.jobs import JobQueue, QueueFull
from ctrlnet.interfaces.limits import Limits

access_log = logging.getLogger("ctrlnet.access")
_log = logging.getLogger(__name__)

A1111_MODULE = "ctrlnet.interfaces.api.a1111"
SECURITY_SCHEME = "bearer"


class BodyTooLarge(Exception):
    pass


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


class AccessLog:
    """ASGI middleware: one line per request on the ``ctrlnet.access`` logger: method, route
    template (``/v1/jobs/{job_id}``; the raw path without its query string when no route
    matched), status, seconds. No bodies, headers or query strings (they can hold tokens)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), 0

        async def sending(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or scope.get("path", "?")
            access_log.info("%s %s %s %.3fs", scope.get("method", "?"), route, status or 500, time.monotonic() - t0)


def _mount_a1111(app: FastAPI, ctx: ServiceContext) -> bool:
    """Mount the A1111-compatible router if that module is installed and defines ``router_for``."""
    if importlib.util.find_spec(A1111_MODULE) is None:
        return False
    module = importlib.import_module(A1111_MODULE)
    router_for = getattr(module, "router_for", None)
    if router_for is None:
        return False
    app.include_router(router_for(ctx))
    return True


def token_matches(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, or HTTP Basic with the token as the password (any user
    name): A1111 clients started against ``--api-auth`` send Basic, and so they work unchanged."""
    if header.startswith("Bearer "):
        return secrets.compare_digest(header[7:].encode(), token.encode())
    if header.startswith("Basic "):
        import base64
        import binascii

        try:
            user_pass = base64.b64decode(header[6:], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(user_pass.partition(":")[2].encode(), token.encode())
    return False


def _file_hash(spec, fn) -> str | None:
    """``fn(spec)`` for a model loaded from a single file; None for folders, embedded and random
    models, and files that can no longer be read (they keep name-derived ids)."""
    if spec is None or not os.path.isfile(str(spec)):
        return None
    try:
        return fn(spec)
    except OSError as e:
        logging.getLogger(__name__).warning("could not hash %s: %s", public_name(spec), e)
        return None


def create_app(models, limits: Limits | None = None, token: str | None = None, base_name: str | None = None,
               controlnet_names: dict[str, str] | None = None) -> FastAPI:
    """The service over loaded models (a ``Models`` or a ``LoadedModels`` from ``model_args``).

    ``token``: the bearer token the API routes require (None = no auth); ``base_name`` and
    ``controlnet_names`` (key -> spec): what the models are called in responses (folders cut off).
    The app's job queue is ``app.state.queue``; ``app.state.ctx`` is the :class:`ServiceContext`."""
    from fastapi_offline import FastAPIOffline

    from ctrlnet.interfaces.api import openapi, v1

    if hasattr(models, "models"):  # LoadedModels: take the specs it remembers
        base_name = base_name or models.base
        controlnet_names = controlnet_names or models.controlnets
        models = models.models
    limits = limits or Limits()
    queue = JobQueue(limits.max_queue, keep_s=limits.keep_s, keep_count=limits.keep_count)

    if token is None:
        def auth() -> None:
            return None
    else:
        # FastAPI's HTTPBearer puts the scheme and each route's security into the OpenAPI
        # document (for every router that depends on ``auth``, the A1111 one included)
        bearer = HTTPBearer(auto_error=False, scheme_name=SECURITY_SCHEME,
                            description="the token the operator set (CTRLNET_API_TOKEN or --token-file)")

        # the bearer dependency documents the scheme; the check reads the header itself so that
        # HTTP Basic with the token as the password (A1111 clients) is accepted too
        def auth(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            if not token_matches(request.headers.get("authorization", ""), token):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    base_spec = base_name if base_name is not None else models.base.source
    net_specs = {k: (controlnet_names or {}).get(k, k) for k in models.controlnets}
    ctx = ServiceContext(
        models=models, limits=limits, queue=queue, auth=auth,
        base_label=public_name(base_spec),
        nets_label={k: public_name(spec) for k, spec in net_specs.items()},
        dtype_label=str(models.dtype).replace("torch.", ""),
        base_sha256=_file_hash(base_spec, file_sha256),
        nets_hash={k: h for k, spec in net_specs.items() if (h := _file_hash(spec, legacy_hash))})

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        queue.shutdown()  # the running job stops at its next step, waiting ones are cancelled

    app = FastAPIOffline(title="ctrlnet", version="1", description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AccessLog)  # added last = outermost: it sees every status, 413s included
    app.state.queue, app.state.ctx = queue, ctx

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse({"detail": scrub_paths(str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())) if errs else "request"
        msg = errs[0].get("msg", "invalid") if errs else "invalid"
        return JSONResponse({"detail": scrub_paths(f"{where}: {msg}")}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc):
        return JSONResponse({"detail": f"request body is over the limit of {limits.max_body_bytes} bytes"},
                            status_code=413)

    @app.exception_handler(QueueFull)
    async def _busy(request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)

    @app.get("/health", tags=["service"])
    def health() -> dict:
        """Liveness and load: jobs running + waiting, the queue's capacity, the measured pace."""
        return {"status": "ok", "queue": queue.pending, "capacity": queue.capacity, "device": str(models.device),
                "dtype": str(models.dtype).replace("torch.", ""),  # what dtype "auto" resolved to
                "seconds_per_step": round(queue.seconds_per_step(), 4)}

    app.include_router(v1.router_for(ctx))
    app.state.a1111 = _mount_a1111(app, ctx)

    app.openapi = lambda: openapi.document(app, ctx)
    return app
