"""AutoencoderKL: original key names, shapes, latent convention, diffusers parity, key maps, tiling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ctrlnet.checkpoints.diffusers_vae import diffusers_vae_config, vae_from_diffusers, vae_to_diffusers
from ctrlnet.config import SD15, TINY_SD1, VAEConfig
from ctrlnet.models.vae import HARMLESS_PREFIXES, AutoencoderKL, DiagonalGaussian, tiled_apply

diffusers = pytest.importorskip("diffusers")

# TINY_SD1.vae has ch=16, which GroupNorm(32) cannot split; the same layout at ch=32.
TINY = replace(TINY_SD1.vae, ch=32, resolution=64)
# Attention inside the 16px level of both encoder and decoder (resolution 32: levels 32, 16, 8).
TINY_ATTN = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)


def randomized(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Our VAE with every parameter random (GroupNorm affines too), in eval mode."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**cfg.kwargs()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def diffusers_twin(model: AutoencoderKL, cfg: VAEConfig):
    ref = diffusers.AutoencoderKL(**diffusers_vae_config(cfg)).eval()
    missing, unexpected = ref.load_state_dict(vae_to_diffusers(model.state_dict()), strict=True)
    assert not missing and not unexpected
    return ref


def test_state_dict_keys_are_the_original_names():
    with torch.device("meta"):
        sd = AutoencoderKL(**SD15.vae.kwargs()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # The SD1.x/2.x VAE: 248 tensors under first_stage_model.
    assert len(shapes) == 248
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.0.downsample.conv.weight"] == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.bias"] == (512,)
    assert shapes["encoder.mid.block_2.norm2.weight"] == (512,)
    assert shapes["encoder.norm_out.weight"] == (512,)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 4, 3, 3)
    # up.{i} is indexed by resolution level: up.0 is full size, up.3 the 1/8 level.
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert not any(k.startswith(HARMLESS_PREFIXES) for k in shapes)


def test_full_size_key_map_matches_diffusers_layout():
    with torch.device("meta"):
        ours = AutoencoderKL(**SD15.vae.kwargs()).state_dict()
        ref = diffusers.AutoencoderKL(**diffusers_vae_config(SD15.vae)).state_dict()
    conv = vae_to_diffusers(ours)
    assert {k: tuple(v.shape) for k, v in conv.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in conv  # from decoder.up.3.upsample
    assert tuple(conv["encoder.mid_block.attentions.0.to_q.weight"].shape) == (512, 512)


def test_groupnorm_channel_check_names_the_problem():
    with pytest.raises(ValueError, match=r"divisible by 32.*ch=16.*\[16\]"):
        AutoencoderKL(**VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1).kwargs())


def test_shapes_and_latent_convention():
    model = randomized(TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = model.encode(x)
        assert isinstance(post, DiagonalGaussian)
        assert post.mean.shape == post.logvar.shape == (2, 4, 8, 8)
        assert model.downscale == 8
        z = model.encode_latents(x)
        torch.testing.assert_close(z, post.mean * TINY.scale_factor, rtol=0, atol=0)
        # decode divides by the scale factor: decode(z * s) is the original decoder on z.
        img = model.decode(z)
        assert img.shape == (2, 3, 64, 64)
        ref = model.decoder(model.post_quant_conv(post.mean))
        torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-5)
        # sampling: reproducible with a generator, and mean + std * N(0, 1)
        g = torch.Generator().manual_seed(7)
        s1 = model.encode_latents(x, generator=g, sample=True)
        s2 = model.encode_latents(x, generator=torch.Generator().manual_seed(7), sample=True)
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(s1, (post.mean + post.std * eps) * TINY.scale_factor)
        assert not torch.equal(s1, z)


def test_logvar_is_clamped_like_the_original():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    moments[:, 4:, 0, 0] = -100.0
    post = DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0 and post.logvar.min().item() == -30.0
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    kl = DiagonalGaussian(torch.zeros(3, 8, 2, 2)).kl()  # N(0, I) against itself
    torch.testing.assert_close(kl, torch.zeros(3))


@pytest.mark.parametrize("cfg,size", [(TINY, 64), (TINY_ATTN, 32)], ids=["tiny", "tiny-attn"])
def test_parity_with_diffusers(cfg, size):
    model = randomized(cfg, seed=1)
    ref = diffusers_twin(model, cfg)
    torch.manual_seed(2)
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        post, ref_post = model.encode(x), ref.encode(x).latent_dist
        assert (post.mean - ref_post.mean).abs().max().item() <= 1e-4
        assert (post.logvar - ref_post.logvar).abs().max().item() <= 1e-4
        assert post.mean.abs().max().item() > 1e-2  # not a degenerate all-zero comparison
        z = torch.randn(2, cfg.embed_dim, size // model.downscale, size // model.downscale)
        out, ref_out = model.decode(z * cfg.scale_factor), ref.decode(z).sample
        assert out.shape == ref_out.shape == (2, 3, size, size)
        assert (out - ref_out).abs().max().item() <= 1e-4
        assert out.std().item() > 1e-2


def test_key_map_round_trips():
    sd = randomized(TINY_ATTN).state_dict()
    back = vae_from_diffusers(vae_to_diffusers(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    ref = diffusers.AutoencoderKL(**diffusers_vae_config(TINY_ATTN)).state_dict()
    again = vae_to_diffusers(vae_from_diffusers(ref))
    assert again.keys() == ref.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_old_diffusers_attention_names_and_4d_weights():
    sd = randomized(TINY_ATTN).state_dict()
    new = vae_to_diffusers(sd)
    rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in rename.items():
            k = k.replace(f".{a}.", f".{b}.")
        old[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    assert "encoder.down_blocks.1.attentions.0.query.bias" in old
    back = vae_from_diffusers(old)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # some converted files keep the attention projections as 1x1 conv weights
    conv4d = {k: (v[:, :, None, None] if v.ndim == 2 else v) for k, v in new.items()}
    back = vae_from_diffusers(conv4d)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_key_map_refuses_unknown_keys():
    sd = vae_to_diffusers(randomized(TINY).state_dict())
    sd["encoder.mid_block.attentions.0.rotary.weight"] = torch.zeros(1)
    msg = r"1 VAE keys have no mapping: encoder\.mid_block\.attentions\.0\.rotary"
    with pytest.raises(ValueError, match=msg):
        vae_from_diffusers(sd)


def test_tiled_blend_is_exact_for_local_ops():
    # For a purely local operation the normalised cross-fade must reproduce it exactly.
    x = torch.randn(1, 2, 22, 37)

    def up8(t):
        return F.interpolate(t, scale_factor=8.0, mode="nearest") * 2 + 1

    def down8(t):
        return F.avg_pool2d(t, 8)

    torch.testing.assert_close(tiled_apply(up8, x, tile=8, overlap=3, unit_in=1, unit_out=8), up8(x))
    torch.testing.assert_close(tiled_apply(up8, x, tile=10, overlap=0, unit_in=1, unit_out=8), up8(x))
    img = torch.randn(1, 3, 8 * 13, 8 * 9)
    tiled = tiled_apply(down8, img, tile=4, overlap=1, unit_in=8, unit_out=1)
    torch.testing.assert_close(tiled, down8(img))
    with pytest.raises(ValueError, match="overlap < tile"):
        tiled_apply(up8, x, tile=4, overlap=4, unit_in=1, unit_out=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        tiled_apply(down8, torch.zeros(1, 3, 20, 16), tile=2, overlap=0, unit_in=8, unit_out=1)


def test_tiled_decode_and_encode_approach_untiled():
    # A random network is far less local than a trained VAE (GroupNorm statistics and receptive
    # fields span the whole latent), so tiles change the output; we check the plumbing exactly
    # and that the error shrinks well below an unrelated input's as tiles grow.
    cfg = replace(TINY, ch_mult=(1, 2, 2), resolution=32)  # downscale 4: a cheaper decoder
    model = randomized(cfg, seed=3)
    torch.manual_seed(4)
    z = torch.randn(1, 4, 16, 16) * cfg.scale_factor
    x = torch.rand(1, 3, 64, 64) * 2 - 1

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    with torch.no_grad():
        full = model.decode(z)
        assert torch.equal(model.decode(z, tile=16), full)  # one tile covers everything
        t8, t12 = model.decode(z, tile=8, overlap=4), model.decode(z, tile=12, overlap=4)
        assert t12.shape == full.shape
        # 12-cell tiles start at 0 and 4: the first 4x4 cells come from the first tile alone
        alone = model.decode(z[..., :12, :12])
        torch.testing.assert_close(t12[..., :16, :16], alone[..., :16, :16], rtol=1e-5, atol=1e-5)
        baseline = rel(model.decode(torch.randn_like(z)), full)  # about 1.3
        assert rel(t12, full) < 0.6 * rel(t8, full)  # measured 0.23 vs 0.56
        assert rel(t12, full) < 0.25 * baseline

        enc = model.encode(x).mean
        e8 = model.encode(x, tile=8, overlap=4).mean
        e12 = model.encode(x, tile=12, overlap=4).mean
        assert e12.shape == enc.shape == (1, 4, 16, 16)
        baseline = rel(model.encode(torch.rand_like(x) * 2 - 1).mean, enc)  # about 1.1
        assert rel(e12, enc) < 0.6 * rel(e8, enc)  # measured 0.18 vs 0.36
        assert rel(e12, enc) < 0.25 * baseline
