"""A catalogue of bad and odd model files, each through the public loaders: every one ends in our own
CheckpointError (or LoRAError, a subclass) with a plain-text message that says what is wrong; no
other exception, no hang, no code from a file ever runs.

NaN or infinite weights are refused (they can only give NaN images, black in most UIs), naming
the tensors; so are integer tensors where the model has floating-point weights.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.checkpoints.convert import base_state_dict, controlnet_state_dict, write_single_file
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.checkpoints.load import load_base, load_controlnet
from ctrlnet.checkpoints.lora import load_lora
from ctrlnet.checkpoints.vae_file import load_vae
from ctrlnet.config import TINY_SD1, TINY_SD2
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.pipeline import load_models, random_base, random_controlnet

MARKER_ENV = "CTRLNET_CATALOGUE_MARKER"


class _Evil:
    """Pickles as a call to os.system that would create the marker file."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


@pytest.fixture(scope="module")
def tiny():
    return random_base("tiny-sd1", seed=7)


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    """Good files to cut and bend: a base (stored config), a ControlNet, a plain safetensors."""
    d = tmp_path_factory.mktemp("good")
    base = write_single_file(base_state_dict(tiny), d / "base.safetensors", tiny.config)
    cn = write_single_file(controlnet_state_dict(random_controlnet(tiny.unet, "c")), d / "cn.safetensors")
    ckpt = d / "base.ckpt"
    torch.save({"state_dict": base_state_dict(tiny)}, ckpt)
    small = d / "small.safetensors"
    save_file({f"w{i}": torch.randn(64) for i in range(40)}, str(small), metadata={"format": "pt"})
    return {"base": base, "cn": cn, "ckpt": ckpt, "small": small, "dir": d}


def _w(p: Path, data: bytes | str) -> Path:
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _cut(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def _header_len(p: Path) -> int:
    return int.from_bytes(p.read_bytes()[:8], "little")


def _zip_of_texts(p: Path) -> Path:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("model/info.json", "{}")
    return p


def _tar(p: Path) -> Path:
    with tarfile.open(p, "w") as t:
        data = b"weights?"
        info = tarfile.TarInfo("model.bin")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return p


def _evil_legacy(p: Path) -> Path:
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil()}}, f, protocol=2)
    return p


def _evil_zip(p: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Evil()}, p)
    return p


def _nan(tiny, p: Path) -> Path:
    sd = base_state_dict(tiny)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    sd[k] = sd[k].clone()
    sd[k][0, 0, 0, 0] = float("nan")
    return write_single_file(sd, p, tiny.config)


def _ints(tiny, p: Path) -> Path:
    sd = base_state_dict(tiny)
    k = "model.diffusion_model.out.2.weight"
    sd[k] = sd[k].to(torch.int64)
    return write_single_file(sd, p, tiny.config)


def _sd2_controlnet(p: Path) -> Path:
    net = ControlNet(**TINY_SD2.controlnet.kwargs())
    return write_single_file(controlnet_state_dict(net), p, TINY_SD2)


def _diff_no_base(tiny, p: Path) -> Path:
    sd = controlnet_state_dict(random_controlnet(tiny.unet, "d"))
    sd["difference"] = torch.tensor(1.0)
    return write_single_file(sd, p, tiny.config)


def _missing_key(tiny, p: Path) -> Path:
    sd = base_state_dict(tiny)
    del sd["model.diffusion_model.out.2.bias"]
    return write_single_file(sd, p, tiny.config)


def _bad_config_json(tiny, p: Path) -> Path:
    save_file({k: v.contiguous() for k, v in base_state_dict(tiny).items()}, str(p),
              metadata={"ctrlnet_config": "{not json"})
    return p


def _raw_header(p: Path, header: bytes, n: int | None = None, tail: bytes = b"") -> Path:
    p.write_bytes((len(header) if n is None else n).to_bytes(8, "little") + header + tail)
    return p


