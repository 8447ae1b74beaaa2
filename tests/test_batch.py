"""`ctrlnet batch`: one output per input with its record, per-name seeds, resumable, inputs checked
before models load, and two processes (gloo, Accelerate) writing exactly the files one process does."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ctrlnet.generation.batch import item_seed, list_images, plan_items
from ctrlnet.interfaces.cli import main
from serve_process import free_port  # noqa: E402

# tiny random models at 64 px and 2 steps: the point is the bookkeeping, not the pictures
MODEL_ARGS = ["--base", "random:tiny-sd1", "--controlnet", "random:c", "--device", "cpu"]
REQUEST_ARGS = ["--prompt", "a ring", "--annotator", "none", "--resolution", "64", "--steps", "2", "--seed", "7"]


def _inputs(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = np.zeros((64, 64, 3), np.uint8)
        cv2.circle(im, (18 + 12 * i, 32), 12, (255, 255, 255), 2)
        # mixed formats: outputs are PNGs named after the input's stem
        cv2.imwrite(str(folder / (f"m{i}.png" if i % 2 == 0 else f"m{i}.jpg")), im)
    return folder


def _batch(inp, out, *extra):
    return main(["batch", str(inp), "--out", str(out), "--no-progress", *MODEL_ARGS, *REQUEST_ARGS, *extra])


def test_outputs_records_seeds_and_resume(tmp_path, capsys):
    inp = _inputs(tmp_path / "in", n=2)
    out = tmp_path / "out"
    assert _batch(inp, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".ctrlnet-batch.json", "m0.control0.png", "m0.png", "m1.control0.png", "m1.png"]
    rec = json.loads(Image.open(out / "m1.png").info["ctrlnet"])
    assert rec["request"]["seed"] == item_seed(7, "m1.jpg") == (7 + zlib.crc32(b"m1.jpg")) % 2**32
    assert rec["request"]["steps"] == 2 and rec["control_maps"] == ["m1.control0.png"]
    assert "Seed: %d," % item_seed(7, "m1.jpg") in Image.open(out / "m1.png").info["parameters"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first["m0.png"] != first["m1.png"]  # different seeds, different images

    # the record makes the image again, as for `ctrlnet generate`
    assert main(["generate", "--from-png", str(out / "m1.png"), "--out", str(tmp_path / "again"), *MODEL_ARGS]) == 0
    again = np.asarray(Image.open(tmp_path / "again" / f"{item_seed(7, 'm1.jpg')}_0.png"))
    assert np.array_equal(again, np.asarray(Image.open(out / "m1.png")))

    # resume: only the missing output is made; a dead writer's half file is removed, not taken as
    # done; a live writer's temp file (another process's write in progress) is left alone
    (out / "m1.png").unlink()
    dead = out / ".m1.png.999999999.tmp"
    dead.write_bytes(b"\x89PNG half")
    live = out / f".m9.png.{os.getppid()}.tmp"
    live.write_bytes(b"partial")
    os.utime(out / "m0.png", (1, 1))
    capsys.readouterr()
    assert _batch(inp, out) == 0
    assert "1 of 2 already done; wrote 1" in capsys.readouterr().out
    assert (out / "m0.png").stat().st_mtime == 1  # untouched
    assert (out / "m1.png").read_bytes() == first["m1.png"]  # the same image again
    assert not dead.exists() and live.read_bytes() == b"partial"


def test_rerun_with_other_settings_is_refused_not_reported_done(tmp_path, capsys, monkeypatch):
    """A rerun with another prompt used to skip every finished image and print "2 of 2 already
    done": the folder then held images of the old prompt as if they were the new job's. It is
    refused before models load, naming each setting with both values; --overwrite moves the old
    images aside; a rerun with the same settings still finishes the job."""
    from ctrlnet.interfaces import model_args

    inp, out = _inputs(tmp_path / "in", n=2), tmp_path / "out"
    assert _batch(inp, out) == 0
    first = (out / "m0.png").read_bytes()
    (out / "m1.png").unlink()
    real_load = model_args.load_named

    def no_load(*a, **k):
        raise AssertionError("models loaded before the job was checked")

    monkeypatch.setattr(model_args, "load_named", no_load)
    capsys.readouterr()
    assert _batch(inp, out, "--prompt", "a square", "--steps", "3") == 2
    err = capsys.readouterr().err
    assert (f"{out} holds an earlier batch (1 images made with other settings (prompt: now 'a square', recorded "
            "'a ring'; steps: now 3, recorded 2)); rerun with the recorded settings to finish it, choose another "
            "--out, or pass --overwrite to move it aside and start over") in err
    assert sorted(p.name for p in out.iterdir()) == [".ctrlnet-batch.json", "m0.control0.png", "m0.png",
                                                     "m1.control0.png"]
    # how it runs is not a setting: another device string or dtype, or no progress bar, continues
    monkeypatch.setattr(model_args, "load_named", real_load)
    assert _batch(inp, out, "--dtype", "fp32") == 0
    assert "1 of 2 already done; wrote 1" in capsys.readouterr().out
    assert _batch(inp, out, "--prompt", "a square", "--overwrite") == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(moved) == 1 and (moved[0] / "m0.png").read_bytes() == first
    assert "0 of 2 already done; wrote 2" in capsys.readouterr().out
    rec = json.loads(Image.open(out / "m0.png").info["ctrlnet"])
    assert rec["request"]["prompt"] == "a square"


def test_hires_batch_image_is_made_again_from_its_record(tmp_path):
    """With hires fix the batch keeps each input as NAME.control0.source.png (transparency on black,
    as a ready-made map is read), so `generate --from-png` makes the same image; from the
    128-px map alone it was 1 level off (that map resized to 64 px is not the input fitted to it)."""
    inp = _inputs(tmp_path / "in", n=1)
    rgba = np.zeros((64, 64, 4), np.uint8)
    cv2.circle(rgba, (30, 30), 14, (255, 255, 255, 255), 3)  # strokes on transparent
    cv2.imwrite(str(inp / "m0.png"), rgba)
    out = tmp_path / "out"
    assert _batch(inp, out, "--hires-scale", "2", "--width", "64", "--height", "64",
                  "--hires-denoising-strength", "0.6") == 0
    rec = json.loads(Image.open(out / "m0.png").info["ctrlnet"])
    assert rec["control_sources"] == {"0": "m0.control0.source.png"}
    saved = np.asarray(Image.open(out / "m0.control0.source.png"))
    assert saved.shape == (64, 64, 3) and saved[0, 0].tolist() == [0, 0, 0] and saved.max() == 255
    assert main(["generate", "--from-png", str(out / "m0.png"), "--out", str(tmp_path / "again"), *MODEL_ARGS]) == 0
    seed = item_seed(7, "m0.png")
    again = np.asarray(Image.open(tmp_path / "again" / f"{seed}_0.png")).astype(int)
    first = np.asarray(Image.open(out / "m0.png")).astype(int)
    assert first.shape == (128, 128, 3) and np.abs(again - first).max() == 0


def test_an_unreadable_input_is_skipped_named_and_the_rest_made(tmp_path, capsys):
    """One corrupt file in the folder ended the whole job at its turn (later inputs never made);
    it is now skipped with its name and cause, the others are made, the command ends with exit 1
    and a rerun (with the file fixed) finishes the job."""
    inp = _inputs(tmp_path / "in", n=3)
    (inp / "m1.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    capsys.readouterr()
    assert _batch(inp, out) == 1
    cap = capsys.readouterr()
    assert f"skipped {inp / 'm1.jpg'} is not a readable image" in cap.err
    assert "0 of 3 already done; wrote 2 to" in cap.out
    assert f"1 inputs could not be used ({inp / 'm1.jpg'}; causes above): fix or remove them and rerun" in cap.err
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == [
        "m0.control0.png", "m0.png", "m2.control0.png", "m2.png"]
    _inputs(inp, n=2)  # m1.jpg readable again
    assert _batch(inp, out) == 0
    assert "2 of 3 already done; wrote 1" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "file", "empty", "same_as_input", "unwritable", "clash", "n", "seed",
                                  "steps", "size", "eta"])
def test_bad_inputs_fail_before_models_load(tmp_path, capsys, monkeypatch, case):
    import ctrlnet.interfaces.model_args as model_args

    def no_load(*a, **k):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr(model_args, "load_named", no_load)
    inp, out, extra = tmp_path / "in", tmp_path / "out", []
    want = {"missing": "does not exist", "file": "is not a folder", "empty": "holds no images",
            "same_as_input": "is the input folder", "unwritable": "is a file", "clash": "would both write",
            "n": "one image per input", "seed": "fixed seed", "steps": "steps=0 is out of range",
            "size": "the output would be 4096x4096", "eta": "sampler 'lms' takes no option eta"}[case]
    if case == "file":
        inp.write_text("x")
    elif case == "empty":
        inp.mkdir()
        (inp / "notes.txt").write_text("x")
        (inp / ".hidden.png").write_bytes(b"x")
    elif case != "missing":
        _inputs(inp, n=2)
    if case == "same_as_input":
        out = inp
    elif case == "unwritable":
        out.write_text("a file")
    elif case == "clash":
        cv2.imwrite(str(inp / "m0.jpg"), np.zeros((8, 8, 3), np.uint8))
    elif case == "n":
        extra = ["-n", "2"]
    elif case == "seed":
        extra = ["--seed", "-1"]
    elif case in ("steps", "size", "eta"):  # refused after loading the models until now
        extra = {"steps": ["--steps", "0"], "size": ["--width", "4096", "--height", "4096"],
                 "eta": ["--sampler", "LMS", "--eta", "0.5"]}[case]
    assert _batch(inp, out, *extra) == 2
    assert want in capsys.readouterr().err


def test_work_list_is_sorted_and_seeds_depend_on_names_only(tmp_path):
    inp = _inputs(tmp_path / "in")
    files = list_images(inp)
    assert [f.name for f in files] == ["m0.png", "m1.jpg", "m2.png"]
    items = plan_items(files, tmp_path / "out", 3)
    assert [it.output.name for it in items] == ["m0.png", "m1.png", "m2.png"]
    # a file added in front changes no other item's seed
    (inp / "a.png").write_bytes((inp / "m0.png").read_bytes())
    again = {it.source.name: it.seed for it in plan_items(list_images(inp), tmp_path / "out", 3)}
    assert all(again[it.source.name] == it.seed for it in items)
    assert len(set(again.values())) == 4


# ---- two processes through Accelerate (gloo on the CPU), as `accelerate launch` would start them ----

def _worker(rank: int, world: int, port: int, inp: str, out: str) -> None:
    # the environment accelerate launch / torchrun set
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")  # else Accelerate sets cores / processes threads per process
    import torch

    # One thread, as in the one-process run: on a CPU the float sums depend on the thread count (the
    # first version of this test saw one image differ by a level when Accelerate gave it 1 thread, not 2).
    torch.set_num_threads(1)
    import ctrlnet.pipeline
    from ctrlnet.interfaces.cli import main as cli

    real, seeds = ctrlnet.pipeline.generate, []

    def counted(models, req, *a, **k):  # which items this process made
        seeds.append(req.seed)
        return real(models, req, *a, **k)

    ctrlnet.pipeline.generate = counted
    rc = cli(["batch", inp, "--out", out, "--no-progress", *MODEL_ARGS, *REQUEST_ARGS])
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rc": rc, "seeds": seeds}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_two_processes_write_exactly_the_files_one_process_does(tmp_path, capsys):
    pytest.importorskip("accelerate")
    import torch
    import torch.multiprocessing as mp

    inp = _inputs(tmp_path / "in", n=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        assert _batch(inp, tmp_path / "one") == 0  # one process: this one, no launcher
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, free_port(), str(inp), str(tmp_path / "two")), nprocs=2, join=True)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert sorted(one) == sorted(two) and len(one) == 7  # 3 images, 3 maps, the job's settings
    for name in one:
        assert one[name] == two[name], name  # byte-equal PNGs, text chunks included
    # the work was split: each process made its own items (3 items -> 2 + 1), none twice
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert sorted(len(r["seeds"]) for r in ranks) == [1, 2]
    assert sorted(ranks[0]["seeds"] + ranks[1]["seeds"]) == sorted(item_seed(7, n) for n in ("m0.png", "m1.jpg", "m2.png"))
    assert "wrote 3" in capsys.readouterr().out
