"""Interrupting a run: one flag per browser session, checked by ``generate()`` at every step.

Gradio's own ``cancels=`` stops waiting for an event but cannot stop the worker thread that runs
the model, so the Interrupt button sets a :class:`threading.Event` that the run passes to
``generate(cancel=...)``; the run stops with ``GenerationCancelled`` after the current step.
"""

from __future__ import annotations

import threading


class Runs:
    """The interrupt flags of the sessions that have a run going (keyed by Gradio's session hash)."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        """A fresh flag for a run starting in ``session`` (an earlier Interrupt does not carry over)."""
        ev = threading.Event()
        with self._lock:
            self._events[session] = ev
        return ev

    def finish(self, session: str, ev: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is ev:
                del self._events[session]

    def interrupt(self, session: str) -> bool:
        """Stop ``session``'s run at its next step; False when it has none."""
        with self._lock:
            ev = self._events.get(session)
        if ev is None:
            return False
        ev.set()
        return True

    def running(self) -> int:
        with self._lock:
            return len(self._events)
