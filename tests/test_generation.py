"""Generation workflows: img2img and inpainting against diffusers' pipelines and a transcription of
the v1.1 inpaint app, control and resize modes, sizes, seeds, hires fix and tiles."""

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from ctrlnet.checkpoints.load import BaseModels
from ctrlnet.config import get_preset
from ctrlnet.generation.bundle import Models
from ctrlnet.generation.conditioning import encode_prompts
from ctrlnet.generation.preprocess import fit_map
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL
from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate, load_models
from ctrlnet.sampling.denoiser import ControlInput, Denoiser
from ctrlnet.sampling.schedule import DiscreteSchedule, ddim_sigmas

diffusers = pytest.importorskip("diffusers")
import diffusers_twins as twins  # noqa: E402


def _picture(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (250, 40, 40), -1)
    return img


def _ring(h, w):
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (255, 255, 255), 3)
    return img


def _unit_latents(models):
    """Make a random model behave enough like a trained one for trajectories to be compared:
    - the VAE gets the scale factor that makes its latents unit-variance (SD's 0.18215 does that for
      the real one; a random VAE's latents are ~0.05);
    - the UNet's output layer is scaled by 0.3. A random UNet is not a denoiser: its eps moves by up to
      600x a change of its input, so two correct implementations that differ by 1e-7 in rounding part
      ways within a few img2img steps (measured: 21-84 levels at strengths 0.3-0.6, while every single
      model evaluation agreed to 1e-5). Scaled, both stay within 1 level and the ControlNet still moves
      the image by 3-4 levels on average."""
    vae = models.base.vae
    with torch.no_grad():
        z = vae.encode_latents(torch.from_numpy(_picture(64, 64, 9)).float().div(127.5).sub(1).permute(2, 0, 1)[None])
        vae.scale_factor = float(vae.scale_factor / z.std())
        out = models.base.unet.out[-1]
        out.weight.mul_(0.3)
        out.bias.mul_(0.3)
    return models


@pytest.fixture(scope="module")
def models():
    return _unit_latents(load_models("random:tiny-sd1", ["random:a"], device="cpu", dtype="fp32", channels_last=False))


def _req(**kw):
    base = dict(prompt="a red ball", added_prompt="", negative_prompt="", steps=10, guidance_scale=5.0, seed=3)
    return GenerationRequest(**{**base, **kw})


def _contexts(models, prompt="a red ball"):
    with torch.no_grad():
        return encode_prompts(models, [prompt], [""])


def test_img2img_equals_diffusers_controlnet_img2img_pipeline(models):
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as mod

    init, hint = _picture(seed=1), _ring(64, 64)
    ours = generate(models, _req(init_image=init, denoising_strength=0.6, width=64, height=64,
                                 controls=[ControlSpec(hint)])).images[0]
    pipe = twins.pipeline(diffusers.StableDiffusionControlNetImg2ImgPipeline, models, "a")
    cond, uncond = _contexts(models)
    with twins.posterior_mean(mod):
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=twins.pil(init),
                   control_image=twins.pil(hint), strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(3), output_type="np", eta=0.0,
                   controlnet_conditioning_scale=1.0).images[0]
    theirs = twins.to_uint8(out)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, diff.max()
    # and it really is img2img: closer to the init image than a text-to-image run
    t2i = generate(models, _req(width=64, height=64, controls=[ControlSpec(hint)])).images[0]
    assert np.abs(ours.astype(int) - init).mean() < np.abs(t2i.astype(int) - init).mean()


def test_denoising_strength_ends(models):
    init = _picture(seed=2)
    same = generate(models, _req(init_image=init, denoising_strength=0.0, width=64, height=64))
    assert np.array_equal(same.images[0], init)  # 0 returns the image itself
    full = generate(models, _req(init_image=init, denoising_strength=1.0, width=64, height=64)).images[0]
    t2i = generate(models, _req(width=64, height=64)).images[0]
    assert np.array_equal(full, t2i)  # 1 is text-to-image (the image is not used)


