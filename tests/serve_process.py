"""A real ``ctrlnet serve`` process on 127.0.0.1 for the HTTP tests (uvicorn, tiny random models), and
a free local port (also the rendezvous port of the multi-process tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], token: str | None = None, port: int | None = None, ready_s: float = 90):
    """Start ``ctrlnet serve`` on a tiny SD1 base with one random ControlNet ("edges") plus ``args``;
    yield ``(url, proc)`` once ``/health`` answers; terminate it afterwards. Fails the test when the
    server exits early or is not up within ``ready_s`` seconds."""
    import httpx  # the callers skip where it is missing

    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if token is not None:
        env["CTRLNET_API_TOKEN"] = token
    cmd = [sys.executable, "-m", "ctrlnet.interfaces.cli", "serve", "--base", "random:tiny-sd1",
           "--controlnet", "random:edges", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up in {ready_s:.0f} s")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
