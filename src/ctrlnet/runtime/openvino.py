"""The denoising step (the UNet and each ControlNet) run by OpenVINO on the CPU: the ``"openvino"``
backend of :mod:`ctrlnet.runtime.compile` (``load_models(compile="openvino")``,
``ctrlnet generate --compile openvino``, ``CTRLNET_COMPILE=openvino``).

Why and how (issue 18, measured with ``benchmarks/step.py``; numbers in the README): OpenVINO's CPU
plugin runs the full-size SD1.5 step about 1.3x faster than any PyTorch form of it on an
AVX-512-bf16 CPU. Each module is converted the way ``benchmarks/step.py`` first did it:
``openvino.convert_model`` traces the module's own ``forward`` (TorchScript) from **fp32** weights,
and the graph is compiled for the CPU with the module's dtype as ``INFERENCE_PRECISION_HINT``
(converting bf16 modules directly gave NaN in OpenVINO 2026.4; the fp32 graph with a bf16 hint
does not). The hint is always set: OpenVINO's own default on bf16-capable CPUs is bf16 even for an
fp32 graph. ``torch.compile(backend="openvino")`` (``openvino.torch``) was measured and not kept:
on the SD1.5 step at 256x256, batch 2, bf16 (2 shared cores, load ~5, interleaved) it took 14.1 s
a step against 9.0 s for the converted graph (eager: 18.0 s); with torch 2.13 it fails in dynamo's
guards on our step unless ``aot_autograd`` is on, which bakes the weights in as constants; on any
error it silently falls back to inductor; and its on-disk cache is keyed by the graph's code
only, so a second model of the same architecture would reuse the first one's weights.

The converted graphs have dynamic batch, height, width and prompt length (``convert_model``'s
default for traced inputs), so one conversion per module serves every image size, batch, hires
pass and the conditional-only rows of "ControlNet is more important" units; a new call *structure*
(the UNet with or without ControlNet residuals, a ControlNet given the hint or its cached encoding)
is converted on its first use. Converting the full-size UNet takes minutes; each conversion is
saved (OpenVINO IR, fp32 weights, atomically) under ``$CTRLNET_CACHE_DIR/openvino`` (default
``~/.cache/ctrlnet/openvino``), keyed by the SHA-256 of the weights, the module's class, config and
source files, the call structure and the OpenVINO and torch versions, so a later process only
reads and compiles it (seconds) and a different model, dtype or structure never reuses it.

Memory (SD1.5 + one ControlNet, bf16, ``benchmarks/step.py``): OpenVINO's compiled weights add
about 3 GiB resident next to the modules' own (kept for LoRA requests and the hint encoder), plus
the saved graphs' fp32 weights mapped from the cache files (4.7 GiB of page cache).

Weights are constants in the compiled graph. Every call compares the module's parameters and
buffers (their storage and in-place version counters) with the converted ones; when they changed
(a LoRA merged for one request by :func:`ctrlnet.models.patching.apply_loras`, or any other
in-place edit) the changed tensors are hashed again, and while they differ from the converted
weights the module runs in PyTorch (eager), with a logged warning, never with stale weights. When
they are back (``apply_loras`` restores them bit for bit on exit) OpenVINO is used again.
Calls with autograd enabled, or with inputs off the CPU, also run eager.

A process that has run OpenVINO should not fork afterwards (``multiprocessing`` with the "fork"
start method, data loader workers): OpenVINO's worker threads do not survive it, and such a process
was seen to end in a segmentation fault at exit. No ctrlnet command does both.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

_log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ctrlnet[openvino]'"
# OpenVINO's CPU inference precision for each module dtype
PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# bump when the saved graphs' layout or meaning changes, so old cache entries are not read
_CACHE_FORMAT = 1


class OpenVINOError(ValueError):
    """The openvino backend cannot be used here: the package is missing, or the device is not a CPU."""


def require_openvino():
    """The ``openvino`` module; :class:`OpenVINOError` naming ``pip install 'ctrlnet[openvino]'``
    when it cannot be imported."""
    try:
        import openvino
    except ImportError as e:
        raise OpenVINOError(f"the openvino backend needs the OpenVINO package: {INSTALL_HINT} ({e})") from None
    return openvino


def check_available(device: torch.device | str) -> None:
    """Raise :class:`OpenVINOError` unless OpenVINO imports and ``device`` is the CPU (its CPU
    plugin is what this backend uses; CUDA and MPS modules are refused rather than copied)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        raise OpenVINOError(f"the openvino backend runs the step on the CPU only, not on {dev}: "
                            "use --device cpu, or the inductor backend (--compile inductor) on this device")
    require_openvino()


