"""Training system: loss goes down, exact resume, atomic checkpoints, tiers, bad data by name."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrlnet.config import TINY_SD1
from ctrlnet.image import load_image, save_image
from ctrlnet.training import state as st
from ctrlnet.training.builders import annotate, make_fill50k, merge_captions, read_jsonl
from ctrlnet.training.colors import COLORS, parse_fill50k_prompt
from ctrlnet.training.data import DataError, collate, imagefolder_dataset, open_dataset, prompt_json_dataset
from ctrlnet.training.loop import DiffusionObjective, TrainConfig, train
from ctrlnet.training.models import build_models, export_models, load_model_file, select_trainable

pytest.importorskip("accelerate")


def _models(controlnet: bool = True):
    """Tiny models with a non-trivial UNet: a fresh UNet's zero-initialised ``out`` conv would give
    the ControlNet no gradient at all (the demo trains the base first for the same reason)."""
    from helpers import randomize_

    m = build_models(TINY_SD1, with_controlnet=False)
    randomize_(m.unet, seed=1, scale=0.05)
    if controlnet:
        from ctrlnet.models.controlnet import ControlNet

        m.controlnet = ControlNet.from_unet(m.unet)
    return m


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fill")
    make_fill50k(out, 6, 64, seed=3)
    return out


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=2, lr=1e-3, checkpoint_every=0, progress=False, cpu=True, log_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- builders and data -------------------------------------------------------------------------


def test_fill50k_builder_is_well_formed(fill):
    rows = read_jsonl(fill / "prompt.json")
    assert len(rows) == 6
    for row in rows:
        hint, target = load_image(fill / row["source"]), load_image(fill / row["target"])
        assert hint.shape == target.shape == (64, 64, 3)
        cx, cy, r = row["circle"]
        circle, background = parse_fill50k_prompt(row["prompt"])
        assert (circle, background) == (row["circle_color"], row["background_color"])
        # filled circle of the named colour on the named background
        assert np.abs(target[cy, cx].astype(int) - COLORS[circle]).max() <= 1
        assert np.abs(target[0, 0].astype(int) - COLORS[background]).max() <= 1
        # the hint is an outline: white on the circle, black at its centre and in the corner
        assert hint[cy, cx].max() == 0 and hint[0, 0].max() == 0
        assert hint[cy, cx + r].min() > 200
    assert not list(fill.rglob("*.tmp"))


def test_prompt_json_item_convention(fill):
    ds = prompt_json_dataset(fill, resolution=64)
    item = ds[(0, 123)]
    assert item["jpg"].shape == item["hint"].shape == (64, 64, 3)
    row = read_jsonl(fill / "prompt.json")[0]
    np.testing.assert_allclose(item["jpg"], load_image(fill / row["target"]) / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(item["hint"], load_image(fill / row["source"]) / 255.0, atol=1e-6)
    assert item["hint"].min() == 0.0 and item["hint"].max() == 1.0
    assert item["txt"] == read_jsonl(fill / "prompt.json")[0]["prompt"]
    inv = prompt_json_dataset(fill, resolution=64, invert_source=True)[(0, 123)]
    np.testing.assert_allclose(inv["hint"], 1.0 - item["hint"], atol=1e-6)


def test_random_crop_to_multiple_of_64(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    save_image(img, tmp_path / "t.png")
    save_image(img, tmp_path / "s.png")
    (tmp_path / "prompt.json").write_text(json.dumps({"source": "s.png", "target": "t.png", "prompt": "x"}) + "\n")
    ds = prompt_json_dataset(tmp_path)
    a, b = ds[(0, 1)], ds[(0, 2)]
    assert a["jpg"].shape == (64, 128, 3)
    # the same crop for both (here source == target)
    np.testing.assert_allclose((a["jpg"] + 1) * 127.5, a["hint"] * 255, atol=1e-3)
    assert not np.array_equal(a["jpg"], b["jpg"])  # the seed moves the crop
    assert ds[(0, 1)]["jpg"].tobytes() == a["jpg"].tobytes()  # and is a pure function of it
    big = prompt_json_dataset(tmp_path, resolution=128)[(0, 5)]
    assert big["jpg"].shape == (128, 128, 3)


def test_imagefolder_layout_and_column_names(fill, tmp_path):
    rows = read_jsonl(fill / "prompt.json")
    meta = [{"img": str(fill / r["target"]), "cond": str(fill / r["source"]), "caption": r["prompt"]} for r in rows]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    ds = open_dataset(tmp_path, image_column="img", conditioning_image_column="cond", caption_column="caption")
    assert len(ds) == 6 and ds[0]["txt"] == rows[0]["prompt"]
    with pytest.raises(DataError, match="conditioning_image"):
        imagefolder_dataset(tmp_path)


def test_bad_and_missing_images_are_reported_by_name(fill, tmp_path):
    rows = read_jsonl(fill / "prompt.json")[:4]
    for r in rows:
        for k in ("source", "target"):
            r[k] = str(fill / r[k])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    rows[1]["target"] = str(tmp_path / "broken.png")
    rows[2]["source"] = str(tmp_path / "nowhere.png")
    (tmp_path / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    strict = prompt_json_dataset(tmp_path, strict=True)
    with pytest.raises(DataError, match="broken.png"):
        strict[1]
    with pytest.raises(DataError, match="nowhere.png"):
        strict[2]
    lenient = prompt_json_dataset(tmp_path)
    with pytest.warns(UserWarning, match="broken.png"):
        item = lenient[1]
    assert item["txt"] == rows[3]["prompt"]  # row 2 is bad too, so row 3 stands in
    assert any("broken.png" in s for s in item["skipped"])
    bad = lenient.check()
    assert len(bad) == 2 and any("broken.png" in b for b in bad) and any("nowhere.png" in b for b in bad)

    # a run over the bad set finishes and counts what it skipped; a strict run names the file
    models = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(models, lenient, _cfg(steps=1, batch_size=4), tmp_path / "run")
    assert res.step == 1 and res.skipped >= 1
    models = _models()
    with pytest.raises(DataError, match=r"broken\.png|nowhere\.png"):
        train(models, strict, _cfg(steps=1, batch_size=4), tmp_path / "run2")


def test_annotate_and_merge_captions(tmp_path):
    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.zeros((64, 64, 3), np.uint8)
        img[16:48, 16:48] = rng.integers(100, 255, 3)
        save_image(img, src / f"im{i}.png")
    (src / "im0.txt").write_text("a square\n")
    (src / "junk.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="junk.png"):
        pj, bad = annotate(src, tmp_path / "ds", "canny", {"low_threshold": 50, "high_threshold": 100})
    assert [Path(b).name for b in bad] == ["junk.png"]
    rows = read_jsonl(pj)
    assert [r["prompt"] for r in rows] == ["a square", ""]
    edges = load_image(tmp_path / "ds" / rows[0]["source"])
    assert edges[32, 13:19].max() == 255 and edges[32, 24:40].max() == 0  # edge on the border, none inside
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "im1.txt").write_text("second")
    n, missing = merge_captions(tmp_path / "ds", tmp_path / "caps")
    assert n == 1 and missing == ["target/im0.png"]
    assert [r["prompt"] for r in read_jsonl(pj)] == ["a square", "second"]


# --- tiers ---------------------------------------------------------------------------------------


def test_tiers_train_exactly_the_right_parameters():
    m = _models()
    cn, unet = _count(m.controlnet), m.unet
    locked = select_trainable(m, "controlnet", sd_locked=True)
    assert sum(p.numel() for p in locked.values()) == cn
    unlocked = select_trainable(m, "controlnet", sd_locked=False)
    assert sum(p.numel() for p in unlocked.values()) == cn + _count(unet.output_blocks) + _count(unet.out)
    mid = select_trainable(m, "controlnet", only_mid_control=True)
    assert sum(p.numel() for p in mid.values()) == cn - _count(m.controlnet.zero_convs)
    assert all(not k.startswith("controlnet.zero_convs.") for k in mid)
    dec = select_trainable(m, "vae", train_encoder=False)
    assert sum(p.numel() for p in dec.values()) == _count(m.vae.decoder) + _count(m.vae.post_quant_conv)
    base = select_trainable(m, "base")
    assert sum(p.numel() for p in base.values()) == _count(unet) + _count(m.text)
    # requires_grad agrees with the selection everywhere
    total = sum(p.numel() for mod in m.modules().values() for p in mod.parameters() if p.requires_grad)
    assert total == _count(unet) + _count(m.text)


def test_locked_run_leaves_the_base_untouched(fill, tmp_path):
    m = _models()
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in m.controlnet.state_dict().items()}
    train(m, prompt_json_dataset(fill), _cfg(steps=1), tmp_path)
    assert all(torch.equal(before[k], v) for k, v in m.unet.state_dict().items())
    changed = [k for k, v in m.controlnet.state_dict().items() if not torch.equal(cn_before[k], v)]
    assert any(k.startswith("zero_convs.") for k in changed)


# --- the loop ------------------------------------------------------------------------------------


def _fixed_loss(m, batch, seed=0) -> float:
    obj = DiffusionObjective(m, "controlnet")
    g = torch.Generator().manual_seed(seed)
    x = batch["jpg"].permute(0, 3, 1, 2)
    with torch.no_grad():
        z = m.vae.encode(x).mode() * m.vae.scale_factor
        ids = m.text.tokenizer(batch["txt"])
        t = torch.randint(0, 1000, (len(x),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        return float(obj(z, ids, t, noise, batch["hint"].permute(0, 3, 1, 2)))


def test_few_steps_lower_the_loss_on_a_fixed_batch(fill, tmp_path):
    ds = prompt_json_dataset(fill)
    ds.rows = ds.rows[:1]
    batch = collate([ds[0]])
    m = _models()
    before = np.mean([_fixed_loss(m, batch, s) for s in range(3)])
    # unlocked tier: the ControlNet and the UNet decoder learn the one example quickly
    res = train(m, ds, _cfg(steps=8, lr=2e-3, prompt_dropout=0.0, sd_locked=False), tmp_path)
    after = np.mean([_fixed_loss(m, batch, s) for s in range(3)])
    assert after < 0.85 * before, (before, after)
    assert np.mean(res.losses[-3:]) < np.mean(res.losses[:2])
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 9
    assert (tmp_path / "loss.png").stat().st_size > 1000 or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(fill, tmp_path):
    ds = prompt_json_dataset(fill, resolution=64)
    cfg = dict(batch_size=2, lr=1e-3, ema_decay=0.9, checkpoint_every=2, keep_last=2, grad_accum=2)

    full = _models()
    res_full = train(full, ds, _cfg(steps=3, **cfg), tmp_path / "full")

    part = _models()
    res_a = train(part, ds, _cfg(steps=2, **cfg), tmp_path / "part")
    assert res_a.step == 2
    resumed = _models()  # a new process: fresh init, then resume
    res_b = train(resumed, ds, _cfg(steps=3, **cfg), tmp_path / "part", resume=True)
    assert res_b.step == 3
    for k, v in full.controlnet.state_dict().items():
        assert torch.equal(v, resumed.controlnet.state_dict()[k]), k
    assert res_full.losses[2:] == res_b.losses
    ema_full = st.load_checkpoint(res_full.checkpoint)["ema"]["shadow"]
    ema_res = st.load_checkpoint(res_b.checkpoint)["ema"]["shadow"]
    assert all(torch.equal(ema_full[k], ema_res[k]) for k in ema_full)
    assert [s for s, _ in st.list_checkpoints(tmp_path / "part" / "checkpoints")] == [2, 3]
    # the CSV holds each step once
    steps = [int(r.split(",")[0]) for r in (tmp_path / "part" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3]


def test_gradient_checkpointing_gives_the_same_update(fill, tmp_path):
    ds = prompt_json_dataset(fill, resolution=64)
    plain, ckpt = _models(), _models()
    train(plain, ds, _cfg(steps=2, prompt_dropout=0.0), tmp_path / "plain")
    train(ckpt, ds, _cfg(steps=2, prompt_dropout=0.0, gradient_checkpointing=True), tmp_path / "ckpt")
    assert any(getattr(m, "use_checkpoint", False) for m in ckpt.controlnet.modules())
    for k, v in plain.controlnet.state_dict().items():
        torch.testing.assert_close(ckpt.controlnet.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_bf16_mixed_precision_trains_fp32_master_weights(fill, tmp_path):
    ds = prompt_json_dataset(fill, resolution=64)
    m = _models()
    before = {k: v.clone() for k, v in m.controlnet.state_dict().items()}
    res = train(m, ds, _cfg(steps=2, mixed_precision="bf16"), tmp_path)
    assert all(np.isfinite(res.losses))
    sd = m.controlnet.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())  # autocast computes in bf16, stores fp32
    assert any(not torch.equal(before[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="mixed_precision"):
        _cfg(mixed_precision="fp8")


def _fake_state(**extra) -> dict:
    """The keys a training checkpoint must have, for tests of the file handling alone."""
    return {"trainable": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "micro_batches": 0, **extra}


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    st.save_checkpoint(folder, 1, {"w": torch.ones(3)})

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        st.save_checkpoint(folder, 2, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["checkpoint-00000001.pt"]  # no temp file left
    state = torch.load(folder / "checkpoint-00000001.pt")
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    # keep_last prunes, keep_every spares milestones
    for step in range(2, 7):
        st.save_checkpoint(folder, step, {"w": torch.ones(1)}, keep_last=2, keep_every=3)
    assert [s for s, _ in st.list_checkpoints(folder)] == [3, 5, 6]
    for p in folder.iterdir():
        if p.name != "checkpoint-00000001.pt":
            p.unlink()
    st.save_checkpoint(folder, 1, _fake_state(w=torch.ones(3)))
    # a damaged newest file is passed over, and named with the cause
    (folder / "checkpoint-00000003.pt").write_bytes(b"garbage")
    (path, state), unreadable = st.find_resume_point(folder)
    assert state["step"] == 1 and path.name == "checkpoint-00000001.pt"
    assert [(p.name, "unreadable checkpoint, truncated or damaged" in why) for p, why in unreadable] == [
        ("checkpoint-00000003.pt", True)]


def test_export_round_trip_keeps_the_config(tmp_path):
    m = _models()
    with torch.no_grad():
        for p in m.controlnet.zero_convs.parameters():
            p.normal_()
    export_models(m, tmp_path / "base.safetensors", "base")
    export_models(m, tmp_path / "cn.safetensors", "controlnet")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "base.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert json.loads(meta["ctrlnet_config"])["unet"]["model_channels"] == 32
    back = load_model_file(tmp_path / "base.safetensors")
    assert back.config == TINY_SD1
    for k, v in m.unet.state_dict().items():
        assert torch.equal(v, back.unet.state_dict()[k])
    cn = load_model_file(tmp_path / "cn.safetensors").controlnet
    for k, v in m.controlnet.state_dict().items():
        assert torch.equal(v, cn.state_dict()[k])


# --- fidelity metric and CLI -----------------------------------------------------------------------


def test_circle_score_measures_shape_and_colour():
    from ctrlnet.training.builders import draw_fill50k
    from ctrlnet.training.fidelity import circle_score

    c, b = COLORS["red"], COLORS["navy"]
    _, exact = draw_fill50k(128, (64, 64), 30, c, b)
    s = circle_score(exact, (64, 64, 30), c, b)
    assert s.iou > 0.97 and s.circle_error < 1 and s.background_error < 1
    _, shifted = draw_fill50k(128, (84, 64), 30, c, b)  # moved by 20 px: IoU of two disks ~0.41
    assert 0.3 < circle_score(shifted, (64, 64, 30), c, b).iou < 0.55
    wrong = exact.copy()
    wrong[exact[..., 2] == 128] = (0, 0, 168)  # background 40 levels off in blue
    s = circle_score(wrong, (64, 64, 30), c, b)
    assert s.iou > 0.97 and abs(s.background_error - 40 / 3) < 0.5
    # the colours swapped: the colour IoU breaks down, the shape IoU still sees the circle
    _, swapped = draw_fill50k(128, (64, 64), 30, b, c)
    s = circle_score(swapped, (64, 64, 30), c, b)
    assert s.iou < 0.05 and s.shape_iou > 0.95 and s.color_error > 100
    assert 0.3 < circle_score(shifted, (64, 64, 30), c, b).shape_iou < 0.55


def test_cli_data_commands(tmp_path, capsys):
    from ctrlnet.interfaces.cli import main

    assert main(["data", "fill50k", str(tmp_path / "d"), "--n", "3", "--size", "64"]) == 0
    assert len(read_jsonl(tmp_path / "d" / "prompt.json")) == 3
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    (tmp_path / "d" / "target" / "1.png").write_bytes(b"broken")
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "target/1.png" in out and "2 of 3 examples are readable" in out


def test_prompt_json_with_other_field_names_is_refused_before_training(fill, tmp_path, capsys):
    """A prompt.json written with other column names (diffusers' image/conditioning_image, the
    items' hint/jpg) stops `ctrlnet train` at the first bad line, 1-based, naming the fields the
    row has, before any model loads or run folder is made; it used to skip every row with a
    warning each and end in a DataLoader traceback after the models had loaded."""
    from ctrlnet.interfaces.cli import main

    rows = read_jsonl(fill / "prompt.json")
    lines = [json.dumps({"source": str(fill / r["source"]), "target": str(fill / r["target"]),
                         "prompt": r["prompt"]}) for r in rows[:3]]
    lines.insert(1, "")  # blank lines do not shift the line numbers reported
    lines[2] = json.dumps({"hint": "source/1.png", "jpg": "target/1.png", "prompt": "x"})
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        prompt_json_dataset(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'prompt.json'}:3: no 'source' or 'target' field (has 'hint', 'jpg', "
                            "'prompt'); every row needs 'source', 'target'")
    (tmp_path / "prompt.json").write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"prompt\.json:2: a row must be a JSON object .* got list"):
        prompt_json_dataset(tmp_path)
    capsys.readouterr()
    assert main(["train", str(tmp_path), "--base", "random:tiny-sd1", "--out", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prompt.json:2: a row must be a JSON object" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_mixed_image_sizes_without_resolution_name_the_fix(fill, tmp_path, capsys):
    """A data set with images of two sizes, trained without --resolution (each example keeps its
    own size) and a batch of more than one, failed in a loader worker with torch's "stack expects
    each tensor to be equal size"; the batch now says what is wrong and the two ways to train on it."""
    from ctrlnet.interfaces.cli import main

    rows = read_jsonl(fill / "prompt.json")[:2]
    for i, r in enumerate(rows):
        for k in ("source", "target"):
            img = load_image(fill / r[k])
            r[k] = f"{k}{i}.png"
            save_image(np.repeat(np.repeat(img, 2, 0), 2, 1) if i else img, tmp_path / r[k])  # 64 and 128 px
    (tmp_path / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = prompt_json_dataset(tmp_path, random_crop=False)
    with pytest.raises(DataError) as e:
        collate([ds[0], ds[1]])
    assert str(e.value) == ("the examples of one batch differ in size (jpg: 64x64 and 128x128); the data set's "
                            "images are not all one size: train with --resolution N (a multiple of 64: every "
                            "example scaled and cropped to N x N), or with --batch-size 1")
    assert collate([ds[0], ds[0]])["jpg"].shape == (2, 64, 64, 3)
    sized = prompt_json_dataset(tmp_path, random_crop=False, resolution=64)
    assert collate([sized[0], sized[1]])["jpg"].shape == (2, 64, 64, 3)
    from ctrlnet.checkpoints.convert import base_state_dict, write_single_file
    from ctrlnet.pipeline import random_base

    tiny = random_base("tiny-sd1")
    base = write_single_file(base_state_dict(tiny), tmp_path / "base.safetensors", tiny.config)
    capsys.readouterr()
    for workers in ("0", "1"):  # in a loader worker too: the message, not the worker's traceback
        assert main(["train", str(tmp_path), "--base", str(base), "--out", str(tmp_path / f"run{workers}"),
                     "--steps", "1", "--batch-size", "2", "--workers", workers, "--no-progress",
                     "--sample-every", "0"]) == 2
        assert capsys.readouterr().err == f"ctrlnet train: error: {e.value}\n"


def test_ema_resumed_state_goes_where_the_parameters_live():
    """Checkpoints load onto the CPU; a resumed EMA must follow the parameters to their device
    (on CUDA the first update after a resume otherwise fails with a device mismatch)."""
    from ctrlnet.training.state import EMA

    on_cpu = EMA([("w", torch.nn.Parameter(torch.ones(3)))], 0.9)
    on_cpu.update([("w", torch.full((3,), 3.0))])
    saved = on_cpu.state_dict()
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))  # stands for an accelerator here
    resumed = EMA([("w", meta)], 0.5)
    resumed.load_state_dict(saved)
    assert resumed.decay == 0.9 and resumed.shadow["w"].device.type == "meta"
    resumed.update([("w", meta)])  # no device mismatch
    back = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], 0.5)
    back.load_state_dict(saved)
    assert torch.allclose(back.shadow["w"], torch.full((3,), 1.2))
    assert back.shadow["w"] is not saved["shadow"]["w"]  # a copy, not the checkpoint's tensor
