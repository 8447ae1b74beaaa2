"""Training runs (and every other resumable job) never lose work and say what they do: issue 16.

Cases of the issue: (1) a fresh start over an earlier run, (2) only unreadable checkpoints,
(3) ``--resume-from`` a missing or damaged file, (4) a changed learning rate on resume, (5) temp
files of killed writes; and a kill test: SIGKILL at several points, resumed, bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ctrlnet
from ctrlnet.interfaces.cli import main
from ctrlnet.training import state as st

pytest.importorskip("accelerate")

CHILD = Path(__file__).with_name("train_child.py")
TRUNCATED = ("unreadable checkpoint, truncated or damaged (RuntimeError: PytorchStreamReader failed reading zip "
             "archive: failed finding central directory)")
HINT = "pass --resume to continue it, or --overwrite to move it aside and start over"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny base model file (random, non-trivial UNet) and a 6-example fill50k set."""
    from helpers import randomize_

    from ctrlnet.config import TINY_SD1
    from ctrlnet.training.builders import make_fill50k
    from ctrlnet.training.models import build_models, export_models

    root = tmp_path_factory.mktemp("runs")
    m = build_models(TINY_SD1, with_controlnet=False)
    randomize_(m.unet, seed=1, scale=0.05)
    export_models(m, root / "base.safetensors", "base")
    make_fill50k(root / "data", 6, 64, seed=3)
    setup = {"base": root / "base.safetensors", "data": root / "data"}
    # one finished run (checkpoints 1 and 2, the exported model) that tests copy and then misuse
    assert main(_args(setup, root / "run")) == 0
    setup["run"] = root / "run"
    return setup


