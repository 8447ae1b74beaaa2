"""A cancelled run's images so far (``generate(..., keep_partial=True)``): the last step's x0
estimate decoded and finished like a whole answer, as A1111 answers an interrupted request."""

from dataclasses import replace

import numpy as np
import pytest

from ctrlnet.generation.run import GenerationCancelled
from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate, load_models

from test_generation import _picture, _ring, _unit_latents


@pytest.fixture(scope="module")
def models():
    return _unit_latents(load_models("random:tiny-sd1", ["random:a"], device="cpu", dtype="fp32", channels_last=False))


def _req(**kw):
    base = dict(prompt="a red ball", added_prompt="", negative_prompt="", steps=8, guidance_scale=5.0, seed=3,
                sampler="euler", width=64, height=64, controls=[ControlSpec(_ring(64, 64))])
    return GenerationRequest(**{**base, **kw})


def _cancel_after(k):
    """A cancel() that says yes once ``k`` steps are done (it is polled after each step, and once
    before the first)."""
    seen = {"n": 0}

    def progress(done, total):
        seen["n"] = done

    return progress, lambda: seen["n"] >= k


def _stopped(models, req, k):
    progress, cancel = _cancel_after(k)
    with pytest.raises(GenerationCancelled) as e:
        generate(models, req, progress=progress, cancel=cancel, keep_partial=True)
    return e.value.partial


def test_stopping_after_the_last_euler_step_answers_the_whole_image(models):
    # Euler's last step goes to sigma 0: x = denoised exactly, so the partial answer at step N
    # is the finished image (same decode, same maps)
    req = _req()
    whole = generate(models, req)
    part = _stopped(models, req, req.steps)
    assert part.interrupted_at == req.steps and whole.interrupted_at is None
    assert np.abs(part.images[0].astype(int) - whole.images[0]).max() <= 1
    assert np.array_equal(part.control_maps[0], whole.control_maps[0])
    assert part.seeds == whole.seeds and part.request.seed == req.seed


def test_earlier_stops_give_rougher_estimates_of_the_same_image(models):
    req = _req(steps=12)
    whole = generate(models, req).images[0].astype(int)
    errs = [np.abs(_stopped(models, req, k).images[0].astype(int) - whole).mean() for k in (2, 6, 11)]
    assert errs[0] > errs[2] and errs[1] > errs[2]
    assert errs[0] > 1  # a 2-step estimate is visibly not the final image


def test_without_keep_partial_or_before_the_first_step_there_is_nothing(models):
    req = _req()
    progress, cancel = _cancel_after(3)
    with pytest.raises(GenerationCancelled) as e:
        generate(models, req, progress=progress, cancel=cancel)
    assert e.value.partial is None
    with pytest.raises(GenerationCancelled) as e:  # cancelled before sampling starts
        generate(models, req, cancel=lambda: True, keep_partial=True)
    assert e.value.partial is None


def test_an_inpainting_partial_keeps_the_unmasked_pixels(models):
    init = _picture(64, 64, seed=4)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    req = _req(init_image=init, mask=mask, mask_blur=0.0, denoising_strength=0.9, controls=[])
    part = _stopped(models, req, 3)
    out = part.images[0]
    assert out.shape == init.shape
    assert np.array_equal(out[mask == 0], init[mask == 0])
    assert np.abs(out[20:44, 24:40].astype(int) - init[20:44, 24:40]).mean() > 3


def test_a_stop_in_the_hires_pass_answers_at_the_hires_size(models):
    req = _req(steps=4, hires_scale=2.0, hires_steps=3, hires_denoising_strength=0.5)
    low = _stopped(models, req, 2)  # in the first pass
    high = _stopped(models, req, 5)  # in the hires pass (4 + 1)
    assert low.images[0].shape == (64, 64, 3) and low.control_maps[0].shape[:2] == (64, 64)
    assert high.images[0].shape == (128, 128, 3) and high.control_maps[0].shape[:2] == (128, 128)
    assert high.interrupted_at == 5
    whole = generate(models, replace(req)).images[0]
    assert whole.shape == (128, 128, 3)


def test_the_cheap_preview_mixes_channels_with_a1111s_factors():
    import torch

    from ctrlnet.generation.preview import cheap_preview

    z = torch.zeros(3, 4, 2, 5)
    z[0, 0] = 1.0  # channel 0 alone -> A1111's first row (0.298, 0.207, 0.208), then (x + 1) / 2
    z[1, 3] = -1.0  # minus channel 3 -> (0.184, 0.271, 0.473)
    z[2] = 10.0  # clipped to white where the mix is positive
    grid = cheap_preview(z.to(torch.bfloat16))
    assert grid.shape == (4, 10, 3) and grid.dtype == np.uint8  # 3 latents: a 2 x 2 grid, one empty
    want0 = np.round((1 + np.array([0.298, 0.207, 0.208])) / 2 * 255)
    want1 = np.round((1 + np.array([0.184, 0.271, 0.473])) / 2 * 255)
    assert np.abs(grid[0, 0].astype(int) - want0).max() <= 1  # bf16 rounding of the input only
    assert np.abs(grid[0, 5].astype(int) - want1).max() <= 1
    mix = 10 * np.array([0.298 + 0.187 - 0.158 - 0.184, 0.207 + 0.286 + 0.189 - 0.271, 0.208 + 0.173 + 0.264 - 0.473])
    assert np.array_equal(grid[2, 0], np.where(mix > 0, 255, 0))
    assert not grid[2:, 5:].any()
    with pytest.raises(ValueError, match="4, h, w"):
        cheap_preview(torch.zeros(1, 16, 4, 4))


def test_the_preview_hook_sees_every_steps_x0_estimate(models):
    seen = []
    req = _req(num_images=2)
    whole = generate(models, req, preview=lambda x0: seen.append(x0.clone()))
    assert len(seen) == req.steps and all(x.shape == (2, 4, 8, 8) for x in seen)
    # the last estimate of an Euler run is the final latent: decoded, it is the image
    from ctrlnet.generation.latents import decode_images

    assert np.abs(decode_images(models, seen[-1])[1].astype(int) - whole.images[1]).max() <= 1
