"""The shipped demo model (src/ctrlnet/assets/demo) loads and follows its control map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlnet.pipeline import DEMO_BASE, DEMO_CONTROL, demo_dir

pytestmark = pytest.mark.skipif(not (demo_dir() / DEMO_CONTROL).is_file(), reason="the demo model is not shipped")


def test_demo_model_draws_the_hint_circle(tmp_path):
    from ctrlnet.training.builders import make_fill50k, read_jsonl
    from ctrlnet.training.fidelity import evaluate, load_pair

    demo_models = load_pair(demo_dir() / DEMO_BASE, demo_dir() / DEMO_CONTROL)
    make_fill50k(tmp_path, 6, 128, seed=777)  # a seed the recipe's training set never used
    rows = read_jsonl(tmp_path / "prompt.json")
    with torch.inference_mode():
        on = evaluate(demo_models, rows, tmp_path, 1.0, steps=12, guidance_scale=5.0)
        off = evaluate(demo_models, rows, tmp_path, 0.0, steps=12, guidance_scale=5.0)
    # with control the circle lands where the hint puts it; without, it is anywhere
    assert on["shape_iou"] > 0.7, on["shape_iou"]
    assert on["shape_iou"] > off["shape_iou"] + 0.25, (on["shape_iou"], off["shape_iou"])
    assert on["color_error"] < 30, on["color_error"]


def test_generate_with_no_model_arguments_uses_the_demo(tmp_path):
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.cli import main

    hint = np.zeros((128, 128, 3), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    ring = np.abs(np.hypot(xx - 64, yy - 64) - 36) < 2
    hint[ring] = 255
    save_image(hint, tmp_path / "hint.png")
    rc = main(["generate", "--control", str(tmp_path / "hint.png"), "--prompt", "gold circle with navy background",
               "--resolution", "128", "--steps", "12", "--seed", "3", "--out", str(tmp_path / "out")])
    assert rc in (0, None)
    img = load_image(tmp_path / "out" / "3_0.png").astype(np.float32)
    inside = np.hypot(xx - 64, yy - 64) < 30
    outside = np.hypot(xx - 64, yy - 64) > 42
    # a gold (255, 215, 0) disc on navy (0, 0, 128): the disc is the brighter, yellower region
    c, b = img[inside].mean(0), img[outside].mean(0)
    assert c[:2].mean() - b[:2].mean() > 60, (c, b)
    assert b[2] - b[0] > 30, b
