"""Precision, memory layout and offloading on the device under test (``--device``, default cpu).

Reduced precision is fp16 on CUDA/MPS and bf16 on the CPU (the ``half_dtype`` fixture). On the
tiny random models, against fp32 on the same device (bounds: bf16 | fp16; measured on this CPU in bf16):
  one UNet + ControlNet call:  |half - fp32| / |fp32| (RMS) <= 0.15 | 0.03   (bf16: 0.070)
  a 4-step 64x64 image:        mean |half - fp32| <= 8 | 2 of 255           (bf16: 4.3)
  channels-last vs NCHW:       fp32 mean <= 0.05 of 255 (0.004); in half the bounds above
                               (bf16: 4.7, the two layouts round differently: a wrong layout
                               gives tens)
  low-VRAM offloading:         the same image (max 1 of 255; measured 0)
and the VAE where the rest is fp16 runs in fp32, so activations beyond fp16's range (65504)
decode to finite pixels. bf16 has 8 bits of mantissa to fp16's 11, hence its wider bounds; fp16's
are set from that ratio and have never been measured: these tests ran on the CPU only, the CUDA
run is prepared in ``.gpu/device-checks.sh``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlnet.generation.latents import decode_images
from ctrlnet.generation.request import ControlSpec, GenerationRequest
from ctrlnet.generation.run import generate
from ctrlnet.pipeline import load_models

pytestmark = pytest.mark.device

# (bf16, fp16) bounds, see above
CALL_RMS = {torch.bfloat16: 0.15, torch.float16: 0.03}
IMAGE_MEAN = {torch.bfloat16: 8.0, torch.float16: 2.0}


def _hint() -> np.ndarray:
    img = np.zeros((64, 64, 3), np.uint8)
    img[12:52, 20:44] = 255
    return img


def _models(device, dtype, **kw):
    return load_models("random:tiny-sd1", ["random:hint"], device=device, dtype=dtype, **kw)


def _image(models, steps=4) -> np.ndarray:
    req = GenerationRequest(prompt="a tall box", controls=[ControlSpec(_hint())], width=64, height=64,
                            steps=steps, seed=3, guidance_scale=7.5)
    return generate(models, req).images[0].astype(np.float32)


def test_half_unet_controlnet_call_matches_fp32(device, half_dtype):
    ref = _models(device, torch.float32)
    half = _models(device, half_dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    hint = torch.rand(2, 3, 64, 64, generator=g).to(device)
    ctx = torch.randn(2, 77, ref.config.unet.context_dim, generator=g).to(device)
    t = torch.tensor([500, 20], device=device)

    def call(m, dt):
        net = next(iter(m.controlnets.values()))
        with torch.no_grad():
            xs, hs, cs = x.to(dt), hint.to(dt), ctx.to(dt)
            return m.base.unet(xs, t, cs, control=net(xs, hs, t, cs)).float()

    a, b = call(half, half_dtype), call(ref, torch.float32)
    assert torch.isfinite(a).all()
    assert (a - b).norm() <= CALL_RMS[half_dtype] * b.norm()


def test_half_image_matches_fp32(device, half_dtype):
    a = _image(_models(device, half_dtype))
    b = _image(_models(device, torch.float32))
    assert np.abs(a - b).mean() <= IMAGE_MEAN[half_dtype]


@pytest.mark.parametrize("precision", ["fp32", "half"])
def test_channels_last_gives_the_same_image(device, half_dtype, precision):
    dt = torch.float32 if precision == "fp32" else half_dtype
    a = _image(_models(device, dt, channels_last=True))
    b = _image(_models(device, dt, channels_last=False))
    assert np.abs(a - b).mean() <= (0.05 if precision == "fp32" else IMAGE_MEAN[half_dtype])


def test_low_vram_offloading_gives_the_same_image(device, half_dtype):
    low = _models(device, half_dtype, low_vram=True)
    assert next(low.base.unet.parameters()).device.type == "cpu"  # weights wait on the CPU
    a = _image(low)
    b = _image(_models(device, half_dtype))
    assert np.abs(a - b).max() <= 1.0
    assert next(low.base.unet.parameters()).device.type == "cpu"  # and go back after each stage


def test_half_vae_decode_stays_finite_beyond_fp16_range(device, half_dtype):
    models = _models(device, half_dtype)
    vae = models.base.vae
    if half_dtype == torch.float16:
        assert next(vae.parameters()).dtype == torch.float32  # the SD VAE overflows in fp16
    with torch.no_grad():  # activations beyond 65504 inside the decoder (a loud SD VAE's mid-block)
        vae.decoder.conv_in.weight.mul_(10000.0)
        vae.decoder.conv_in.bias.mul_(10000.0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5  # scaled latents
    z[0, :, 0, 0] = 5.0
    with torch.no_grad():
        zz = z.to(device, next(vae.parameters()).dtype) / vae.scale_factor
        inner = vae.decoder.conv_in(vae.post_quant_conv(zz))
    assert inner.float().abs().max() > 65504  # the test reaches beyond fp16's range
    image = decode_images(models, z, as_float=True)[0]  # float, unclipped: a NaN would show
    assert np.isfinite(image).all()
    if device.type == "cuda":  # and the same decoder in fp16 would not have survived
        vae16 = vae.to(torch.float16)
        with torch.no_grad():
            assert not torch.isfinite(vae16.decode(z.to(device, torch.float16))).all()