@pytest.fixture(scope="module")
def inpaint_models():
    """A tiny SD1 whose UNet takes 9 channels (latent + mask + masked-image latents), with a
    4-channel ControlNet, as sd-v1-5-inpainting + a v1.1 ControlNet."""
    cfg = get_preset("tiny-sd1")
    cfg = replace(cfg, unet=replace(cfg.unet, in_channels=9))
    torch.manual_seed(0)
    unet = UNetModel(**cfg.unet.kwargs()).eval()
    vae = AutoencoderKL(**cfg.vae.kwargs()).eval()
    text = build_text_encoder(cfg.text, device="cpu").eval()
    g = torch.Generator().manual_seed(1)
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.5 / max(1.0, p[0].numel() ** 0.5), generator=g)
    net = ControlNet(**{**{k: v for k, v in unet._params.items() if k != "out_channels"}, "in_channels": 4}).eval()
    with torch.no_grad():
        for k, p in net.named_parameters():
            if k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.14.")):
                p.normal_(0, 0.05, generator=g)
    base = BaseModels(cfg, unet, vae, text, "random:tiny-sd1-inpaint")
    return _unit_latents(Models(base, {"inp": net}, torch.device("cpu"), torch.float32))


def test_nine_channel_inpainting_equals_diffusers_controlnet_inpaint_pipeline(inpaint_models):
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as mod

    models = inpaint_models
    init, hint = _picture(seed=3), _ring(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    ours = generate(models, _req(init_image=init, mask=mask, mask_blur=0, denoising_strength=1.0, width=64,
                                 height=64, steps=8, controls=[ControlSpec(hint)])).images[0]
    pipe = twins.pipeline(diffusers.StableDiffusionControlNetInpaintPipeline, models, "inp")
    cond, uncond = _contexts(models)
    with twins.posterior_mean(mod):
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=twins.pil(init),
                   mask_image=twins.pil(mask), control_image=twins.pil(hint), strength=1.0, height=64, width=64,
                   num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                   output_type="np", eta=0.0, controlnet_conditioning_scale=1.0).images[0]
    theirs = twins.to_uint8(out)
    m = mask > 127
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff[m].max() <= 1, diff[m].max()  # the repainted region: diffusers' pixels
    assert np.array_equal(ours[~m], init[~m])  # outside: the original (our composite)
    assert np.abs(ours[m].astype(int) - init[m]).mean() > 5


