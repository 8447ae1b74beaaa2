"""``generate(..., timings=)``: seconds per stage, and the same image as without it."""

from __future__ import annotations

import numpy as np

from ctrlnet.generation.request import ControlSpec, GenerationRequest
from ctrlnet.generation.run import generate
from ctrlnet.pipeline import load_models


def test_stage_timings_cover_the_run_and_change_nothing():
    models = load_models("random:tiny-sd1", ["random:canny"], device="cpu", dtype="fp32")
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    req = GenerationRequest(prompt="a square", controls=[ControlSpec(image, annotator="canny")], width=64,
                            height=64, steps=3, seed=1)
    timings: dict[str, float] = {}
    with_t = generate(models, req, timings=timings).images[0]
    without = generate(models, req).images[0]
    np.testing.assert_array_equal(with_t, without)
    assert set(timings) == {"hint", "text", "sampling", "decode"}
    assert all(t > 0 for t in timings.values())
