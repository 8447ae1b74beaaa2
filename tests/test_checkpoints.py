"""Every checkpoint layout round-trips; bad files fail with clear errors and never run code."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base, save_diffusers_controlnet
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.checkpoints.load import BaseModels, load_base, load_controlnet
from ctrlnet.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.text_encoder import build_text_encoder
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL
from helpers import randomize_

# Tiny configs whose head counts follow the SD families, so files without stored config load.
SD1_LIKE = ModelConfig(
    name="t1",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                    num_heads=8, context_dim=768),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    text=TextEncoderConfig(width=768, layers=1, heads=12, mlp_ratio=1),
)
SD2_LIKE = ModelConfig(
    name="t2",
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                    num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    text=TextEncoderConfig(kind="openclip", width=1024, layers=2, heads=16, mlp_ratio=1, act="gelu",
                           layer="penultimate", projection_dim=1024),
)


def make_base(cfg, seed=0) -> BaseModels:
    unet = randomize_(UNetModel(**cfg.unet.kwargs()), seed).eval()
    vae = randomize_(AutoencoderKL(**cfg.vae.kwargs()), seed + 1).eval()
    text = randomize_(build_text_encoder(cfg.text, device="cpu"), seed + 2, scale=0.05).eval()
    return BaseModels(cfg, unet, vae, text)


def original_layout(base: BaseModels, control: ControlNet | None = None) -> dict:
    t_prefix = "cond_stage_model.transformer." if base.config.text.kind == "clip" else "cond_stage_model.model."
    sd = {}
    for prefix, m in (("model.diffusion_model.", base.unet), ("first_stage_model.", base.vae), (t_prefix, base.text_encoder)):
        sd.update({prefix + k: v.clone() for k, v in m.state_dict().items()})
    if control is not None:
        sd.update({"control_model." + k: v.clone() for k, v in control.state_dict().items()})
    # things official files carry that must be ignored
    sd["betas"] = torch.zeros(1000)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    if t_prefix.endswith("transformer."):
        sd[t_prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


def outputs(base: BaseModels, control: ControlNet | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([10])
    with torch.no_grad():
        ctx = base.text_encoder(["a red circle"])
        res = control(x, torch.rand(1, 3, 64, 64, generator=g), t, ctx) if control is not None else None
        eps = base.unet(x, t, ctx, control=res)
        img = base.vae.decode(x)
    return ctx, eps, img


def assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cfg", [SD1_LIKE, SD2_LIKE], ids=["sd1", "sd2"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_base_round_trip(tmp_path, cfg, fmt):
    base = make_base(cfg)
    sd = original_layout(base)
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 5}, path)
    loaded = load_base(path)
    assert loaded.config.unet == cfg.unet
    assert loaded.config.text.kind == cfg.text.kind and loaded.config.text.layers == cfg.text.layers
    assert_same(outputs(base), outputs(loaded))


def test_control_sd15_full_file_and_control_only_files(tmp_path):
    base = make_base(SD1_LIKE)
    cn = randomize_(ControlNet(**SD1_LIKE.controlnet.kwargs()), 7).eval()
    full = tmp_path / "control_sd15_canny.pth"
    torch.save({"state_dict": original_layout(base, cn)}, full)
    b2 = load_base(full)
    c2 = load_controlnet(full, base=b2.config)
    assert_same(outputs(base, cn), outputs(b2, c2))
    # v1.1 control-only files: prefixed .pth, bare fp16 .safetensors
    pref = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save({"control_model." + k: v for k, v in cn.state_dict().items()}, pref)
    bare = tmp_path / "control_v11p_sd15_canny.fp16.safetensors"
    save_file({k: v.half() for k, v in cn.state_dict().items()}, str(bare))
    c3 = load_controlnet(pref, base=b2.config)
    assert_same(outputs(base, cn), outputs(b2, c3))
    c4 = load_controlnet(bare, base=b2.config)
    assert c4.input_hint_block[0].weight.dtype == torch.float32
    for k, v in cn.state_dict().items():
        assert torch.equal(c4.state_dict()[k], v.half().float())


@pytest.mark.parametrize("cfg", [SD1_LIKE, SD2_LIKE], ids=["sd1", "sd2"])
def test_diffusers_folders_round_trip(tmp_path, cfg):
    base = make_base(cfg)
    cn = randomize_(ControlNet(**cfg.controlnet.kwargs()), 3).eval()
    save_diffusers_base(base, tmp_path / "pipe")
    save_diffusers_controlnet(cn, tmp_path / "cn")
    b2 = load_base(tmp_path / "pipe")
    c2 = load_controlnet(tmp_path / "cn", base=b2.config)
    a, b = outputs(base, cn), outputs(b2, c2)
    for u, v in zip(a, b):
        assert (u - v).abs().max() <= 1e-5
    # a bare diffusers ControlNet file (no config.json) is detected by its keys
    c3 = load_controlnet(tmp_path / "cn" / "diffusion_pytorch_model.safetensors", base=b2.config)
    assert_same(outputs(b2, c2), outputs(b2, c3))


def test_diffusers_folder_opens_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    base = make_base(SD1_LIKE)
    cn = randomize_(ControlNet(**SD1_LIKE.controlnet.kwargs()), 3).eval()
    save_diffusers_base(base, tmp_path / "pipe")
    save_diffusers_controlnet(cn, tmp_path / "cn")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet")
    dcn = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 768)
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        down, mid = dcn(x, t, ctx, controlnet_cond=hint, return_dict=False)
        want = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = base.unet(x, t, ctx, control=cn(x, hint, t, ctx))
    assert (want - got).abs().max() <= 1e-4


def test_mismatched_controlnet_is_refused(tmp_path):
    base = make_base(SD1_LIKE)
    cn2 = ControlNet(**SD2_LIKE.controlnet.kwargs())
    p = tmp_path / "sd21_control.safetensors"
    save_file({"control_model." + k: v for k, v in cn2.state_dict().items()}, str(p))
    with pytest.raises(CheckpointError, match=r"does not fit the base.*1024.*768.*SD2\.x ControlNet on a SD1\.x base"):
        load_controlnet(p, base=base.config)


def test_base_file_given_as_controlnet_and_vice_versa(tmp_path):
    base = make_base(SD1_LIKE)
    p = tmp_path / "sd.safetensors"
    save_file(original_layout(base), str(p))
    with pytest.raises(CheckpointError, match="no ControlNet weights"):
        load_controlnet(p)
    cn = ControlNet(**SD1_LIKE.controlnet.kwargs())
    q = tmp_path / "cn.safetensors"
    save_file(cn.state_dict(), str(q))
    with pytest.raises(CheckpointError, match="ControlNet-only file"):
        load_base(q)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    base = make_base(SD1_LIKE)
    sd = original_layout(base)
    del sd["model.diffusion_model.out.2.weight"]
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    p = tmp_path / "broken.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match=r"missing keys.*out\.2\.weight.*unexpected keys.*bogus\.weight"):
        load_base(p)


def test_truncated_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(1000)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(p)


@pytest.mark.parametrize("name", ["control_sd15_canny.pth", "model.safetensors", "x.ckpt"])
def test_random_bytes(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=name):
        read_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["CTRLNET_EVIL_MARKER"],))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CTRLNET_EVIL_MARKER", str(marker))
    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    q = tmp_path / "evil_zip.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil()}, q)
    for path in (p, q):
        with pytest.raises(CheckpointError, match="refused|not a readable"):
            read_checkpoint(path)
    assert not marker.exists()


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
