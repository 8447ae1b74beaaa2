"""The reference colorizer trains with the common loop (packed hints), exports to a file that
loads back, and the image-file data set packs the same hint as the cached one."""

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")

from ctrlnet.colorize.dataset import ReferenceLatentDataset, packed_hint_hwc, reference_dataset  # noqa: E402
from ctrlnet.colorize.recipe import train_models  # noqa: E402
from ctrlnet.colorize.reference_model import FIRST_CONV, KIND_KEY, load_reference_controlnet  # noqa: E402


def test_loop_trains_reference_inputs_and_export_loads(tmp_path):
    from ctrlnet.training.loop import TrainConfig, export_result, train

    models = train_models("random:tiny-sd1", seed=0)
    n, size = 4, 64
    g = torch.Generator().manual_seed(0)
    ds = ReferenceLatentDataset(torch.randn(n, 8, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
                                torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8), [""] * n)
    item = ds[(1, 123)]
    assert item["hint"].shape == (size, size, 7)
    assert torch.equal(item["hint"][::8, ::8, 3:].permute(2, 0, 1), ds.refs[1])
    cfg = TrainConfig(mode="controlnet", steps=2, batch_size=2, lr=1e-3, checkpoint_every=0, progress=False,
                      cpu=True, log_every=0)
    res = train(models, ds, cfg, tmp_path / "run")
    assert res.step == 2 and np.isfinite(res.last_loss)
    w = models.controlnet.state_dict()[FIRST_CONV]
    assert float(w[:, 4:].abs().max()) > 0  # the reference channels learned (step 2 gets gradient)
    path = export_result(models, cfg, tmp_path / "c.safetensors", use_ema=False, metadata={KIND_KEY: "reference"})
    back = load_reference_controlnet(path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in models.controlnet.state_dict().items())


def test_image_dataset_packs_reference_latent(tmp_path):
    from ctrlnet.colorize.lab import to_gray
    from ctrlnet.colorize.synthetic import synthetic_clip
    from ctrlnet.image import save_image
    from ctrlnet.pipeline import random_base
    from ctrlnet.training.builders import write_jsonl

    frames = synthetic_clip(4, 64, seed=2)
    for k in ("reference", "gray", "color"):
        (tmp_path / k).mkdir()
    save_image(frames[0], tmp_path / "reference" / "a.png")
    save_image(to_gray(frames[3]), tmp_path / "gray" / "a.png")
    save_image(frames[3], tmp_path / "color" / "a.png")
    write_jsonl(tmp_path / "prompt.json", [{"source": "gray/a.png", "target": "color/a.png",
                                            "reference": "reference/a.png", "prompt": ""}])
    vae = random_base("tiny-sd1").vae
    ds = reference_dataset(tmp_path, vae)
    item = ds[(0, 5)]
    assert item["hint"].shape == (64, 64, 7) and item["jpg"].shape == (64, 64, 3)
    x = torch.from_numpy(frames[0].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        lat = vae.encode_latents(x)[0]
    gray = torch.from_numpy(to_gray(frames[3]).astype(np.float32) / 255)
    assert torch.allclose(torch.from_numpy(item["hint"]), packed_hint_hwc(gray, lat), atol=1e-5)


def test_recipe_quick_build_resume_and_ship(tmp_path, capsys):
    from dataclasses import replace

    from ctrlnet.colorize.recipe import ColorizeRecipe, build, ship

    r = replace(ColorizeRecipe().quick(), n_clips=2, n_heldout=1, size=64, steps=2)
    first = build(tmp_path / "run", r, base="random:tiny-sd1")
    assert first.is_file() and (tmp_path / "run" / "data" / "train" / "prompt.json").is_file()
    with pytest.raises(SystemExit, match="--resume"):
        build(tmp_path / "run", r, base="random:tiny-sd1")
    (tmp_path / "run" / "train" / "DONE.json").unlink()
    build(tmp_path / "run", replace(r, steps=3), base="random:tiny-sd1", resume=True)
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out  # continued from the first run's checkpoint
    shipped = ship(tmp_path / "run", tmp_path / "assets")
    net = load_reference_controlnet(shipped)
    assert net.ref_channels == 4 and shipped.stat().st_size < 15 * 2**20
    # sampling defaults and the clip kind travel in the metadata (the recipe's default kind)
    from safetensors import safe_open

    from ctrlnet.checkpoints.defaults import read_defaults
    from ctrlnet.colorize.recipe import CLIPS_KEY

    assert read_defaults(shipped) == {"resolution": 64, "steps": 20, "guidance_scale": 1.0}
    with safe_open(str(shipped), "pt") as f:
        assert f.metadata()[CLIPS_KEY] == r.clips == "isoluminant"
    with pytest.raises(SystemExit, match="clips"):  # other clips in the same folder are refused
        build(tmp_path / "run", replace(r, clips="classic"), base="random:tiny-sd1", resume=True)
    # the fine-tuned autoencoder (the recipe's vae stage) travels with the net
    from safetensors.torch import load_file

    from ctrlnet.checkpoints.save import read_config
    from ctrlnet.colorize.reference_model import load_reference_vae

    vae = load_reference_vae(shipped, read_config(shipped))
    tuned = load_file(str(tmp_path / "run" / "vae" / "vae.safetensors"))
    assert vae is not None and len(tuned) == len(vae.state_dict())
    assert all(torch.equal(v, tuned["first_stage_model." + k].half().float()) for k, v in vae.state_dict().items())


def test_recipe_pairs_from_mixed_clips_each_kind_in_its_range(tmp_path):
    """``clips="mixed"``: every other clip classic, each kind paired within its own similarity
    range (PAIR_SIMILARITY), straight from the rendered frames (no video files)."""
    from dataclasses import replace

    from ctrlnet.colorize.pairs import frame_similarity
    from ctrlnet.colorize.recipe import PAIR_SIMILARITY, ColorizeRecipe, build, clip_kind
    from ctrlnet.colorize.synthetic import make_clip
    from ctrlnet.training.builders import read_jsonl

    r = replace(ColorizeRecipe().quick(), clips="mixed", n_clips=2, size=64)
    assert [clip_kind("mixed", i) for i in range(3)] == ["isoluminant", "classic", "isoluminant"]
    data = build(tmp_path / "run", r, until="pairs")
    rows = read_jsonl(data / "prompt.json")
    assert not (tmp_path / "run" / "videos").exists()
    kinds = {row["source"].split("/")[0] for row in rows}
    assert kinds == {"isoluminant", "classic"}
    for row in rows:
        kind = row["source"].split("/")[0]
        i = int(row["video"].split("_")[1])
        frames = make_clip(kind, r.clip_frames, r.size, seed=r.seed + i)
        a, b = row["frames"]
        lo, hi = PAIR_SIMILARITY[kind]
        assert lo <= frame_similarity(frames[a], frames[b]) <= hi
        assert (data / row["reference"]).is_file() and (data / row["target"]).is_file()
