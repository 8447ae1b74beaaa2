"""Our UNet and ControlNet against diffusers' implementations, after key conversion."""

import pytest
import torch

from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.config import TINY_SD1, TINY_SD2
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from helpers import randomize_

diffusers = pytest.importorskip("diffusers")

CFGS = {"sd1": TINY_SD1, "sd2": TINY_SD2}


def _inputs(cfg, b=2, hw=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, hw, hw, generator=g)
    t = torch.tensor([3, 781][:b])
    ctx = torch.randn(b, 5, cfg.unet.context_dim, generator=g)
    hint = torch.rand(b, cfg.hint_channels, hw * 8, hw * 8, generator=g)
    return x, t, ctx, hint


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_matches_diffusers(name):
    cfg = CFGS[name]
    ours = randomize_(UNetModel(**cfg.unet.kwargs())).eval()
    params = ours.config_params()
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in du.diffusers_config(params).items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(du.to_diffusers(ours.state_dict(), params), strict=True)
    x, t, ctx, _ = _inputs(cfg)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, t, encoder_hidden_states=ctx).sample
    assert a.abs().mean() > 1e-2  # outputs are non-trivial
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_controlnet_matches_diffusers(name):
    cfg = CFGS[name]
    unet = randomize_(UNetModel(**cfg.unet.kwargs()), seed=1).eval()
    ours = randomize_(ControlNet(**cfg.controlnet.kwargs()), seed=2).eval()
    params = ours.config_params()
    theirs = diffusers.ControlNetModel(**{k: v for k, v in du.diffusers_config(params, "controlnet").items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(du.to_diffusers(ours.state_dict(), params, "controlnet"), strict=True)
    x, t, ctx, hint = _inputs(cfg)
    with torch.no_grad():
        res = ours(x, hint, t, ctx)
        down, mid = theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        assert len(res) == len(down) + 1 == ours.num_control_residuals
        for r, d in zip(res, list(down) + [mid]):
            assert r.shape == d.shape
            assert (r - d).abs().max() <= 1e-4
        # The controlled UNet, fed those residuals, matches diffusers' UNet with the same residuals.
        uparams = unet.config_params()
        dunet = diffusers.UNet2DConditionModel(**{k: v for k, v in du.diffusers_config(uparams).items() if not k.startswith("_")}).eval()
        dunet.load_state_dict(du.to_diffusers(unet.state_dict(), uparams))
        a = unet(x, t, ctx, control=res)
        b = dunet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid).sample
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_key_conversion_round_trips(name):
    cfg = CFGS[name]
    for model, kind in [(UNetModel(**cfg.unet.kwargs()), "unet"), (ControlNet(**cfg.controlnet.kwargs()), "controlnet")]:
        sd = model.state_dict()
        params = model.config_params()
        back = du.from_diffusers(du.to_diffusers(sd, params, kind), params, kind)
        assert back.keys() == sd.keys()
        dcfg = du.diffusers_config(params, kind)
        p2 = du.params_from_diffusers(dcfg, kind)
        rebuilt = (UNetModel if kind == "unet" else ControlNet)(**p2)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_fresh_controlnet_leaves_unet_unchanged():
    cfg = TINY_SD1
    unet = randomize_(UNetModel(**cfg.unet.kwargs()), seed=3).eval()
    cn = ControlNet.from_unet(unet)
    for k, v in cn.state_dict().items():
        if k.startswith(("time_embed", "input_blocks", "middle_block.")):
            assert torch.equal(v, unet.state_dict()[k]), k
    x, t, ctx, hint = _inputs(cfg)
    with torch.no_grad():
        res = cn(x, hint, t, ctx)
        assert all(torch.count_nonzero(r) == 0 for r in res)
        assert torch.equal(unet(x, t, ctx), unet(x, t, ctx, control=res))


def test_full_size_sd15_layout_counts():
    from ctrlnet.config import SD15, SD21

    with torch.device("meta"):
        u = UNetModel(**SD15.unet.kwargs())
        c = ControlNet(**SD15.controlnet.kwargs())
        u2 = UNetModel(**SD21.unet.kwargs())
    assert sum(p.numel() for p in u.parameters()) == 859_520_964
    assert sum(p.numel() for p in c.parameters()) == 361_279_120
    assert sum(p.numel() for p in u2.parameters()) == 865_910_724
    assert c.num_control_residuals == 13
    sd = c.state_dict()
    assert sd["input_hint_block.14.weight"].shape == (320, 256, 3, 3)
    assert sd["zero_convs.11.0.weight"].shape == (1280, 1280, 1, 1)
    assert sd["middle_block_out.0.weight"].shape == (1280, 1280, 1, 1)
    assert u2.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