def _symlink_loop(d: Path) -> Path:
    a, b = d / "loop_a.safetensors", d / "loop_b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def _empty_pipeline(d: Path) -> Path:
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [32]}))
    return d


def _bad_json_pipeline(d: Path) -> Path:
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "config.json").write_text("{ this is not json")
    return d


# (id, how to make the file from (tiny, good, tmp_path), which loader, the key part of the message)
CASES = [
    ("empty-ckpt", lambda t, g, d: _w(d / "e.ckpt", b""), "base",
     "empty or truncated (0 bytes)"),
    ("ten-bytes", lambda t, g, d: _cut(g["small"], d / "t.safetensors", 10), "base",
     "truncated inside its safetensors header (10 bytes"),
    ("three-bytes", lambda t, g, d: _w(d / "3.ckpt", b"\x80\x02}"), "base", "empty or truncated (3 bytes)"),
    ("cut-in-header", lambda t, g, d: _cut(g["small"], d / "h.safetensors", 8 + _header_len(g["small"]) // 3), "base",
     "truncated inside its safetensors header"),
    ("cut-in-data", lambda t, g, d: _cut(g["base"], d / "half.safetensors", g["base"].stat().st_size // 2), "base",
     "file is truncated"),
    ("cut-last-byte", lambda t, g, d: _cut(g["cn"], d / "l.safetensors", g["cn"].stat().st_size - 1), "controlnet",
     "file is truncated"),
    ("cut-zip-pickle", lambda t, g, d: _cut(g["ckpt"], d / "c.ckpt", g["ckpt"].stat().st_size // 2), "base",
     "not a readable checkpoint, or truncated"),
    ("cut-zip-start", lambda t, g, d: _cut(g["ckpt"], d / "c2.ckpt", 100), "base",
     "not a readable checkpoint, or truncated"),
    ("html", lambda t, g, d: _w(d / "m.ckpt", "\n  <!doctype html><html><body>Not found</body></html>"), "base", "an HTML page"),
    ("lfs-pointer", lambda t, g, d: _w(
        d / "p.safetensors", "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"), "controlnet",
     "a git-lfs pointer"),
    ("plain-zip", lambda t, g, d: _zip_of_texts(d / "z.pth"), "controlnet", "a zip archive with no PyTorch data"),
    ("tar", lambda t, g, d: _tar(d / "t.ckpt"), "base", "a tar archive"),
    ("gzip", lambda t, g, d: _w(d / "g.ckpt", gzip.compress(b"x" * 100)), "base",
     "gzip-compressed"),
    ("json-text", lambda t, g, d: _w(d / "j.safetensors", '{"weights": []}'), "base",
     "a JSON text file"),
    ("random-bytes", lambda t, g, d: _w(d / "r.bin", random.Random(0).randbytes(5000)), "controlnet",
     "not a readable checkpoint"),
    ("huge-header-length", lambda t, g, d: _raw_header(d / "hh.safetensors", b'{"a":1}', n=2**62), "base",
     "beyond the 100000000-byte limit"),
    ("header-not-json", lambda t, g, d: _raw_header(d / "nj.safetensors", b"{garbage: ]" + b" " * 40), "base",
     "safetensors header is corrupt"),
    ("header-no-offsets", lambda t, g, d: _raw_header(d / "no.safetensors", b'{"w": {"dtype": "F32", "shape": [2]}}',
                                                      tail=b"\0" * 8), "base", "an entry has no data_offsets"),
    ("malicious-legacy-pickle", lambda t, g, d: _evil_legacy(d / "evil.ckpt"), "base", "refused to load"),
    ("malicious-zip-pickle", lambda t, g, d: _evil_zip(d / "evil.pth"), "controlnet", "refused to load"),
    ("nan-weights", lambda t, g, d: _nan(t, d / "nan.safetensors"), "base", "hold NaN or infinite values"),
    ("integer-weights", lambda t, g, d: _ints(t, d / "int.safetensors"), "base", "not floating-point numbers"),
    ("base-as-controlnet", lambda t, g, d: g["base"], "controlnet", "no ControlNet weights found"),
    ("controlnet-as-base", lambda t, g, d: g["cn"], "base", "ControlNet-only file"),
    ("sd2-controlnet-on-sd1", lambda t, g, d: _sd2_controlnet(d / "sd21.safetensors"), "controlnet",
     "does not fit the base model"),
    ("difference-without-base", lambda t, g, d: _diff_no_base(t, d / "diff.safetensors"), "controlnet-alone",
     "needs the base model it was made from"),
    ("missing-key", lambda t, g, d: _missing_key(t, d / "mk.safetensors"), "base", "missing keys (1): out.2.bias"),
    ("broken-stored-config", lambda t, g, d: _bad_config_json(t, d / "bc.safetensors"), "base",
     "metadata 'ctrlnet_config' is not valid JSON"),
    ("empty-folder", lambda t, g, d: (d / "empty").mkdir() or d / "empty", "base", "not a diffusers pipeline folder"),
    ("empty-folder-as-controlnet", lambda t, g, d: (d / "e2").mkdir() or d / "e2", "controlnet",
     "missing"),
    ("folder-without-weights", lambda t, g, d: _empty_pipeline(d / "pipe"), "base", "no weight file"),
    ("folder-bad-json", lambda t, g, d: _bad_json_pipeline(d / "pj"), "base", "is not valid JSON"),
    ("symlink-loop", lambda t, g, d: _symlink_loop(d), "base", "a broken symbolic link (or a loop of links)"),
    ("missing-file", lambda t, g, d: d / "nope.safetensors", "base", "no checkpoint file"),
    ("folder-as-file", lambda t, g, d: (d / "f").mkdir() or d / "f", "read", "is a folder, not a checkpoint file"),
    ("vae-as-base", lambda t, g, d: write_single_file({"first_stage_model." + k: v for k, v in t.vae.state_dict().items()},
                                                      d / "vae.safetensors"), "base", "no UNet, text encoder weights"),
    ("base-as-vae", lambda t, g, d: g["cn"], "vae", "not a VAE"),
    ("base-as-lora", lambda t, g, d: g["base"], "lora", "keys are not LoRA weights"),
    ("list-pickle", lambda t, g, d: torch.save([torch.zeros(3)], d / "list.pt") or d / "list.pt", "base",
     "expected a dict of tensors, found list"),
    ("no-tensors", lambda t, g, d: torch.save({"global_step": 3, "epoch": 1}, d / "nt.ckpt") or d / "nt.ckpt", "base",
     "contains no tensors"),
]


@pytest.mark.parametrize("make, loader, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_refused_with_its_reason(tmp_path, monkeypatch, tiny, good, make, loader, message):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    path = make(tiny, good, tmp_path)
    call = {
        "base": lambda: load_models(str(path), device="cpu", dtype="fp32"),
        "controlnet": lambda: load_models(str(good["base"]), [str(path)], device="cpu", dtype="fp32"),
        "controlnet-alone": lambda: load_controlnet(path, base=TINY_SD1),
        "read": lambda: read_checkpoint(path),
        "vae": lambda: load_vae(path, TINY_SD1.vae),
        "lora": lambda: load_lora(path),
    }[loader]
    with pytest.raises(CheckpointError) as e:
        call()
    msg = str(e.value)
    assert message in msg
    assert "\x1b" not in msg  # plain text: no terminal escape codes
    assert not marker.exists()  # no code from the file ran


def test_catalogue_size():
    assert len(CASES) >= 25


def test_good_files_still_load(tiny, good):
    m = load_models(str(good["base"]), [str(good["cn"])], device="cpu", dtype="fp32")
    assert list(m.controlnets) == ["cn"]
    assert torch.equal(load_base(good["ckpt"], config=tiny.config).unet.out[2].weight, tiny.unet.out[2].weight)
