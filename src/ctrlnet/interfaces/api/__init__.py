"""The HTTP service: ``create_app(models)`` (see :mod:`.app`); routers in :mod:`.v1` (and the
A1111-compatible :mod:`.a1111` when present), one device executor in :mod:`.jobs`."""

from ctrlnet.interfaces.api.app import create_app

__all__ = ["create_app"]
