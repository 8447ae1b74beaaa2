"""Model file hashes as A1111 shows them (checkpoint short hash = SHA-256[:10], sd-webui-controlnet's
legacy 8-digit hash), cached by size and modification time, and served in the A1111 routes."""

import hashlib
import json
import os

import numpy as np
import pytest

from ctrlnet.checkpoints.hashes import file_sha256, legacy_hash


def _a1111_model_hash(path):
    """A1111 ``modules/sd_models.py`` ``model_hash``, transcribed."""
    with open(path, "rb") as file:
        m = hashlib.sha256()
        file.seek(0x100000)
        m.update(file.read(0x10000))
        return m.hexdigest()[0:8]


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "control_v11p_sd15_canny.safetensors"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 123, dtype=np.uint8).tobytes())
    return p


def test_legacy_hash_reads_64_kib_at_1_mib(blob, tmp_path):
    assert legacy_hash(blob) == _a1111_model_hash(blob)
    small = tmp_path / "small.pth"
    small.write_bytes(b"x" * 1000)  # shorter than 1 MiB: the hash of nothing, as A1111's
    assert legacy_hash(small) == _a1111_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]
    data = bytearray(blob.read_bytes())
    data[0x100000 + 5] ^= 1
    blob.write_bytes(bytes(data))
    assert legacy_hash(blob) == _a1111_model_hash(blob)


def test_sha256_is_cached_by_size_and_mtime(blob, tmp_path):
    cache = tmp_path / "c" / "hashes.json"
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert file_sha256(blob, cache) == want
    entries = json.loads(cache.read_text())
    assert entries[str(blob.resolve())]["sha256"] == want
    # a cached entry with the same size and mtime is trusted (no reading): shown by planting one
    entries[str(blob.resolve())]["sha256"] = "f" * 64
    cache.write_text(json.dumps(entries))
    assert file_sha256(blob, cache) == "f" * 64
    st = blob.stat()
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed: read again
    assert file_sha256(blob, cache) == want
    cache.write_text("{not json")  # a broken cache costs only the time
    assert file_sha256(blob, cache) == want and json.loads(cache.read_text())


def test_an_unwritable_cache_still_answers(blob, tmp_path):
    cache = tmp_path / "file-not-dir"
    cache.write_text("")
    assert file_sha256(blob, cache / "hashes.json") == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_the_a1111_routes_show_the_files_hashes(blob, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from ctrlnet.interfaces.api import create_app
    from ctrlnet.pipeline import load_models

    monkeypatch.setenv("CTRLNET_CACHE_DIR", str(tmp_path / "cache"))
    base = tmp_path / "v1-5-pruned-emaonly.safetensors"
    base.write_bytes(b"checkpoint bytes" * 70000)
    models = load_models("random:tiny-sd1", ["random:edges"], device="cpu")
    app = create_app(models, base_name=str(base),
                     controlnet_names={"edges": str(blob), "other": "random:other"})
    try:
        c = TestClient(app)
        sha = hashlib.sha256(base.read_bytes()).hexdigest()
        row = c.get("/sdapi/v1/sd-models").json()[0]
        assert row["sha256"] == sha and row["hash"] == sha[:10]
        assert row["title"] == f"v1-5-pruned-emaonly.safetensors [{sha[:10]}]"
        opts = c.get("/sdapi/v1/options").json()
        assert opts["sd_model_checkpoint"] == row["title"] and opts["sd_checkpoint_hash"] == sha
        assert c.get("/controlnet/model_list").json()["model_list"] == [f"edges [{_a1111_model_hash(blob)}]"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64, "height": 64, "seed": 2,
                                              "alwayson_scripts": {"controlnet": {"args": [
                                                  {"model": f"edges [{_a1111_model_hash(blob)}]",
                                                   "module": "none", "image": _b64(np.zeros((64, 64, 3), np.uint8))}]}}})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_hash"] == sha[:10]
        assert f"Model hash: {sha[:10]}, Model: v1-5-pruned-emaonly.safetensors" in info["infotexts"][0]
    finally:
        app.state.queue.shutdown()
    assert (tmp_path / "cache" / "hashes.json").is_file()


def _b64(img):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
