"""The model manager against a local folder laid out like the hub cache, with the network off."""

import os
import socket

import pytest

from ctrlnet import hub
from ctrlnet.interfaces.cli import main


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails loudly; the hub library is told it is offline."""
    def refuse(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(hub.ENV_DIRS, raising=False)
    try:
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


def _hub_cache(root, repo, files, rev="0123abcd"):
    """Write ``files`` the way huggingface_hub stores them: blobs + snapshot symlinks + refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    for i, (name, data) in enumerate(files.items()):
        blob = base / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return base


def test_table_has_the_official_files():
    names = {m.name: m for m in hub.list_models()}
    assert names["sd15"].repo == "runwayml/stable-diffusion-v1-5"
    assert names["sd15"].filename == "v1-5-pruned-emaonly.safetensors"
    v10 = [m for m in hub.list_models("controlnet") if m.repo == "lllyasviel/ControlNet"]
    assert sorted(m.name for m in v10) == [f"control_sd15_{k}" for k in
                                           ("canny", "depth", "hed", "mlsd", "normal", "openpose", "scribble", "seg")]
    assert all(m.filename == f"models/{m.name}.pth" and m.size > 5 * hub.GB for m in v10)
    v11 = [m for m in hub.list_models("controlnet") if m.repo == "lllyasviel/ControlNet-v1-1"]
    assert len(v11) == 14 and all(m.extra_files == (m.name + ".yaml",) for m in v11)
    assert {"control_v11f1p_sd15_depth", "control_v11p_sd15s2_lineart_anime", "control_v11f1e_sd15_tile"} <= {m.name for m in v11}
    ann = {m.filename for m in hub.list_models("annotator")}
    assert {"ControlNetHED.pth", "table5_pidinet.pth", "mlsd_large_512_fp32.pth", "body_pose_model.pth",
            "hand_pose_model.pth", "sk_model.pth", "sk_model2.pth", "netG.pth", "dpt_hybrid-midas-501f0c75.pt",
            "upernet_global_small.pth"} <= ann
    assert {m.kind for m in hub.list_models()} == {"base", "controlnet", "annotator"}


def test_lookup_by_file_name_and_suggestions():
    assert hub.get_model("control_v11p_sd15_canny.pth").name == "control_v11p_sd15_canny"
    assert hub.get_model("SD15").name == "sd15"
    with pytest.raises(KeyError, match="did you mean control_v11p_sd15_canny"):
        hub.get_model("control_v11p_sd15_cany")


def test_resolves_from_hub_cache_layout_offline(tmp_path):
    _hub_cache(tmp_path, "lllyasviel/ControlNet-v1-1",
               {"control_v11p_sd15_canny.pth": b"weights", "control_v11p_sd15_canny.yaml": b"yaml"})
    p = hub.resolve("control_v11p_sd15_canny", cache_dir=tmp_path)
    assert p.name == "control_v11p_sd15_canny.pth" and p.read_bytes() == b"weights"
    assert "snapshots/0123abcd" in str(p)
    # download finds it locally and never needs the network
    assert hub.download("control_v11p_sd15_canny", cache_dir=tmp_path, progress=lambda s: None) == p


def test_mirror_repo_in_cache_and_plain_folder(tmp_path):
    _hub_cache(tmp_path / "cache", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               {"v1-5-pruned-emaonly.safetensors": b"sd"})
    assert hub.resolve("sd15", cache_dir=tmp_path / "cache").read_bytes() == b"sd"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "sk_model.pth").write_bytes(b"x")
    assert hub.resolve("sk_model", dirs=[folder], cache_dir=tmp_path / "empty") == folder / "sk_model.pth"


def test_missing_file_says_what_and_how(tmp_path):
    # the weights are there but the yaml is not: exactly the yaml is reported
    _hub_cache(tmp_path, "lllyasviel/ControlNet-v1-1", {"control_v11p_sd15_seg.pth": b"w"})
    with pytest.raises(hub.MissingModelError) as e:
        hub.resolve("control_v11p_sd15_seg", cache_dir=tmp_path)
    msg = str(e.value)
    assert "missing control_v11p_sd15_seg.yaml" in msg and "control_v11p_sd15_seg.pth," not in msg
    assert "ctrlnet models download control_v11p_sd15_seg" in msg
    assert "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_seg.yaml" in msg
    assert str(tmp_path) in msg


def test_download_offline_reports_missing(tmp_path):
    pytest.importorskip("huggingface_hub")
    msgs = []
    with pytest.raises(hub.MissingModelError, match="missing table5_pidinet.pth"):
        hub.download("table5_pidinet", cache_dir=tmp_path, progress=msgs.append)
    assert any("cannot download" in m for m in msgs)
    assert not list(tmp_path.rglob("*.pth"))


def test_download_failure_names_the_cause_not_the_same_command(tmp_path, monkeypatch, capsys):
    """Without network, `ctrlnet models download` used to end with "cannot download
    (LocalEntryNotFoundError)" and advise running `ctrlnet models download` again; it now says the
    hub could not be reached, with the innermost cause, and what to do instead."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_dns(repo, filename, **kw):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    local = tmp_path / "dl"
    assert main(["models", "download", "table5_pidinet", "--cache-dir", str(tmp_path / "c"),
                 "--local-dir", str(local)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("ctrlnet models download: table5_pidinet: missing table5_pidinet.pth (about 3 MB). "
                          f"Searched: {local}; {tmp_path / 'c'} (Hugging Face cache). Downloading table5_pidinet.pth "
                          "from lllyasviel/Annotators failed: the Hugging Face hub could not be reached ([Errno -2] "
                          "Name or service not known); check the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT. "
                          "Try again later, or download https://huggingface.co/lllyasviel/Annotators/resolve/main/"
                          "table5_pidinet.pth by hand"), err
    assert "Get it with `ctrlnet models download" not in err

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.MissingModelError, match=r"failed: HF_HUB_OFFLINE is set, so the hub is not asked \(unset"):
        hub.download("table5_pidinet", cache_dir=tmp_path / "c", progress=lambda s: None)
    # a file an earlier download put in --local-dir is found there, offline
    local.mkdir()
    (local / "table5_pidinet.pth").write_bytes(b"w")
    assert hub.download("table5_pidinet", cache_dir=tmp_path / "c", local_dir=local,
                        progress=lambda s: None) == local / "table5_pidinet.pth"


def test_models_command(tmp_path, capsys):
    _hub_cache(tmp_path, "lllyasviel/Annotators", {"netG.pth": b"g"})
    assert main(["models", "list", "--kind", "annotator", "--cache-dir", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " here " in rows["netG"] and " here " not in rows["sk_model"]
    assert "lllyasviel/Annotators/netG.pth" in rows["netG"]
    assert main(["models", "path", "netG", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("snapshots/0123abcd/netG.pth")
    assert main(["models", "path", "sk_model", "--cache-dir", str(tmp_path)]) == 1
    assert "ctrlnet models download sk_model" in capsys.readouterr().err
    assert main(["models", "path", "no_such_model"]) == 2
    assert main(["models"]) == 2
