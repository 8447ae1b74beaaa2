"""The shipped demo model (src/ctrlnet/assets/demo) loads and follows its control map; once the
model built over the whole CSS vocabulary is shipped, it also draws colours the first model
never learnt (the test reads the vocabulary from the files' ``ctrlnet_defaults``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlnet.pipeline import DEMO_BASE, DEMO_CONTROL, demo_dir

pytestmark = pytest.mark.skipif(not (demo_dir() / DEMO_CONTROL).is_file(), reason="the demo model is not shipped")


def test_demo_model_draws_the_hint_circle(tmp_path):
    from ctrlnet.training.builders import make_fill50k, read_jsonl
    from ctrlnet.training.colors import basic20_pairs
    from ctrlnet.training.fidelity import evaluate, load_pair

    demo_models = load_pair(demo_dir() / DEMO_BASE, demo_dir() / DEMO_CONTROL)
    # the 20 colours every shipped model knows; a seed the recipe's training set never used
    make_fill50k(tmp_path, 6, 128, seed=777, pairs=basic20_pairs())
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


def _shipped_vocabulary() -> str | None:
    from ctrlnet.checkpoints.defaults import read_defaults

    path = demo_dir() / DEMO_CONTROL
    return read_defaults(path).get("vocabulary") if path.is_file() else None


# Prompts with colours outside the first model's 20 (all three pairs are at least Delta E 40 apart).
CSS_PROMPTS = ("yellow circle with green background", "crimson circle with light cyan background",
               "dark violet circle with khaki background")


@pytest.mark.skipif(_shipped_vocabulary() != "css",
                    reason="the shipped fill50k model predates the CSS vocabulary (rebuild: README, recipes)")
def test_demo_model_draws_css_colours_it_is_asked_for(tmp_path):
    """Each prompt at the shipped defaults (128 px, 20 DDIM steps, guidance 5), two seeds: the
    circle lands on the hint and both regions take the named colours.

    Thresholds: the issue's targets for the 50-pair benchmark are colour IoU >= 0.8 and colour
    error <= 20; here each prompt must reach IoU >= 0.7 and errors <= 30 (per prompt and seed,
    a looser bar than the benchmark's mean). Set them from the rebuilt model's measured numbers
    (no looser than half its margin over the targets) when it ships."""
    from ctrlnet.training.builders import draw_fill50k
    from ctrlnet.training.colors import COLORS, color_distance, parse_fill50k_prompt
    from ctrlnet.training.fidelity import circle_score, generate_rows, load_pair

    from ctrlnet.image import save_image

    models = load_pair(demo_dir() / DEMO_BASE, demo_dir() / DEMO_CONTROL)
    rows = []
    for i, prompt in enumerate(CSS_PROMPTS):
        c, b = parse_fill50k_prompt(prompt)
        assert color_distance(COLORS[c], COLORS[b]) >= 40
        circle = (64 + 8 * (i - 1), 60, 30 + 4 * i)
        hint, _ = draw_fill50k(128, circle[:2], circle[2], COLORS[c], COLORS[b])
        save_image(hint, tmp_path / f"h{i}.png")
        rows.append({"source": f"h{i}.png", "prompt": prompt, "circle": list(circle)})
    with torch.inference_mode():
        for seed in (0, 1):
            images = generate_rows(models, rows, tmp_path, 1.0, steps=20, guidance_scale=5.0, seed=seed)
            for img, row in zip(images, rows):
                c, b = parse_fill50k_prompt(row["prompt"])
                s = circle_score(img, row["circle"], COLORS[c], COLORS[b])
                assert s.iou >= 0.7, (row["prompt"], seed, s)
                assert s.circle_error <= 30 and s.background_error <= 30, (row["prompt"], seed, s)
