"""Run ``ctrlnet`` in a child process that SIGKILLs itself at a chosen point (test_run_folder.py).

    python train_child.py SPEC ctrlnet-arguments...

SPEC: ``none`` (run to the end), ``after-step:N`` (once step N is logged), ``in-checkpoint:N``
(half-way through writing checkpoint N's temp file: half its bytes are on disk), ``in-export``
(half-way through writing the exported model's temp file). A real SIGKILL: no ``finally``, no
atexit, exactly what a killed job leaves behind.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(spec: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return
    if kind == "after-step":
        from ctrlnet.training import logger

        real_log = logger.RunLogger.log

        def log(self, step, *a, **k):
            real_log(self, step, *a, **k)
            if step == int(arg):
                _die()

        logger.RunLogger.log = log
    elif kind == "in-checkpoint":
        import torch

        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and "trainable" in obj and obj.get("step") == int(arg):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()
            return real_save(obj, f, *a, **k)

        torch.save = save
    elif kind == "in-export":
        import safetensors.torch

        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            _die()

        safetensors.torch.save_file = save_file
    else:
        raise SystemExit(f"unknown kill point {spec!r}")


if __name__ == "__main__":
    _arm(sys.argv[1])
    from ctrlnet.interfaces.cli import main

    sys.exit(main(sys.argv[2:]))
