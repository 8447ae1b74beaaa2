"""The ctrlnet command: generate writes PNGs with parameters; errors exit 2 with a message."""

import json
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image

from ctrlnet.interfaces.cli import main


def test_generate_writes_pngs_with_parameters(tmp_path, capsys):
    img = np.zeros((64, 64, 3), np.uint8)
    cv2.rectangle(img, (10, 10), (50, 50), (255, 255, 255), 2)
    cv2.imwrite(str(tmp_path / "in.png"), img)
    rc = main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--control", str(tmp_path / "in.png"),
               "--annotator", "canny", "--prompt", "a square", "--steps", "2", "--resolution", "64", "--seed", "7",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out
    assert "dtype: float32 on cpu" in out  # what --dtype auto resolved to (the suite pins fp32)
    png = tmp_path / "out" / "7_0.png"
    info = Image.open(png).info
    assert "Seed: 7" in info["parameters"] and info["parameters"].startswith("a square")
    assert json.loads(info["ctrlnet"])["request"]["steps"] == 2
    assert (tmp_path / "out" / "7_control0.png").is_file()


def test_errors_exit_2_with_message(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    rc = main(["generate", "--base", "random:tiny-sd1", "--controlnet", "random:c", "--control", str(tmp_path / "bad.png"),
               "--steps", "1", "--resolution", "64"])
    assert rc == 2
    assert "not a readable image" in capsys.readouterr().err
    rc = main(["generate", "--base", "random:tiny-sd1", "--steps", "0", "--out", str(tmp_path / "new" / "out")])
    assert rc == 2 and "steps=0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a refused run leaves no empty folder behind
    (tmp_path / "file").write_text("x")
    rc = main(["generate", "--base", "random:tiny-sd1", "--out", str(tmp_path / "file" / "out")])
    assert rc == 2 and f"output folder {tmp_path / 'file' / 'out'} cannot be used: {tmp_path / 'file'} is a file" \
        in capsys.readouterr().err


def test_annotate_command(tmp_path):
    img = np.zeros((80, 80, 3), np.uint8)
    cv2.circle(img, (40, 40), 20, (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / "in.png"), img)
    assert main(["annotate", "canny", str(tmp_path / "in.png"), str(tmp_path / "map.png"), "--param", "low_threshold=50"]) == 0
    m = cv2.imread(str(tmp_path / "map.png"))
    assert m.shape == (80, 80, 3) and m.max() == 255


def test_annotate_and_add_control_do_not_replace_files_silently(tmp_path, capsys):
    """`ctrlnet annotate` and `ctrlnet add-control` wrote over an existing output (a hand-edited
    map, a trained ControlNet given as the output by mistake, the input image itself) without a
    word; they now refuse before any work unless --force, and never write over their input."""
    from ctrlnet.checkpoints.convert import base_state_dict, write_single_file
    from ctrlnet.pipeline import random_base

    img = np.zeros((80, 80, 3), np.uint8)
    cv2.circle(img, (40, 40), 20, (255, 255, 255), -1)
    src, out = tmp_path / "in.png", tmp_path / "map.png"
    cv2.imwrite(str(src), img)
    out.write_bytes(b"my edited map")
    capsys.readouterr()
    assert main(["annotate", "canny", str(src), str(out)]) == 2
    assert capsys.readouterr().err == f"ctrlnet annotate: error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == b"my edited map"
    assert main(["annotate", "canny", str(src), str(src), "--force"]) == 2
    assert f"{src} is an input of this command" in capsys.readouterr().err
    assert main(["annotate", "canny", str(src), str(out), "--force"]) == 0
    assert cv2.imread(str(out)).shape == (80, 80, 3)

    tiny = random_base("tiny-sd1")
    base = write_single_file(base_state_dict(tiny), tmp_path / "base.safetensors", tiny.config)
    trained = tmp_path / "trained_cn.safetensors"
    trained.write_bytes(b"weeks of training")
    capsys.readouterr()
    assert main(["add-control", str(base), str(trained)]) == 2
    assert capsys.readouterr().err == f"ctrlnet add-control: error: {trained} exists; pass --force to replace it\n"
    assert trained.read_bytes() == b"weeks of training"
    assert main(["add-control", str(base), str(base), "--force"]) == 2
    assert main(["add-control", str(base), str(trained), "--force"]) == 0
    assert trained.stat().st_size > 1000


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "ctrlnet.interfaces.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "annotate" in r.stdout


def test_every_subcommand_has_help(capsys):
    import pytest

    for cmd in (["generate"], ["annotate"], ["train"], ["data"], ["data", "video-pairs"], ["data", "fill50k"],
                ["add-control"], ["convert"], ["models"], ["ui"], ["serve"], ["colorize"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage: ctrlnet " + " ".join(cmd) in capsys.readouterr().out
