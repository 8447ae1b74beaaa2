"""One map from the exceptions generation raises to HTTP statuses and client-safe messages.

- 400: the input could not be read (not an image, not base64, malformed JSON).
- 413: too large (body, image pixels). 422: a parameter out of range or unknown (checked before
  work). 429: the queue is full (with ``Retry-After``). 503: the server lacks something the
  request needs (annotator weights, a weights file it cannot read). 404/410: unknown / expired job.

No message names a folder of the server: paths are cut to their last component.
"""

from __future__ import annotations

import re

from fastapi import HTTPException
from pydantic import BaseModel, Field

from ctrlnet.image import ImageError

# An absolute path (POSIX or Windows drive) where a message could start one: after a space,
# quote, bracket or '=' (so the "//host/..." of a URL is left alone); the service's own routes
# ("see GET /v1/models") are not folders.
_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"(\[=]))(?!/(?:v1|sdapi|controlnet|health|docs|openapi)\b)"
                   r"(?:[A-Za-z]:[\\/]|~?/)[^\s'\",;)\]]*")


class ErrorBody(BaseModel):
    """Every error response: ``{"detail": "<what went wrong and how to fix it>"}``."""

    detail: str = Field(description="a readable message naming the cause; never a server path")


def scrub_paths(message: str) -> str:
    """``message`` with every absolute path replaced by its last component ("/srv/w/x.pth" -> "x.pth")."""
    def last(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", m.group(0)) if p and not p.endswith(":") and p != "~"]
        return parts[-1] if parts else "<path>"

    return _PATH.sub(last, message)


def _text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def http_error(exc: BaseException, before_work: bool = True) -> HTTPException:
    """The HTTPException for an exception from building, planning or running a request.

    ``before_work``: raised while checking the request (a LoRA that is not there is the client's
    mistake, 422); otherwise a missing file is the server's (503)."""
    from ctrlnet.annotators.weights import MissingWeightsError, WeightsError

    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, MissingWeightsError):
        m = re.search(r"'([^']+\.(?:pth|pt|bin|safetensors|ckpt|onnx))'", str(exc))
        what = f" ({m.group(1).replace(chr(92), '/').rsplit('/', 1)[-1]})" if m else ""
        return HTTPException(503, f"the server lacks an annotator weights file this needs{what}; "
                                  "ask its operator to install it (see GET /v1/models)")
    if isinstance(exc, WeightsError):
        return HTTPException(503, "a weights file on the server cannot be read; ask its operator to replace it")
    if isinstance(exc, ImageError):
        return HTTPException(400, scrub_paths(str(exc)))
    if isinstance(exc, FileNotFoundError):
        if before_work:
            return HTTPException(422, scrub_paths(str(exc)).split(" (looked in:")[0])
        return HTTPException(503, "the server lacks a file this needs; ask its operator")
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return HTTPException(422, scrub_paths(_text(exc)))
    return HTTPException(500, f"internal error ({type(exc).__name__}); the server log has the details")