def default_cache_dir() -> Path:
    """``$CTRLNET_CACHE_DIR/openvino``, else ``$XDG_CACHE_HOME/ctrlnet/openvino``, else
    ``~/.cache/ctrlnet/openvino`` (the folder of :func:`ctrlnet.checkpoints.hashes.default_cache`)."""
    from ctrlnet.checkpoints.hashes import default_cache

    return default_cache().parent / "openvino"


# ---- call structure: tensors in, tensors out, everything else fixed per graph ----------------

def _spec(value):
    """One argument's place in the call structure, or raise TypeError for what a graph cannot take."""
    if isinstance(value, torch.Tensor):
        return ("T",)
    if value is None:
        return ("N",)
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        return ("L", len(value))
    if isinstance(value, (bool, int, float, str)):
        return ("V", value)
    raise TypeError(type(value).__name__)


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(v)
    return out


def _feed_dtype(t: torch.Tensor) -> torch.dtype:
    # floats enter the graph in fp32 (the graph is traced from fp32 weights; numpy has no bf16)
    return torch.float32 if t.is_floating_point() else t.dtype


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name in the forward's order, defaults filled in (so ``unet(x, t,
    c)`` and ``unet(x, t, c, control=None, only_mid_control=False)`` are one structure); None
    when they do not bind (the eager call then raises the usual TypeError)."""
    try:
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.pop(next(iter(named)))  # self
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in bound.signature.parameters.values()):
        return None  # *args / **kwargs: no fixed structure to key graphs by
    return named


def _structure(named: dict) -> tuple | None:
    """A hashable description of a bound call: each argument's name and kind, each tensor's feed
    dtype and rank; None when an argument is of a kind a graph cannot take (the call runs eager)."""
    try:
        specs = tuple((k, _spec(v)) for k, v in named.items())
    except TypeError:
        return None
    flat = _tensors(named.values())
    return specs, tuple((str(_feed_dtype(t)).removeprefix("torch."), t.ndim) for t in flat)


def _rebuild(structure: tuple, flat: Iterable[torch.Tensor]) -> dict:
    it = iter(flat)

    def one(spec):
        kind = spec[0]
        if kind == "T":
            return next(it)
        if kind == "L":
            return [next(it) for _ in range(spec[1])]
        return None if kind == "N" else spec[1]

    return {k: one(s) for k, s in structure[0]}


class _Graph(nn.Module):
    """``module``'s own forward with its tensors flat: what ``convert_model`` traces."""

    def __init__(self, module: nn.Module, structure: tuple):
        super().__init__()
        self.module, self.structure = module, structure
        self.returns_list: bool | None = None

    def forward(self, *flat):
        out = type(self.module).forward(self.module, **_rebuild(self.structure, flat))  # the class's, not the backend's
        self.returns_list = not isinstance(out, torch.Tensor)
        return tuple(out) if self.returns_list else out


def _decoder(graph: nn.Module, example: tuple):
    """What ``convert_model`` reads: the module traced by OpenVINO's TorchScript decoder without
    torch's trace check (the module itself where the decoder cannot be imported)."""
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError:
        return graph
    return TorchScriptPythonDecoder(graph, example_input=example, trace_kwargs={"check_trace": False})