def _transcribed_v11_inpaint(models, init, mask_u8, hint_net, seed, steps, scale, blur, prompt):
    """ControlNet-v1-1-nightly gradio_inpaint.py + cldm/ddim_hacked.py (eta 0), transcribed with the
    raw UNet and ControlNet calls: z-space DDIM, q_sample blend before every step, pixel composite.
    (The app scales pixels by /127 - 1; we encode with /127.5 - 1 like every other encode.)"""
    H, W = init.shape[:2]
    mask_pixel = cv2.GaussianBlur(mask_u8.astype(np.float32) / 255.0, (0, 0), blur)
    mask_latent = cv2.resize(mask_pixel, (W // 8, H // 8), interpolation=cv2.INTER_AREA)
    detected = init.astype(np.float32).copy()
    detected[mask_pixel > 0.5] = -255.0
    control = torch.from_numpy(detected / 255.0).permute(2, 0, 1)[None]
    keep = 1.0 - torch.from_numpy(mask_latent)[None, None]
    vae, unet = models.base.vae, models.base.unet
    with torch.no_grad():
        x0 = vae.encode_latents(torch.from_numpy(init).float().div(127.5).sub(1).permute(2, 0, 1)[None])
        cond, uncond = encode_prompts(models, [prompt], [""])
    sched = DiscreteSchedule(models.config.schedule)
    ac = sched.alphas_cumprod.float()
    ts = [t for t in range(0, 1000, 1000 // steps)]
    ts = [t + 1 for t in ts]
    alphas = [float(ac[t]) for t in ts]
    alphas_prev = [float(ac[0])] + alphas[:-1]
    g = torch.Generator().manual_seed(seed)
    img = torch.randn((1, 4, H // 8, W // 8), generator=g)
    for index in reversed(range(len(ts))):
        t = torch.tensor([ts[index]])
        a_t, a_prev = alphas[index], alphas_prev[index]
        q = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * torch.randn(img.shape, generator=g)
        img = q * keep + (1.0 - keep) * img
        with torch.no_grad():  # cond and uncond in one batch, as we run them (float sums then agree)
            both, ctx, tt = torch.cat([img, img]), torch.cat([cond, uncond]), torch.cat([t, t])
            res = hint_net(both, torch.cat([control, control]), tt, ctx)
            e_c, e_u = unet(both, tt, ctx, control=list(res)).chunk(2)
        e_t = e_u + scale * (e_c - e_u)
        pred_x0 = (img - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        img = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_t
    with torch.no_grad():
        x = vae.decode(img)
    x = (x[0].permute(1, 2, 0) * 127.5 + 127.5).numpy().astype(np.float32)
    x = x * mask_pixel[:, :, None] + init.astype(np.float32) * (1.0 - mask_pixel[:, :, None])
    return x.clip(0, 255).astype(np.uint8)


def test_v11_inpaint_follows_the_original_app(models):
    init = _picture(seed=4)
    mask = np.zeros((64, 64), np.uint8)
    cv2.circle(mask, (36, 28), 14, 255, -1)
    def run(steps):
        return generate(models, _req(init_image=init, mask=mask, mask_blur=2.0, denoising_strength=1.0, steps=steps,
                                     width=64, height=64, sampler="ddim", eta=0.0,
                                     controls=[ControlSpec(annotator="inpaint")]))

    for steps, worst, mean in ((5, 1, 0.01), (10, 4, 0.1)):
        ours = run(steps)
        ref = _transcribed_v11_inpaint(models, init, mask, models.controlnets["a"], 3, steps, 5.0, 2.0, "a red ball")
        diff = np.abs(ours.images[0].astype(int) - ref.astype(int))
        # measured: 5 steps max 1 (mean 0.0035); 10 steps max 4 (mean 0.077) as the random UNet
        # amplifies float rounding over more steps (every step's arithmetic is the same)
        assert diff.max() <= worst and diff.mean() < mean, (steps, diff.max(), diff.mean())
    blurred = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 2.0)
    outside = blurred < 1e-3
    assert np.abs(ours.images[0][outside].astype(int) - init[outside]).max() <= 1
    inside = blurred > 0.99
    assert np.abs(ours.images[0][inside].astype(int) - init[inside]).mean() > 5
    # the inpaint hint: the image, masked pixels at -1 (shown black)
    assert (ours.control_maps[0][inside] == 0).all()


def test_only_masked_inpaints_the_box_at_full_size_and_pastes_it_back(models):
    init = _picture(96, 128, seed=5)
    mask = np.zeros((96, 128), np.uint8)
    mask[40:56, 70:90] = 255
    res = generate(models, _req(init_image=init, mask=mask, mask_blur=1.0, only_masked=True, only_masked_padding=8,
                                width=64, height=64, denoising_strength=0.9, steps=6))
    out = res.images[0]
    assert out.shape == init.shape  # the original size comes back
    box = np.zeros_like(mask, bool)
    box[40 - 8:56 + 8, 70 - 12:90 + 12] = True  # grown to the 1:1 processing aspect
    assert np.array_equal(out[~box], init[~box])
    assert np.abs(out[44:52, 74:86].astype(int) - init[44:52, 74:86]).mean() > 5


class _ConstNet(torch.nn.Module):
    """Residual i is the constant i + 1 (to read scales and halves off the UNet's input)."""

    hint_channels = 3

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, hint, t, context, **_):
        return [torch.full((x.shape[0], 1, 1, 1), float(i + 1)) for i in range(13)]


class _SpyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.seen = None

    def forward(self, x, t, context, control=None, only_mid_control=False):
        self.seen = [c.flatten() for c in control]
        return torch.zeros_like(x)


@pytest.mark.parametrize("mode", ["balanced", "prompt", "controlnet"])
def test_control_modes_scale_residuals_and_route_halves(mode):
    from ctrlnet.generation.request import ControlMode

    spec = ControlSpec(np.zeros((8, 8, 3), np.uint8), strength=0.7, control_mode=mode)
    m = spec.mode()
    unet = _SpyUNet()
    ctl = ControlInput(_ConstNet(), torch.zeros(1, 3, 8, 8), 0.7, soft=m.soft, cond_only=m.cond_only)
    ctx = torch.zeros(1, 1, 4)
    den = Denoiser(unet, DiscreteSchedule(), ctx, ctx, guidance_scale=5.0, controls=[ctl])
    den(torch.zeros(1, 4, 1, 1), torch.tensor([1.0]))
    decay = [0.825 ** (12 - i) for i in range(13)] if mode != "balanced" else [1.0] * 13
    for i, r in enumerate(unet.seen):  # (cond, uncond)
        want = 0.7 * decay[i] * (i + 1)
        assert r[0].item() == pytest.approx(want, rel=1e-6)
        assert r[1].item() == pytest.approx(0.0 if mode == "controlnet" else want, rel=1e-6)
    assert ControlSpec(guess_mode=True).mode() is ControlMode.CONTROLNET  # guess mode: an alias


def _aspect_of_ring(cmap):
    ys, xs = np.nonzero(cmap[:, :, 0] > 127)
    return (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)


@pytest.mark.parametrize("mode,round_", [("crop_and_resize", True), ("resize_and_fill", True), ("just_resize", False)])
def test_a_round_ring_in_a_4_3_map_stays_round_in_a_square_output(models, mode, round_):
    ring = _ring(192, 256)  # 4:3, ring well inside
    res = generate(models, _req(width=128, height=128, steps=1, controls=[ControlSpec(ring, resize_mode=mode)]))
    ratio = _aspect_of_ring(res.control_maps[0])
    assert res.control_maps[0].shape[:2] == (128, 128)
    if round_:
        assert abs(ratio - 1) <= 0.02, ratio
    else:
        assert ratio > 1.2  # stretched 4:3 -> 1:1 makes it tall


def test_fill_pads_with_the_border_colour_and_keeps_the_dtype():
    m = np.full((30, 60, 3), 20, np.uint8)
    out = fit_map(m, (60, 60), "resize_and_fill")
    assert out.dtype == np.uint8 and out.shape == (60, 60, 3) and (out == 20).all()


def test_every_unit_is_fitted_to_the_explicit_size(models):
    wide, tall = _ring(64, 256), _ring(256, 64)
    res = generate(models, _req(width=96, height=64, steps=1, controls=[ControlSpec(wide), ControlSpec(tall)]))
    assert res.images[0].shape == (64, 96, 3)
    assert [m.shape[:2] for m in res.control_maps] == [(64, 96), (64, 96)]


def test_pixel_perfect_resolution_follows_the_output():
    from ctrlnet.generation.preprocess import pixel_perfect_resolution
    from ctrlnet.generation.request import ResizeMode

    assert pixel_perfect_resolution((300, 400), (600, 600), ResizeMode.CROP_AND_RESIZE) == 600
    assert pixel_perfect_resolution((300, 400), (600, 600), ResizeMode.RESIZE_AND_FILL) == 450


def test_the_size_bound_refuses_before_any_work(models):
    long_thin = np.zeros((64, 2048, 3), np.uint8)
    with pytest.raises(ValueError, match="max_pixels"):
        generate(models, _req(resolution=1024, controls=[ControlSpec(long_thin)]))
    with pytest.raises(ValueError, match="max_pixels"):
        generate(models, _req(width=1024, height=1024, hires_scale=4))
    with pytest.raises(ValueError, match="multiple of 8"):
        generate(models, _req(width=100, height=64))


def test_legacy_size_is_unchanged_without_width_and_height(models):
    res = generate(models, _req(resolution=64, steps=1, controls=[ControlSpec(_ring(90, 135))]))
    assert res.images[0].shape == (64, 128, 3)  # short side 64, 1.5 * 64 = 96 rounded to 64 as the original


def test_image_k_of_a_batch_is_seed_plus_k_alone(models):
    from ctrlnet.generation.latents import ImageNoise

    batch = ImageNoise([7, 8, 9])(torch.empty(3, 4, 8, 8))
    for k in range(3):
        assert torch.equal(batch[k], ImageNoise([7 + k])(torch.empty(1, 4, 8, 8))[0])
    req = _req(width=64, height=64, steps=4, controls=[ControlSpec(_ring(64, 64))])
    four = generate(models, replace(req, num_images=4, seed=7))
    assert four.seeds == [7, 8, 9, 10]
    for k in (0, 3):
        alone = generate(models, replace(req, num_images=1, seed=7 + k)).images[0]
        # the same noise; only the UNet's batch size differs, which moves float sums by ~5e-6
        assert np.abs(four.images[k].astype(int) - alone).max() <= 2


def test_euler_a_is_ancestral_and_reproducible(models):
    req = _req(width=64, height=64, steps=4, sampler="euler_a")
    a, b = generate(models, req).images[0], generate(models, req).images[0]
    e = generate(models, replace(req, sampler="euler")).images[0]
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - e).mean() > 1


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_upscales_and_refits_every_unit(models, upscaler):
    import torch.nn.functional as F

    from ctrlnet.generation.latents import decode_images, encode_images

    req = _req(width=64, height=64, steps=4, hires_scale=2.0, hires_steps=3, hires_denoising_strength=0.5,
               hires_upscaler=upscaler, controls=[ControlSpec(_ring(48, 64))])
    res = generate(models, req)
    assert res.images[0].shape == (128, 128, 3)
    assert res.control_maps[0].shape[:2] == (128, 128)
    # with hires strength 0 the output is the first pass, upscaled as A1111 does
    low = generate(models, replace(req, hires_scale=1.0))
    zero = generate(models, replace(req, hires_denoising_strength=0.0)).images[0]
    captured = {}
    real = decode_images

    import ctrlnet.generation.run as run

    def spy(m, latents, tile_px=None, **kw):
        captured["z"] = latents.clone()
        return real(m, latents, tile_px, **kw)

    run.decode_images = spy
    try:
        generate(models, replace(req, hires_scale=1.0))
    finally:
        run.decode_images = real
    z = captured["z"]
    if upscaler == "latent":
        want = decode_images(models, F.interpolate(z, size=(16, 16), mode="bilinear", antialias=False))[0]
    else:
        big = cv2.resize(low.images[0], (128, 128), interpolation=cv2.INTER_LANCZOS4)
        want = decode_images(models, encode_images(models, [big]))[0]
    assert np.abs(zero.astype(int) - want).max() <= 1
    assert np.abs(res.images[0].astype(int) - zero).mean() > 1  # strength 0.5 does change it
    # the record says what A1111 says: Size is the first pass, the upscale is separate, so reading
    # it back (PNG info -> txt2img) asks for the same 128 px picture, not a 256 px one
    from ctrlnet.generation.infotext import parse_parameters

    text = res.parameters_text()
    assert "Size: 64x64" in text and "Hires upscale: 2.0" in text
    # a unit that named no ControlNet is recorded with the one it used (the first loaded), not "default"
    assert req.controls[0].model is None and res.request.controls[0].model == next(iter(models.controlnets))
    assert f"Model: {next(iter(models.controlnets))}, Weight" in text
    fields, _ = parse_parameters(text)
    assert (fields["width"], fields["height"], fields["hires_scale"]) == (64, 64, 2.0)


def test_hr_option_puts_a_unit_in_one_pass_of_the_hires_fix(models, monkeypatch):
    import ctrlnet.generation.run as run

    ring = ControlSpec(_ring(48, 64))
    req = _req(width=64, height=64, steps=4, hires_scale=2.0, hires_steps=6, hires_denoising_strength=0.9)
    out = {}
    for opt in ("both", "low_res_only", "high_res_only", None):
        units = [] if opt is None else [replace(ring, hr_option=opt)]
        # strength 0: the output is the first pass, upscaled (the hires pass changes nothing)
        out[opt, 0] = generate(models, replace(req, controls=units, hires_denoising_strength=0.0)).images[0]
        out[opt] = generate(models, replace(req, controls=units))
    assert np.array_equal(out["low_res_only", 0], out["both", 0])  # the first pass has the unit
    assert np.array_equal(out["high_res_only", 0], out[None, 0])  # the first pass has none
    assert _mean_diff(out["both", 0], out[None, 0]) > 1  # (the unit does change a pass)
    assert _mean_diff(out["low_res_only"].images[0], out["both"].images[0]) > 1  # measured 2.1
    assert _mean_diff(out["high_res_only"].images[0], out[None].images[0]) > 1  # measured 2.1
    # which pass builds a ControlNet input for the unit (every pass still shows its map)
    seen = []
    real = run.control_input
    monkeypatch.setattr(run, "control_input", lambda m, net, spec, cmap, *a: seen.append(cmap.shape[:2]) or
                        real(m, net, spec, cmap, *a))
    for opt, want in (("both", [(64, 64), (128, 128)]), ("low_res_only", [(64, 64)]),
                      ("high_res_only", [(128, 128)])):
        seen.clear()
        res = generate(models, replace(req, steps=1, hires_steps=1, hires_denoising_strength=1.0,
                                       controls=[replace(ring, hr_option=opt)]))
        assert seen == want, opt
        assert res.control_maps[0].shape[:2] == (128, 128)
        assert f"Hr Option: {dict(both='Both', low_res_only='Low res only', high_res_only='High res only')[opt]}" \
            in res.parameters_text()
    with pytest.raises(ValueError, match="hr_option='low'.*low_res_only"):
        ControlSpec(hr_option="low")


def _mean_diff(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_tiled_denoiser_equals_the_whole_for_a_local_model():
    from ctrlnet.sampling.denoiser import TiledDenoiser

    class Local(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, context, control=None, only_mid_control=False):
            return x * 0.5 + control[0].mean(dim=1, keepdim=True)

    class HintNet(torch.nn.Module):
        hint_channels = 3

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, hint, t, context, **_):
            return [torch.nn.functional.avg_pool2d(hint, 8)] * 13  # a local function of the hint

    hint = torch.rand(1, 3, 8 * 40, 8 * 24)
    ctx = torch.zeros(1, 1, 4)
    den = Denoiser(Local(), DiscreteSchedule(), ctx, controls=[ControlInput(HintNet(), hint)])
    x, s = torch.randn(1, 4, 40, 24), torch.tensor([2.0], dtype=torch.float64)
    whole = den(x, s)
    tiled = TiledDenoiser(den, 16, 4)(x, s)
    assert torch.allclose(whole, tiled, atol=1e-6)


def test_tiled_upscale_runs_tile_by_tile(models):
    calls = []
    unet = models.base.unet
    hook = unet.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape[-2:])))
    try:
        res = generate(models, _req(init_image=_picture(64, 64), width=64, height=64, denoising_strength=0.4,
                                    steps=4, hires_scale=2.0, hires_steps=2, tile_size=64, tile_overlap=16))
    finally:
        hook.remove()
    assert res.images[0].shape == (128, 128, 3)
    assert max(calls) == (8, 8) and (16, 16) not in calls  # the 128 px pass ran in 64 px tiles


def test_ddim_sigmas_used_by_img2img_are_the_tail_of_the_schedule(models):
    from ctrlnet.generation.plan import make_plan

    plan = make_plan(models, _req(init_image=_picture(), width=64, height=64, steps=10, denoising_strength=0.6))
    full = ddim_sigmas(models.schedule, 10)
    assert torch.equal(plan.sigmas(False, models.schedule), full[4:])


def test_resolution_is_checked_only_where_it_sizes_a_side():
    """An explicit width and height make ``resolution`` unused, so its bound must not refuse them."""
    GenerationRequest(width=128, height=96, resolution=4096).validate(max_resolution=1024)
    with pytest.raises(ValueError, match="resolution"):
        GenerationRequest(width=128, resolution=4096).validate(max_resolution=1024)
