"""The reference colorization ControlNet: zero-start exactness, key layout, packed hints, the
Denoiser's latent_cond, file round trip, and the pipeline's additive options it relies on."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import randomize_

from ctrlnet.colorize.reference_model import (
    FIRST_CONV,
    ReferenceControlNet,
    load_reference_controlnet,
    load_reference_vae,
    pack_hint,
    save_reference_controlnet,
    unpack_hint,
)
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.pipeline import ControlSpec, GenerationRequest, encode_prompts, generate, load_models, random_base
from ctrlnet.sampling.denoiser import ControlInput, Denoiser


@pytest.fixture(scope="module")
def base():
    return random_base("tiny-sd1", seed=3)


def inputs(b=2, h=8, w=8, ctx_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    hint = torch.rand(b, 3, 8 * h, 8 * w, generator=g)
    ref = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([10, 500][:b])
    ctx = torch.randn(b, 77, ctx_dim, generator=g)
    return x, hint, ref, t, ctx


def test_fresh_model_leaves_unet_output_unchanged_exactly(base):
    net = ReferenceControlNet.from_unet(base.unet)
    x, hint, ref, t, ctx = inputs()
    with torch.no_grad():
        plain = base.unet(x, t, ctx)
        res = net(x, hint, t, ctx, latent_cond=ref)
        controlled = base.unet(x, t, ctx, control=res)
    assert len(res) == net.num_control_residuals
    assert all(float(r.abs().max()) == 0.0 for r in res)
    assert torch.equal(plain, controlled)
    # the new reference weights are zero and the latent weights are the UNet's
    w = net.state_dict()[FIRST_CONV]
    assert w.shape[1] == 8 and float(w[:, 4:].abs().max()) == 0.0
    assert torch.equal(w[:, :4], base.unet.state_dict()[FIRST_CONV])


def test_zero_reference_weights_equal_a_plain_controlnet_and_keys_keep_layout(base):
    net = randomize_(ReferenceControlNet.from_unet(base.unet), seed=1)
    with torch.no_grad():
        net.input_blocks[0][0].weight[:, 4:] = 0
    plain = ControlNet.from_unet(base.unet)
    sd = net.state_dict()
    assert set(sd) == set(plain.state_dict())
    differing = [k for k, v in plain.state_dict().items() if v.shape != sd[k].shape]
    assert differing == [FIRST_CONV]
    plain.load_state_dict({k: (v[:, :4] if k == FIRST_CONV else v) for k, v in sd.items()})
    x, hint, ref, t, ctx = inputs(seed=2)
    with torch.no_grad():
        a = net(x, hint, t, ctx, latent_cond=ref)
        b = plain(x, hint, t, ctx)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert any(float(r.abs().max()) > 0 for r in a)
    # with reference weights the reference changes the residuals
    with torch.no_grad():
        net.input_blocks[0][0].weight[:, 4:].normal_(0, 0.1)
        c = net(x, hint, t, ctx, latent_cond=ref)
        d = net(x, hint, t, ctx, latent_cond=-ref)
    assert not torch.allclose(c[0], d[0])


def test_packed_hint_equals_latent_cond(base):
    net = randomize_(ReferenceControlNet.from_unet(base.unet), seed=4)
    x, hint, ref, t, ctx = inputs(seed=5)
    packed = pack_hint(hint, ref)
    assert packed.shape == (2, 7, 64, 64)
    h2, r2 = unpack_hint(packed, 3, 8)
    assert torch.equal(h2, hint) and torch.equal(r2, ref)
    with torch.no_grad():
        a = net(x, hint, t, ctx, latent_cond=ref)
        b = net(x, packed, t, ctx)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="latent_cond or a packed hint"):
        net(x, hint, t, ctx)


def test_denoiser_threads_latent_cond_through_both_branches(base):
    from ctrlnet.sampling.schedule import DiscreteSchedule

    net = randomize_(ReferenceControlNet.from_unet(base.unet), seed=6).eval()
    x, hint, ref, _, ctx = inputs(b=1, seed=7)
    uncond = torch.zeros_like(ctx)
    sched = DiscreteSchedule(base.config.schedule)
    sigma = torch.tensor([3.0])
    den = Denoiser(base.unet, sched, ctx, uncond, 5.0, [ControlInput(net, hint, latent_cond=ref)])
    out = den(x, sigma)
    # by hand: one batch [cond | uncond], the reference latent on both halves
    from ctrlnet.sampling.schedule import vp_scale

    s = vp_scale(sigma.double()).float()[:, None, None, None]
    z = torch.cat([x * s] * 2)
    t = sched.sigma_to_t(sigma.double()).repeat(2)
    c2 = torch.cat([ctx, uncond])
    with torch.no_grad():
        res = net(z, torch.cat([hint] * 2), t, c2, latent_cond=torch.cat([ref] * 2))
        eps = base.unet(z, t, c2, control=res)
    e_c, e_u = eps.chunk(2)
    want = x - 3.0 * (e_u + 5.0 * (e_c - e_u))
    assert torch.allclose(out, want, atol=1e-5)
    other = Denoiser(base.unet, sched, ctx, uncond, 5.0, [ControlInput(net, hint, latent_cond=-ref)])(x, sigma)
    assert not torch.allclose(out, other, atol=1e-4)


def test_file_round_trip_and_plain_controlnet_refused(base, tmp_path):
    net = randomize_(ReferenceControlNet.from_unet(base.unet), seed=8)
    path = save_reference_controlnet(net, tmp_path / "c.safetensors", base.config)
    back = load_reference_controlnet(path)
    assert back.ref_channels == 4 and back.hint_channels == 3
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in net.state_dict().items())
    from ctrlnet.checkpoints.save import save_model_file

    plain = save_model_file(tmp_path / "p.safetensors", {"control_model.": ControlNet.from_unet(base.unet).state_dict()},
                            base.config)
    with pytest.raises(ValueError, match="plain ControlNet"):
        load_reference_controlnet(plain)


def test_colorizer_file_carries_its_autoencoder_and_add_colorizer_installs_it(base, tmp_path):
    from ctrlnet.colorize.reference import COLORIZER, add_colorizer
    from ctrlnet.models.vae import AutoencoderKL

    net = randomize_(ReferenceControlNet.from_unet(base.unet), seed=8)
    plain = save_reference_controlnet(net, tmp_path / "plain.safetensors", base.config)
    assert load_reference_vae(plain, base.config) is None  # a file without one uses the base's
    vae = randomize_(AutoencoderKL(**base.config.vae.kwargs()), seed=9)
    path = save_reference_controlnet(net, tmp_path / "c.safetensors", base.config, vae=vae)
    back = load_reference_vae(path, base.config)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in vae.state_dict().items())
    assert back.scale_factor == base.config.vae.scale_factor

    models = load_models("random:tiny-sd1", controlnets={}, device="cpu", dtype="fp32")
    old = models.base.vae
    before = {k: v.clone() for k, v in old.state_dict().items()}
    add_colorizer(models, plain)
    assert models.base.vae is old
    add_colorizer(models, path)
    assert models.base.vae is not old and COLORIZER in models.controlnets
    assert all(torch.equal(v, models.base.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in before.items())  # the base's VAE untouched
    # an autoencoder of another architecture is refused by name
    other = base.config.with_(vae=replace(base.config.vae, ch=base.config.vae.ch * 2))
    bad = save_reference_controlnet(net, tmp_path / "bad.safetensors", base.config,
                                    vae=AutoencoderKL(**other.vae.kwargs()))
    with pytest.raises(ValueError, match="autoencoder does not fit"):
        load_reference_vae(bad, base.config)


def test_pipeline_prompt_chunks_and_reference_spec(tmp_path):
    models = load_models("random:tiny-sd1", {}, device="cpu", dtype="fp32")
    cond, uncond = encode_prompts(models, ["a cat"], [""], clip_skip=2, min_chunks=3)
    assert cond.shape[1] == uncond.shape[1] == 231
    one, _ = encode_prompts(models, ["a cat"], [""], clip_skip=2)
    assert one.shape[1] == 77
    assert torch.equal(cond[:, :77], one)  # the first window is the short prompt's encoding
    with pytest.raises(ValueError, match="prompt_chunks"):
        GenerationRequest(prompt_chunks=4).validate()

    from ctrlnet.colorize.reference import COLORIZER, random_colorizer

    models.controlnets[COLORIZER] = random_colorizer(models)
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    blue = red[..., ::-1].copy()
    req = GenerationRequest(controls=[ControlSpec(gray, model=COLORIZER, reference=red)], resolution=64,
                            steps=2, guidance_scale=1.0, seed=1)
    a = generate(models, req)
    b = generate(models, GenerationRequest(**{**req.__dict__, "controls": [
        ControlSpec(gray, model=COLORIZER, reference=blue)]}))
    assert not np.array_equal(a.images[0], b.images[0])  # the reference reaches the net
    json.dumps(a.request.to_dict())  # the reference image stays out of the metadata
    assert "reference" not in a.request.to_dict()["controls"][0]


def test_lineart_colorization_end_to_end(tmp_path, monkeypatch):
    import argparse

    import cv2

    import ctrlnet.generation.run as pipeline
    from ctrlnet.colorize.lineart import colorize_lineart
    from ctrlnet.interfaces.colorize_cli import add_colorize_parser

    models = load_models("random:tiny-sd1", ["random:lineart_anime"], device="cpu", dtype="fp32")
    seen = []
    real = pipeline.Denoiser

    def spy(unet, schedule, cond, uncond, *a, **k):
        seen.append((cond.shape, a[1][0].cond_only and a[1][0].soft if len(a) > 1 else None))
        return real(unet, schedule, cond, uncond, *a, **k)

    monkeypatch.setattr(pipeline, "Denoiser", spy)
    drawing = np.full((64, 64, 3), 255, np.uint8)
    cv2.circle(drawing, (32, 32), 20, (0, 0, 0), 2)
    res = colorize_lineart(models, drawing, "", resolution=64, steps=1, seed=0)
    assert seen[-1] == ((1, 231, 32), True)  # anime name: three 75-token windows; no prompt: guess mode
    cmap = res.control_maps[0]
    assert (cmap[drawing == 0] == 255).all() and (cmap[drawing == 255] == 0).all()  # white lines on black
    res = colorize_lineart(models, drawing, "a red ball", anime=False, resolution=64, steps=1, seed=0)
    assert seen[-1] == ((1, 77, 32), False)
    assert res.images[0].shape == (64, 64, 3)

    parser = argparse.ArgumentParser()
    add_colorize_parser(parser.add_subparsers())
    from ctrlnet.image import save_image

    src = save_image(drawing, tmp_path / "d.png")
    args = parser.parse_args(["colorize", "lineart", str(src), "--base", "random:tiny-sd1", "--controlnet",
                              "random:lineart_anime", "--resolution", "64", "--steps", "1", "--seed", "2",
                              "--out", str(tmp_path / "out"), "--save-map", "--device", "cpu"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d-lineart-2-0.png", "d-lineart-map.png"]
    assert seen[-1] == ((1, 231, 32), True)  # the CLI picks the anime settings from the name
    first = (tmp_path / "out" / "d-lineart-2-0.png").read_bytes()
    args.prompt = "a blue ball"  # a rerun with the same seed adds files, as `generate` does; it replaced them
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "d-lineart-2-0-1.png", "d-lineart-2-0.png", "d-lineart-map-1.png", "d-lineart-map.png"]
    assert (tmp_path / "out" / "d-lineart-2-0.png").read_bytes() == first