# ---- weights: what the graph holds, and whether the module still has it ---------------------

def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _stamp(module: nn.Module) -> list[tuple]:
    """Cheap per-tensor identity: storage address, in-place version counter, dtype, shape."""
    return [(n, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for n, t in _named_tensors(module)]


def _digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _source_digest(module: nn.Module) -> str:
    """SHA-256 of the source files of ctrlnet's module classes inside ``module`` and of this file:
    a code change makes new graphs (torch's own layers are covered by the torch version)."""
    files = {Path(__file__)}
    for m in module.modules():
        name = type(m).__module__
        if name.split(".")[0] == "ctrlnet" and getattr(sys.modules.get(name), "__file__", None):
            files.add(Path(sys.modules[name].__file__))
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class OpenVINOModule:
    """Runs calls of one module (a :class:`~ctrlnet.models.unet.UNetModel` or ControlNet) through
    OpenVINO; installed as the module's ``forward`` by :func:`use_openvino`.

    Inputs: the module's own arguments (tensors on the CPU in any float dtype, lists of tensors,
    None, and plain values such as ``only_mid_control``, which become part of the graph). Floats are
    fed in fp32; outputs come back as tensors (or lists of them, as the module returns) in the
    module's dtype, NCHW-contiguous. Numbers: the fp32 graph computed at the module dtype's
    precision (``INFERENCE_PRECISION_HINT``), so fp32 modules match eager to float rounding and
    bf16 modules to bf16 rounding (``tests/test_openvino.py`` states the tolerances).

    ``stats`` counts what happened: ``converted`` / ``loaded`` graphs (from the disk cache),
    ``openvino`` and ``eager`` calls, and ``convert_s`` / ``load_s`` seconds spent.
    """

    def __init__(self, module: nn.Module, cache_dir: Path | None):
        self.module = module
        self.cache_dir = cache_dir
        self.stats = {"converted": 0, "loaded": 0, "openvino": 0, "eager": 0, "convert_s": 0.0, "load_s": 0.0}
        self._graphs: dict[tuple, tuple] = {}  # structure -> (compiled model, infer request, returns_list)
        self._lock = threading.RLock()
        self._source: str | None = None
        # the weights the graphs hold (the module's as it is wrapped), by tensor name; hashed now, so
        # that a first call inside a LoRA request runs eager instead of converting the LoRA's weights
        self._digests = {n: _digest(t) for n, t in _named_tensors(module)}
        self._seen = _stamp(module)  # when the weights were last compared
        self._differs: set[str] = set()  # names of tensors found different from the converted ones
        self._same = True

    # -- weights

    def _weights_unchanged(self) -> bool:
        """Whether the module's weights are the ones the graphs hold. Tensors whose stamp moved
        since the last look are hashed again (all of them: a tensor found different stays so
        until a later hash finds it back)."""
        stamp = _stamp(self.module)
        if stamp == self._seen:
            return not self._differs
        old = {s[0]: s for s in self._seen}
        tensors = dict(_named_tensors(self.module))
        if set(tensors) != set(self._digests):
            self._differs = set(tensors) ^ set(self._digests)
        else:
            for s in stamp:
                if old.get(s[0]) != s:
                    if _digest(tensors[s[0]]) == self._digests[s[0]]:
                        self._differs.discard(s[0])
                    else:
                        self._differs.add(s[0])
        was_same, same = self._same, not self._differs
        if was_same and not same:
            _log.warning("%s: its weights differ from the ones converted to OpenVINO (%d tensors: a LoRA merged "
                         "for this request, or an in-place edit); it runs in PyTorch until they are back",
                         type(self.module).__name__, len(self._differs))
        elif same and not was_same:
            _log.info("%s: weights are back to the converted ones; running in OpenVINO again", type(self.module).__name__)
        self._seen, self._same = stamp, same
        return same

    def _weights_key(self) -> str:
        h = hashlib.sha256()
        for n, t in _named_tensors(self.module):
            h.update(f"{n}:{t.dtype}:{tuple(t.shape)}:{self._digests[n]}\n".encode())
        return h.hexdigest()

    # -- graphs
    def _cache_key(self, structure: tuple) -> str:
        import openvino

        if self._source is None:
            self._source = _source_digest(self.module)
        config = getattr(self.module, "config_params", None)
        desc = {"format": _CACHE_FORMAT, "class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
                "config": config() if callable(config) else None, "repr": repr(self.module),
                "weights": self._weights_key(), "dtype": str(self._dtype()), "structure": structure,
                "source": self._source, "openvino": openvino.__version__, "torch": torch.__version__}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:40]

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    def _convert(self, structure: tuple, flat: list[torch.Tensor]):
        """Trace the module's forward from fp32 weights (bf16 -> fp32 -> bf16 is exact, so the
        module's weights afterwards are the ones before, bit for bit)."""
        ov = require_openvino()
        dtype = self._dtype()
        graph = _Graph(self.module, structure)
        example = tuple(t.detach().to(_feed_dtype(t)).contiguous() for t in flat)
        try:
            if dtype != torch.float32:
                self.module.float()
            with torch.no_grad():
                # torch.jit.trace's default check_trace runs the module twice more to compare (4x
                # the tracing time on tiny-sd1); the tests compare the graphs with eager instead.
                # share_weights=False: the graph gets its own copy (the fp32 tensors are freed below)
                model = ov.convert_model(_decoder(graph, example), example_input=example, share_weights=False)
        finally:
            if dtype != torch.float32:
                self.module.to(dtype)
        return model, graph.returns_list

    def _save(self, model, folder: Path, returns_list: bool, structure: tuple) -> bool:
        """Write the graph to ``folder`` atomically: into a temp folder of the same parent, then
        one rename; a failure (disk full) only costs the cache (a warning, False)."""
        ov = require_openvino()
        from ctrlnet.atomic import pid_alive, temp_owner, temp_path

        tmp = temp_path(folder)
        try:
            for old in folder.parent.glob(".*.tmp") if folder.parent.is_dir() else ():
                pid = temp_owner(old)
                if pid is not None and old.is_dir() and not pid_alive(pid):
                    shutil.rmtree(old, ignore_errors=True)  # left by a killed writer
            tmp.mkdir(parents=True)
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            (tmp / "meta.json").write_text(json.dumps(
                {"class": type(self.module).__qualname__, "returns_list": returns_list,
                 "structure": structure, "dtype": str(self._dtype()), "openvino": ov.__version__}, default=str))
            for f in tmp.iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / "meta.json").is_file():  # not another process's finished copy
                    raise
            return True
        except OSError as e:
            _log.warning("could not cache the OpenVINO graph in %s: %s", folder, e)
            return False
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _graph(self, structure: tuple, flat: list[torch.Tensor]) -> tuple:
        if structure in self._graphs:
            return self._graphs[structure]
        ov = require_openvino()
        folder = self.cache_dir / self._cache_key(structure) if self.cache_dir is not None else None
        model = None
        t0 = time.perf_counter()
        if folder is not None and (folder / "meta.json").is_file():
            try:
                model = ov.Core().read_model(str(folder / "model.xml"))
                returns_list = json.loads((folder / "meta.json").read_text())["returns_list"]
                self.stats["loaded"] += 1
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                _log.warning("unreadable OpenVINO cache entry %s (%s); converting again", folder, e)
                model = None
        converted = model is None
        if converted:
            model, returns_list = self._convert(structure, flat)
            if folder is not None and self._save(model, folder, returns_list, structure):
                # compile from the saved file instead: OpenVINO maps its weights from the file, so
                # the fp32 constants are page cache the system can drop, not a copy in our memory
                del model
                model = ov.Core().read_model(str(folder / "model.xml"))
            self.stats["converted"] += 1
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION[self._dtype()]})
        del model
        self.stats["convert_s" if converted else "load_s"] += time.perf_counter() - t0
        # the module's tensors were cast and back during conversion: same values, new storage
        self._seen = _stamp(self.module)
        self._graphs[structure] = (compiled, compiled.create_infer_request(), returns_list)
        return self._graphs[structure]

    def __deepcopy__(self, memo):
        """A deep copy of the wrapped module runs eagerly (its own weights; wrap it again to run
        it in OpenVINO): ``copy.deepcopy`` has registered the new module before copying its
        attributes, so its forward is the class's, bound to it."""
        new = memo.get(id(self.module))
        if new is None:
            raise TypeError("an OpenVINOModule is copied with its module only (copy.deepcopy(module))")
        return type(new).forward.__get__(new)

    # -- calls
    def __call__(self, *args, **kwargs):
        eager = type(self.module).forward
        named = _bind(self.module, args, kwargs)
        structure = _structure(named) if named is not None else None
        flat = _tensors(named.values()) if structure is not None else []
        if (structure is None or torch.is_grad_enabled() or self._dtype() not in PRECISION
                or any(t.device.type != "cpu" for t in flat)):
            self.stats["eager"] += 1
            return eager(self.module, *args, **kwargs)
        with self._lock:
            if not self._weights_unchanged():
                self.stats["eager"] += 1
                return eager(self.module, *args, **kwargs)
            compiled, request, returns_list = self._graph(structure, flat)
            feeds = [t.detach().to(_feed_dtype(t)).contiguous().numpy() for t in flat]
            result = request.infer(feeds)
            dtype = self._dtype()
            outs = [torch.from_numpy(result[o]).to(dtype=dtype, copy=True) for o in compiled.outputs]
            self.stats["openvino"] += 1
        return outs if returns_list else outs[0]