def _copy_run(setup, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    return run


def _args(setup, run, *extra, base=None, steps=2, every=1, keep=2, lr="1e-3") -> list[str]:
    return ["train", str(setup["data"]), "--base", str(base or setup["base"]), "--out", str(run),
            "--steps", str(steps), "--batch-size", "2", "--lr", lr, "--checkpoint-every", str(every),
            "--keep-last", str(keep), "--ema-decay", "0.9", "--workers", "0", "--cpu", "--no-progress", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _lr_column(run: Path) -> list[tuple[int, float]]:
    with open(run / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- case 1: a fresh start over an earlier run ------------------------------------------------------


def test_case1_fresh_start_over_a_run_is_refused_before_models_load(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    before = _snapshot(run)
    # the base file does not exist: the refusal has to come before the models load
    assert main(_args(setup, run, base=tmp_path / "absent.safetensors")) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: {run} holds an earlier training run (checkpoints at steps 1, 2; loss.csv with "
        f"2 steps; the exported model controlnet.safetensors); {HINT}\n")
    assert _snapshot(run) == before  # not a byte changed
    assert main(_args(setup, run, "--resume", "--overwrite")) == 2
    assert "pass one of them" in capsys.readouterr().err

    # --overwrite moves the whole earlier run aside (nothing deleted) and says where
    assert main(_args(setup, run, "--overwrite", steps=1)) == 0
    out = capsys.readouterr().out
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and re.fullmatch(r"run\.replaced-\d{8}-\d{6}", moved[0].name)
    assert out.startswith(f"moved the earlier training run in {run} aside to {moved[0]}\n")
    assert _snapshot(moved[0]) == before
    assert [s for s, _ in st.list_checkpoints(run / "checkpoints")] == [1]
    assert _lr_column(run) == [(1, 1e-3)]


def test_case1_overwrite_refuses_to_move_an_input_away(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    inside = run / "base.safetensors"
    inside.write_bytes(setup["base"].read_bytes())
    assert main(_args(setup, run, "--overwrite", base=inside)) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: --overwrite would move {run} aside, and with it {inside}, an input of this job; "
        "move that input elsewhere first, or choose another output\n")


def test_case1_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    folder = tmp_path / "checkpoints"
    state = {"trainable": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "micro_batches": 0}
    for step in (8, 10):  # left by another timeline, with higher steps
        st.save_checkpoint(folder, step, state, keep_last=2)
    for step in (2, 4, 6):
        path = st.save_checkpoint(folder, step, state, keep_last=2)
        assert path.is_file()
    # older ones pruned to keep_last - 1 besides the new one; higher steps are not "older"
    assert [s for s, _ in st.list_checkpoints(folder)] == [4, 6, 8, 10]


# --- case 2: only unreadable checkpoints -----------------------------------------------------------


def test_case2_unreadable_checkpoints_are_set_aside_and_never_resumed_from_silently(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    ck1, ck2 = (st.checkpoint_path(run / "checkpoints", s) for s in (1, 2))
    good1 = ck1.read_bytes()
    for ck in (ck1, ck2):
        ck.write_bytes(ck.read_bytes()[:4096])  # truncated
    before = _snapshot(run)
    assert main(_args(setup, run, "--resume", base=tmp_path / "absent.safetensors")) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: cannot resume {run}: no checkpoint there loads: {ck2}: {TRUNCATED}; "
        f"{ck1}: {TRUNCATED}. Nothing was changed; pass --resume-from a good checkpoint, or --overwrite to move "
        "this run aside and start over\n")
    assert _snapshot(run) == before

    # a readable older one: resumed from, the unreadable newer one renamed (not counted, not deleted)
    ck1.write_bytes(good1)
    assert main(_args(setup, run, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"set aside checkpoint-00000002.pt as checkpoint-00000002.pt.unreadable: {ck2}: {TRUNCATED}\n" in out
    assert f"resumed from {ck1} at step 1\n" in out
    assert _names(run / "checkpoints") == ["checkpoint-00000001.pt", "checkpoint-00000002.pt",
                                           "checkpoint-00000002.pt.unreadable"]
    assert (run / "checkpoints" / "checkpoint-00000002.pt.unreadable").read_bytes() == before[
        "checkpoints/checkpoint-00000002.pt"]
    assert [s for s, _ in _lr_column(run)] == [1, 2]
    # the redone step 2 equals the first run's (whose file was damaged afterwards)
    redone = torch.load(ck2, weights_only=False)["trainable"]
    first = torch.load(st.checkpoint_path(setup["run"] / "checkpoints", 2), weights_only=False)["trainable"]
    assert all(torch.equal(redone[k], v) for k, v in first.items())

    # set-aside files alone never pass for "nothing to resume from"
    for s in (1, 2):
        st.checkpoint_path(run / "checkpoints", s).unlink()
    assert main(_args(setup, run, "--resume")) == 2
    aside = run / "checkpoints" / "checkpoint-00000002.pt.unreadable"
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: cannot resume {run}: no checkpoint there loads: {aside} (set aside earlier). "
        "Nothing was changed; pass --resume-from a good checkpoint, or --overwrite to move this run aside and "
        "start over\n")


# --- case 3: --resume-from ------------------------------------------------------------------------


def test_case3_resume_from_must_exist_and_load_and_each_failure_is_one_line(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    ck1, ck2 = (st.checkpoint_path(run / "checkpoints", s) for s in (1, 2))
    absent = tmp_path / "absent.safetensors"  # as --base: every refusal comes before the models load
    missing = run / "checkpoints" / "checkpoint-00000009.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ck2.read_bytes()[:4096])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    cases = [
        (missing, f"{missing}: no such checkpoint file"),
        (truncated, f"{truncated}: {TRUNCATED}"),
        (empty, f"{empty}: unreadable checkpoint (the file is empty)"),
        (setup["base"], f"{setup['base']}: a safetensors model file, not a training checkpoint (those are "
                        "RUN/checkpoints/checkpoint-<step>.pt; to start from a model use --controlnet)"),
        (other, f"{other}: not a training checkpoint of ctrlnet (it has ['weights'], not trainable, optimizer, "
                "scheduler, rng, step, micro_batches)"),
    ]
    for path, message in cases:
        assert main(_args(setup, run, "--resume-from", str(path), base=absent)) == 2, path
        assert capsys.readouterr().err == f"ctrlnet train: error: {message}\n"
    # a good file of another run cannot continue into a folder that holds this one
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(ck1.read_bytes())
    assert main(_args(setup, run, "--resume-from", str(elsewhere), base=absent)) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: {run} holds an earlier training run (checkpoints at steps 1, 2; loss.csv with 2 "
        f"steps; the exported model controlnet.safetensors); resuming from {elsewhere}, which is not part of it, "
        "would mix the two: pass --overwrite to move it aside first, or choose another --out\n")

    # an older checkpoint of the same run: the newer one is set aside, and redone exactly
    first = torch.load(ck2, weights_only=False)
    assert main(_args(setup, run, "--resume-from", str(ck1))) == 0
    out = capsys.readouterr().out
    assert ("set aside checkpoint-00000002.pt as checkpoint-00000002.pt.superseded: it is newer than "
            "checkpoint-00000001.pt, which this run continues\n") in out
    assert _names(run / "checkpoints") == ["checkpoint-00000001.pt", "checkpoint-00000002.pt",
                                           "checkpoint-00000002.pt.superseded"]
    again = torch.load(ck2, weights_only=False)
    assert all(torch.equal(again["trainable"][k], v) for k, v in first["trainable"].items())


# --- case 4: settings on resume --------------------------------------------------------------------


def test_case4_changed_lr_is_applied_to_optimizer_schedule_and_log(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    assert main(_args(setup, run, "--resume", steps=3, lr="5e-4")) == 0
    out = capsys.readouterr().out
    assert "steps: 3 (the checkpoint's was 2), applied\n" in out
    assert "lr: 0.0005 (the checkpoint's was 0.001), applied\n" in out
    # the log's lr column: the rate each step's update used
    assert _lr_column(run) == [(1, 1e-3), (2, 1e-3), (3, 5e-4)]
    ck = {s: torch.load(p, weights_only=False) for s, p in st.list_checkpoints(run / "checkpoints")}
    assert list(ck) == [2, 3]
    groups = ck[3]["optimizer"]["param_groups"]
    assert [(g["lr"], g["initial_lr"]) for g in groups] == [(5e-4, 5e-4)]
    assert ck[3]["scheduler"]["base_lrs"] == [5e-4] and ck[3]["train_config"]["lr"] == 5e-4
    # and the update of step 3 really used it: AdamW (no weight decay) moved each weight by
    # lr * m_hat / (sqrt(v_hat) + eps), with the moments stored in checkpoint 3
    names = list(ck[3]["trainable"])
    opt = ck[3]["optimizer"]
    beta1, beta2 = opt["param_groups"][0]["betas"]
    eps = opt["param_groups"][0]["eps"]
    moved, predicted = [], []
    for i, name in enumerate(names):
        s = opt["state"][i]
        t = float(s["step"])
        direction = (s["exp_avg"] / (1 - beta1**t)) / ((s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
        moved.append((ck[2]["trainable"][name] - ck[3]["trainable"][name]).flatten())
        predicted.append(direction.flatten())
    moved, predicted = torch.cat(moved).double(), torch.cat(predicted).double()
    assert predicted.abs().max() > 0.5  # a real step
    # (atol: float32 weights near 1 move in steps of their ulp, 6e-8)
    torch.testing.assert_close(moved, 5e-4 * predicted, rtol=1e-3, atol=2e-7)
    assert (moved - 1e-3 * predicted).abs().max() > 1e-4  # the old rate would be far off


def test_case4_settings_that_cannot_change_are_refused_naming_both_values(setup, tmp_path, capsys):
    run = _copy_run(setup, tmp_path)
    ck2 = st.checkpoint_path(run / "checkpoints", 2)
    before = _snapshot(run)
    args = _args(setup, run, "--resume", "--seed", "7", "--ema-decay", "0.5", steps=3,
                 base=tmp_path / "absent.safetensors")
    args[args.index("--batch-size") + 1] = "3"
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet train: error: cannot resume from {ck2}: batch_size is 3 but the checkpoint's is 2 (it would "
        "change the data order); ema_decay is 0.5 but the checkpoint's is 0.9 (it would change the EMA's "
        "averaging); seed is 7 but the checkpoint's is 0 (it would change the data order and noise). These "
        "cannot change mid-run: use the checkpoint's values, or start a new run (--overwrite, or another --out)\n")
    assert _snapshot(run) == before


def test_case4_other_data_or_base_on_resume_is_refused_before_models_load(setup, tmp_path, capsys, monkeypatch):
    """A resume on other data (more examples, another --resolution, --invert-source) or against
    another base of the same layout continues the checkpoint's run on different inputs: refused,
    naming what differs, with nothing in the run folder changed; the data before the models load."""
    from helpers import randomize_

    from ctrlnet.config import TINY_SD1
    from ctrlnet.training import models as train_models
    from ctrlnet.training.builders import make_fill50k
    from ctrlnet.training.models import build_models, export_models

    run = _copy_run(setup, tmp_path)
    ck2 = st.checkpoint_path(run / "checkpoints", 2)
    recorded = torch.load(ck2, weights_only=False)["inputs"]
    assert recorded["examples"] == 6 and recorded["resolution"] is None and len(recorded["frozen_weights"]) == 64
    before = _snapshot(run)
    make_fill50k(tmp_path / "more", 8, 64, seed=3)  # the same 6 examples and 2 more
    loads = []
    monkeypatch.setattr(train_models, "load_models", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    for extra, data, said in [
        ((), tmp_path / "more", "the data set has other examples (the data order) (examples: now 8, the checkpoint's 6); "
                                "the data set's rows (image files and prompts) differ (rows_sha256: now "),
        (("--resolution", "64"), setup["data"],
         "the images are resized to another --resolution (resolution: now 64, the checkpoint's None)"),
        (("--invert-source",), setup["data"],
         "the control images are inverted differently (--invert-source) (invert_source: now True, the checkpoint's "
         "False)"),
    ]:
        args = _args(setup, run, "--resume", *extra, steps=3)
        args[1] = str(data)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ctrlnet train: error: cannot resume from {ck2}: {said}"), err
        assert err.endswith(". Resume with the first run's data, --resolution, --invert-source and --base, or start "
                            "a new run (--overwrite, or another --out)\n")
    assert loads == [] and _snapshot(run) == before
    monkeypatch.undo()
    # a moved data folder is the same data (paths are kept relative to it)
    shutil.copytree(setup["data"], tmp_path / "moved")
    # another base of the same layout: found once the models are built, before any step
    m = build_models(TINY_SD1, with_controlnet=False)
    randomize_(m.unet, seed=2, scale=0.05)
    export_models(m, tmp_path / "other.safetensors", "base")
    args = _args(setup, run, "--resume", steps=3, base=tmp_path / "other.safetensors")
    args[1] = str(tmp_path / "moved")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ctrlnet train: error: cannot resume from {ck2}: the frozen weights differ: another --base "
                          "(or VAE, text encoder) than the run's (frozen_weights: now "), err
    assert _snapshot(run) == before
    # the same base from the moved data folder resumes
    assert main(_args(setup, run, "--resume", steps=3)[:1] + [str(tmp_path / "moved")]
                + _args(setup, run, "--resume", steps=3)[2:]) == 0
    assert [s for s, _ in st.list_checkpoints(run / "checkpoints")] == [2, 3]


def test_case4_every_setting_is_either_applied_or_refused_and_help_says_which(capsys):
    from dataclasses import fields

    from ctrlnet.training.loop import TrainConfig
    from ctrlnet.training.resume_settings import APPLIED_ON_RESUME, REFUSED_ON_RESUME

    names = {f.name for f in fields(TrainConfig)}
    assert names == set(APPLIED_ON_RESUME) | set(REFUSED_ON_RESUME)
    assert not set(APPLIED_ON_RESUME) & set(REFUSED_ON_RESUME)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    applied = text.split("applied from the next step: ")[1].split(" refused")[0]
    refused = text.split("naming the setting and both values): ")[1].split(" examples")[0]
    assert "--lr," in applied and "--steps," in applied and "--batch-size" not in applied
    assert "--batch-size," in refused and "--seed," in refused and "--lr" not in refused


# --- case 5: temp files of killed writes -----------------------------------------------------------


def test_case5_stale_temp_files_are_removed_at_the_next_start_and_only_ours(setup, tmp_path, capsys):
    from ctrlnet.atomic import stale_temps

    run = _copy_run(setup, tmp_path)
    dead = _dead_pid()
    stale = [run / "checkpoints" / f".checkpoint-00000003.pt.{dead}.tmp", run / f".controlnet.safetensors.{dead}.tmp",
             run / "samples" / f".step-00000003.png.{dead}.tmp.png"]
    kept = [run / "checkpoints" / f".checkpoint-00000004.pt.{os.getpid()}.tmp",  # its writer is alive
            run / "notes.tmp", run / ".loss.csv.tmp", run / f".x.{dead}.tmpfile", run / f"x.{dead}.tmp"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    assert stale_temps(run) == sorted(stale)
    assert main(_args(setup, run, "--resume", steps=3)) == 0
    out = capsys.readouterr().out
    assert f"removed 3 temp file(s) of writes killed earlier: {', '.join(map(str, sorted(stale)))}\n" in out
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_case5_atomic_writers_use_the_one_temp_pattern(tmp_path, monkeypatch):
    """Every writer's temp name is ``.NAME.<pid>.tmp[.EXT]``, so the cleaner knows them all."""
    from ctrlnet.atomic import temp_owner
    from ctrlnet.checkpoints.save import save_model_file
    from ctrlnet.image import save_image
    from ctrlnet.training.builders import write_jsonl

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    write_jsonl(tmp_path / "p.json", [{"a": 1}])
    save_model_file(tmp_path / "m.safetensors", {"x.": {"w": torch.ones(1)}})
    st.atomic_torch_save({"w": 1}, tmp_path / "c.pt")
    assert seen == [f".a.png.{os.getpid()}.tmp", f".p.json.{os.getpid()}.tmp",
                    f".m.safetensors.{os.getpid()}.tmp", f".c.pt.{os.getpid()}.tmp"]
    assert all(temp_owner(n) == os.getpid() for n in seen)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- SIGKILL at several points, then resume: bit-identical to an uninterrupted run -------------------


def _child_cmd(spec: str, args: list[str]) -> tuple[list[str], dict]:
    env = dict(os.environ)
    src = str(Path(ctrlnet.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, str(CHILD), spec, *args], env


def _child(spec: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd, env = _child_cmd(spec, args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _same(a, b, where="") -> None:
    """Recursive bit-for-bit equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _loss_log(run: Path) -> list[tuple[str, str, str]]:
    with open(run / "loss.csv", newline="") as f:
        return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def test_sigkill_at_several_points_then_resume_is_bit_identical(setup, tmp_path):
    from safetensors.torch import load_file

    def args(run, *extra):
        return _args(setup, run, "--threads", "1", *extra, steps=6, every=2, keep=2)

    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd, env = _child_cmd("none", args(ref))  # the uninterrupted run, beside the interrupted one
    uninterrupted = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = -signal.SIGKILL

    r = _child("after-step:3", args(run))  # between checkpoints: step 3 is logged, not saved
    assert r.returncode == killed, r.stderr
    assert [s for s, _ in st.list_checkpoints(run / "checkpoints")] == [2]

    r = _child("in-checkpoint:4", args(run, "--resume"))  # half of checkpoint 4 on disk
    assert r.returncode == killed, r.stderr
    temps = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".checkpoint-00000004.pt.")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0 and temps[0].name.endswith(".tmp")
    assert [s for s, _ in st.list_checkpoints(run / "checkpoints")] == [2]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout

    r = _child("in-export", args(run, "--resume"))  # trains steps 3-6, dies writing the model file
    assert r.returncode == killed, r.stderr
    assert f"removed 1 temp file(s) of writes killed earlier: {temps[0]}" in r.stdout
    export_temps = [p for p in run.iterdir() if p.name.startswith(".controlnet.safetensors.")]
    assert len(export_temps) == 1 and not (run / "controlnet.safetensors").exists()

    r = _child("none", args(run, "--resume"))  # nothing left to train: writes the model file
    assert r.returncode == 0, r.stderr
    assert f"removed 1 temp file(s) of writes killed earlier: {export_temps[0]}" in r.stdout

    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert _loss_log(run) == _loss_log(ref) and len(_loss_log(ref)) == 6
    for step in (4, 6):
        a = torch.load(st.checkpoint_path(ref / "checkpoints", step), weights_only=False)
        b = torch.load(st.checkpoint_path(run / "checkpoints", step), weights_only=False)
        for key in ("trainable", "ema", "optimizer", "scheduler", "rng", "micro_batches", "step", "train_config"):
            _same(a[key], b[key], f"step {step} {key}")
    assert _names(run / "checkpoints") == _names(ref / "checkpoints")
    exported, expected = load_file(str(run / "controlnet.safetensors")), load_file(str(ref / "controlnet.safetensors"))
    _same(expected, exported, "export")


# --- the same rules for the other resumable jobs ---------------------------------------------------


def test_data_builder_refuses_resumes_exactly_and_overwrites(tmp_path, capsys):
    from ctrlnet.training.builders import make_fill50k

    out, args = tmp_path / "fill", ["data", "fill50k", str(tmp_path / "fill"), "--n", "6", "--size", "32"]
    assert main(args) == 0
    first = _snapshot(out)
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"ctrlnet data: error: {out} holds an earlier data set (job.json, prompt.json, source, target); {HINT}\n")
    assert _snapshot(out) == first
    # an interrupted build: no prompt.json yet, two images missing, a killed write's temp file
    (out / "prompt.json").unlink()
    (out / "source" / "3.png").unlink()
    (out / "target" / "5.png").unlink()
    stale = out / "source" / f".4.png.{_dead_pid()}.tmp"
    stale.write_bytes(b"half an image")
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main([*args, "--resume"]) == 0
    assert _snapshot(out) == first  # the same files as the uninterrupted build
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # written images were not redone
    assert f"removed 1 temp file(s) of writes killed earlier: {stale}\n" in capsys.readouterr().out
    # resuming with other settings names each one with both values
    with pytest.raises(ValueError) as e:
        make_fill50k(out, 6, 48, seed=0, resume=True)
    assert str(e.value) == (f"cannot resume the data set in {out} with other settings (size: now 48, recorded 32); "
                            "use the recorded ones, or --overwrite to start over")
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("fill.replaced-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == first
    assert f"moved the earlier data set in {out} aside to {moved[0]}\n" in capsys.readouterr().out


def test_video_pairs_resume_skips_finished_videos_and_ends_the_same(tmp_path, monkeypatch):
    pytest.importorskip("av")
    from ctrlnet.colorize import pairs
    from ctrlnet.colorize.synthetic import synthetic_clip
    from ctrlnet.colorize.video import write_video

    videos = [write_video(synthetic_clip(10, 32, seed=s), tmp_path / f"v{s}.mp4", 10) and tmp_path / f"v{s}.mp4"
              for s in (1, 2)]
    kw = dict(low=0.0, high=1.0, min_gap=2, max_gap=4)
    whole = pairs.video_pairs(videos, tmp_path / "whole", **kw)
    calls = []
    real = pairs.select_pairs

    def interrupted(frames, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies in the second video
        return real(frames, *a, **k)

    monkeypatch.setattr(pairs, "select_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pairs.video_pairs(videos, tmp_path / "part", **kw)
    assert sorted(p.name for p in (tmp_path / "part" / "progress").iterdir()) == ["000.jsonl"]
    assert not (tmp_path / "part" / "prompt.json").exists()
    with pytest.raises(ValueError, match="holds an earlier data set"):
        pairs.video_pairs(videos, tmp_path / "part", **kw)
    with pytest.raises(ValueError, match=r"min_gap: now 3, recorded 2"):
        pairs.video_pairs(videos, tmp_path / "part", **{**kw, "min_gap": 3}, resume=True)
    calls.clear()
    monkeypatch.setattr(pairs, "select_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = pairs.video_pairs(videos, tmp_path / "part", **kw, resume=True)
    assert len(calls) == 1  # only the unfinished video
    assert rows == whole and whole
    assert (tmp_path / "part" / "prompt.json").read_bytes() == (tmp_path / "whole" / "prompt.json").read_bytes()
    assert not (tmp_path / "part" / "progress").exists()


def test_frame_pairs_resume_skips_finished_sources_without_rendering_them(tmp_path, monkeypatch):
    # the colorize recipe's default path: clips rendered straight into pairs, one callable per clip
    from ctrlnet.colorize import pairs
    from ctrlnet.colorize.synthetic import synthetic_clip

    rendered = []

    def clip(seed):
        rendered.append(seed)
        return synthetic_clip(10, 32, seed=seed)

    sources = [(f"clip_{s}", lambda s=s: clip(s)) for s in (1, 2, 3)]
    kw = dict(low=0.0, high=1.0, min_gap=2, max_gap=4, settings={"seeds": [1, 2, 3]})
    whole = pairs.frame_pairs(sources, tmp_path / "whole", **kw)
    assert rendered == [1, 2, 3] and whole
    real = pairs.select_pairs
    calls = []

    def interrupted(frames, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job dies in the third clip
        return real(frames, *a, **k)

    monkeypatch.setattr(pairs, "select_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pairs.frame_pairs(sources, tmp_path / "part", **kw)
    assert sorted(p.name for p in (tmp_path / "part" / "progress").iterdir()) == ["000.jsonl", "001.jsonl"]
    with pytest.raises(ValueError, match=r"seeds: now \[1, 2, 4\], recorded \[1, 2, 3\]"):
        pairs.frame_pairs(sources, tmp_path / "part", **{**kw, "settings": {"seeds": [1, 2, 4]}}, resume=True)
    monkeypatch.setattr(pairs, "select_pairs", real)
    rendered.clear()
    rows = pairs.frame_pairs(sources, tmp_path / "part", **kw, resume=True)
    assert rendered == [3]  # the finished clips were not rendered again
    assert rows == whole
    assert (tmp_path / "part" / "prompt.json").read_bytes() == (tmp_path / "whole" / "prompt.json").read_bytes()
    assert not (tmp_path / "part" / "progress").exists()
    assert pairs.frame_pairs(sources, tmp_path / "part", **kw, resume=True) == whole  # finished: read back
    assert rendered == [3]


def test_recipe_build_folder_overwrite_moves_it_aside(tmp_path, capsys):
    from ctrlnet.training.run_folder import prepare_build_dir

    out = tmp_path / "build"
    (out / "vae" / "checkpoints").mkdir(parents=True)
    (out / "vae" / "checkpoints" / "checkpoint-00000100.pt").write_bytes(b"x")
    (out / "recipe.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        prepare_build_dir(out, resume=False)
    assert str(e.value) == f"{out} holds an earlier build (recipe.json, vae); {HINT}"
    assert prepare_build_dir(out, resume=True) == out and (out / "recipe.json").is_file()
    prepare_build_dir(out, resume=False, overwrite=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("build.replaced-")]
    assert len(moved) == 1 and (moved[0] / "vae" / "checkpoints" / "checkpoint-00000100.pt").is_file()
    assert out.is_dir() and not any(out.iterdir())
    assert capsys.readouterr().out == f"moved the earlier build in {out} aside to {moved[0]}\n"