def use_openvino(modules: Iterable[nn.Module], cache_dir: Path | str | None = "default") -> list[OpenVINOModule]:
    """Run each module's calls through OpenVINO on the CPU from now on (in place: the module, its
    parameters and state-dict keys stay; its ``forward`` becomes an :class:`OpenVINOModule`).

    Nothing is converted here: each call structure is converted (or read from ``cache_dir``) on
    its first call, which is the slow one. The weights are hashed here (SHA-256, about a second per
    GB): they are the ones the graphs hold. ``cache_dir``: where converted graphs are kept
    ("default": :func:`default_cache_dir`; None: only in memory). A module already wrapped keeps
    its wrapper while its weights are the wrapped ones, else gets a new one for its weights now
    (the way to adopt weights changed for good). Raises :class:`OpenVINOError` when OpenVINO cannot be imported, and ValueError
    for a module off the CPU. Returns the wrappers (their ``stats`` say what ran).
    """
    require_openvino()
    folder = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
    out = []
    for m in modules:
        old = openvino_wrapper(m)
        if old is not None and old._weights_unchanged():
            out.append(old)
            continue
        dev = next((p.device for p in m.parameters()), torch.device("cpu"))
        if dev.type != "cpu":
            raise OpenVINOError(f"{type(m).__name__} is on {dev}; the openvino backend runs on the CPU only")
        m.forward = OpenVINOModule(m, folder)
        out.append(m.forward)
    return out


def openvino_wrapper(module: nn.Module) -> OpenVINOModule | None:
    """The :class:`OpenVINOModule` that runs ``module``'s calls, or None."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, OpenVINOModule) else None


__all__ = ["INSTALL_HINT", "PRECISION", "OpenVINOError", "OpenVINOModule", "check_available", "default_cache_dir",
           "openvino_wrapper", "require_openvino", "use_openvino"]
