"""Model files as users have them (issue 14, faults 1-8, 10, the 9-channel base and --vae): each on
files written here, each asserting the same numbers as the plain file or the exact refusal."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.checkpoints.convert import base_state_dict, write_single_file
from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base, save_diffusers_controlnet
from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.checkpoints.load import load_base, load_controlnet
from ctrlnet.checkpoints.vae_file import load_vae
from ctrlnet.config import TINY_SD1, UNetConfig, VAEConfig
from ctrlnet.models.controlnet import ControlNet
from ctrlnet.models.unet import UNetModel
from ctrlnet.models.vae import AutoencoderKL
from ctrlnet.pipeline import load_models, random_base, random_controlnet
from helpers import randomize_

diffusers = pytest.importorskip("diffusers")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _residuals(net, unet_ctx_dim=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    ctx = torch.randn(1, 5, unet_ctx_dim, generator=g)
    with torch.no_grad():
        return net(x, hint, torch.tensor([500]), ctx)


@pytest.fixture(scope="module")
def tiny():
    return random_base("tiny-sd1", seed=1)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    """tiny-sd1 as one original-layout file with its config stored (head counts survive)."""
    p = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    write_single_file(base_state_dict(tiny), p, tiny.config)
    return p


# --- fault 1: Lightning callback objects and numpy scalars in original trainers' .ckpt ---------------


def _fake_module(monkeypatch, dotted: str, **attrs) -> None:
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mod)
    for k, v in attrs.items():
        setattr(sys.modules[dotted], k, v)
        v.__module__ = dotted


class ModelCheckpoint:  # the shape of Lightning's callback: attributes only
    def __init__(self):
        self.monitor, self.best_model_score, self.dirpath = "val/loss", None, "/logs/ckpt"


class Unlisted:
    pass


def test_fault1_lightning_ckpt_with_callback_and_numpy_step_loads(tmp_path, monkeypatch, tiny):
    _fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny.unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in tiny.vae.state_dict().items()})
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in tiny.text_encoder.state_dict().items()})
    obj = {"state_dict": sd, "global_step": np.int64(470000), "epoch": np.int32(6), "lr": np.float64(1e-4),
           "callbacks": {ModelCheckpoint: {"best_model_score": None}}, "checkpoint_callback": ModelCheckpoint()}
    path = tmp_path / "sd-v1-like.ckpt"
    torch.save(obj, path)
    # an unlisted global in the same kind of file stays refused, named
    _fake_module(monkeypatch, "lightning_fabric.plugins", Unlisted=Unlisted)
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "x": Unlisted()}, bad)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks",
                 "pytorch_lightning.callbacks.model_checkpoint", "lightning_fabric", "lightning_fabric.plugins"):
        monkeypatch.delitem(sys.modules, name)  # the loader must not need (or import) Lightning

    loaded = load_base(path, config=tiny.config)
    _same_state(loaded.unet, tiny.unet)
    _same_state(loaded.vae, tiny.vae)
    _same_state(loaded.text_encoder, tiny.text_encoder)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(bad)
    msg = str(e.value)
    assert "lightning_fabric.plugins.Unlisted" in msg and "\x1b" not in msg and "convert" not in msg


# --- faults 2 and 3: sharded diffusers folders, fp16 .bin variants ---------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe") / "pipe"
    save_diffusers_base(tiny, d)
    return d


@pytest.mark.parametrize("kwargs", [
    dict(max_shard_size="60KB"),
    dict(max_shard_size="60KB", safe_serialization=False),
    dict(variant="fp16", safe_serialization=False),
    dict(max_shard_size="60KB", variant="fp16", safe_serialization=False),
    dict(variant="fp16"),
], ids=["shards", "bin-shards", "fp16-bin", "fp16-bin-shards", "fp16-safetensors"])
def test_fault2_3_sharded_and_variant_folders_load_as_the_plain_folder(tmp_path, pipe, kwargs):
    import shutil

    import transformers

    out = tmp_path / "saved"
    shutil.copytree(pipe, out)
    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                     ("text_encoder", transformers.CLIPTextModel)):
        shutil.rmtree(out / sub)
        cls.from_pretrained(pipe / sub).save_pretrained(out / sub, **kwargs)
    names = os.listdir(out / "unet")
    if "max_shard_size" in kwargs:
        assert sum("-of-" in n for n in names) > 1 and any(n.endswith(".json") and "index" in n for n in names)
    if kwargs.get("variant"):
        assert all(".fp16" in n for n in names if n != "config.json")
    plain, other = load_base(pipe), load_base(out)
    for a, b in ((plain.unet, other.unet), (plain.vae, other.vae), (plain.text_encoder, other.text_encoder)):
        _same_state(a, b)


def test_fault2_missing_shard_is_named(tmp_path, pipe):
    import shutil

    out = tmp_path / "saved"
    shutil.copytree(pipe, out)
    shutil.rmtree(out / "unet")
    diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet").save_pretrained(out / "unet", max_shard_size="60KB")
    victim = sorted(n for n in os.listdir(out / "unet") if "-of-" in n)[1]
    (out / "unet" / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"shards are missing: {victim}"):
        load_base(out)


# --- fault 4: "difference" ControlNets -----------------------------------------------------------------


def test_fault4_difference_controlnet_gets_the_base_added_back(tmp_path, tiny, tiny_file):
    cn = random_controlnet(tiny.unet, "diff")
    unet_sd = tiny.unet.state_dict()
    diff = {"control_model." + k: (v - unet_sd[k] if k in unet_sd else v).contiguous()
            for k, v in cn.state_dict().items()}
    assert sum(k[len("control_model."):] in unet_sd for k in diff) > 100
    diff["difference"] = torch.tensor(1.0)
    p = tmp_path / "control_diff.safetensors"
    save_file(diff, str(p))
    want = _residuals(cn)
    got = _residuals(load_controlnet(p, base=tiny.config, base_unet=tiny.unet))
    err = max((a - b).abs().max().item() for a, b in zip(want, got))
    assert err <= 1e-5
    # through load_models, which knows the base at load time
    models = load_models(str(tiny_file), [str(p)], device="cpu", dtype="fp32", channels_last=False)
    got2 = _residuals(models.controlnets["control_diff"])
    assert max((a - b).abs().max().item() for a, b in zip(want, got2)) <= 1e-5
    # ... and refused without a base: not loaded silently wrong
    with pytest.raises(CheckpointError, match=r"difference.*needs the base model"):
        load_controlnet(p, base=tiny.config)
    # the same file without the flag would be a different network (the flag is what decides)
    del diff["difference"]
    save_file(diff, str(tmp_path / "plain.safetensors"))
    wrong = _residuals(load_controlnet(tmp_path / "plain.safetensors", base=tiny.config, base_unet=tiny.unet))
    assert max((a - b).abs().max().item() for a, b in zip(want, wrong)) > 1e-2


# --- fault 5: v-prediction markers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_like():
    """A small model whose head counts follow the SD1 rule (768-wide context -> 8 heads), so a file
    without a stored config loads by inference; a 1000-token vocabulary keeps it small."""
    from ctrlnet.checkpoints.load import BaseModels
    from ctrlnet.config import ModelConfig, TextEncoderConfig
    from ctrlnet.models.text_encoder import build_text_encoder

    cfg = ModelConfig(name="s", unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
                                                num_res_blocks=1, num_heads=8, context_dim=768),
                      vae=VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1),
                      text=TextEncoderConfig(width=768, layers=1, heads=12, mlp_ratio=1, vocab_size=1000))
    return BaseModels(cfg, UNetModel(**cfg.unet.kwargs()), AutoencoderKL(**cfg.vae.kwargs()),
                      build_text_encoder(cfg.text, device="cpu"))


def _v_file(tmp_path, name, tiny, metadata=None, extra=None, fmt="safetensors"):
    sd = base_state_dict(tiny)
    sd.update(extra or {})
    p = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p), metadata=metadata)
    else:
        torch.save({"state_dict": sd}, p)
    return p


@pytest.mark.parametrize("case, want, source", [
    ("modelspec-pred", "v", "modelspec.prediction_type=v"),
    ("modelspec-arch", "v", "modelspec.architecture=stable-diffusion-v2-768-v"),
    ("modelspec-eps-wins", "eps", "modelspec.prediction_type=epsilon"),
    ("v_pred-key", "v", "v_pred key"),
    ("yaml", "v", "beside the file (parameterization: v)"),
    ("none", "eps", "default"),
    ("caller", "eps", "given by the caller"),
])
def test_fault5_prediction_type_markers_in_order(tmp_path, sd1_like, case, want, source):
    tiny = sd1_like
    vkey = {"v_pred": torch.zeros(0)}
    if case == "modelspec-pred":
        p = _v_file(tmp_path, case, tiny, {"modelspec.prediction_type": "v", "modelspec.architecture": "stable-diffusion-v2-512"})
    elif case == "modelspec-arch":
        p = _v_file(tmp_path, case, tiny, {"modelspec.architecture": "stable-diffusion-v2-768-v"})
    elif case == "modelspec-eps-wins":  # metadata comes before the v_pred key
        p = _v_file(tmp_path, case, tiny, {"modelspec.prediction_type": "epsilon"}, vkey)
    elif case == "v_pred-key":
        p = _v_file(tmp_path, case, tiny, extra=vkey)
    elif case == "yaml":
        p = _v_file(tmp_path, case, tiny, fmt="ckpt")
        p.with_suffix(".yaml").write_text(
            "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
            "    # parameterization: eps\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    else:
        p = _v_file(tmp_path, case, tiny, extra=vkey if case == "caller" else None)
    loaded = load_base(p, parameterization="eps" if case == "caller" else None)
    assert loaded.config.schedule.parameterization == want
    assert source in loaded.config.schedule.parameterization_source


# --- fault 6: diffusers group counts other than 32 ---------------------------------------------------------


@pytest.fixture(scope="module")
def groups_pipe(tmp_path_factory, tiny):
    """A pipeline folder whose UNet, ControlNet (8 groups) and VAE (4 groups) are diffusers' own models."""
    d = tmp_path_factory.mktemp("groups") / "pipe"
    save_diffusers_base(tiny, d)
    torch.manual_seed(5)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
    cn = diffusers.ControlNetModel.from_unet(unet)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    for m in (unet, cn, vae):
        randomize_(m, seed=11)
        m.eval()
    import shutil

    for sub, m in (("unet", unet), ("vae", vae)):
        shutil.rmtree(d / sub)
        m.save_pretrained(d / sub)
    cn.save_pretrained(d / "controlnet")
    return d, unet, cn, vae


def test_fault6_group_counts_carry_through(groups_pipe):
    d, unet, cn, vae = groups_pipe
    models = load_models(str(d), device="cpu", dtype="fp32", channels_last=False)
    b = models.base
    assert b.config.unet.norm_num_groups == 8 and b.config.vae.norm_num_groups == 4
    net = models.controlnets["controlnet"]  # fault 10: picked up from the pipeline folder
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    hint, t = torch.rand(1, 3, 64, 64, generator=g), torch.tensor([321])
    with torch.no_grad():
        down, mid = cn(x, t, ctx, controlnet_cond=hint, return_dict=False)
        want = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = b.unet(x, t, ctx, control=net(x, hint, t, ctx))
        img_want = vae.decode(x).sample
        img_got = b.vae.decode(x * b.vae.scale_factor)
    assert want.abs().mean() > 1e-2
    assert (want - got).abs().max() <= 1e-4
    assert (img_want - img_got).abs().max() <= 1e-4


def test_fault6_unsupported_diffusers_fields_are_refused_by_name(tmp_path, groups_pipe):
    import json
    import shutil

    d = groups_pipe[0]
    out = tmp_path / "pipe"
    shutil.copytree(d, out)
    cfg = json.loads((out / "unet" / "config.json").read_text())
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (out / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unet/config\.json: resnet_time_scale_shift='scale_shift' is not supported"):
        load_base(out)
    cfg["resnet_time_scale_shift"], cfg["norm_num_groups"] = "default", 24
    (out / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"norm_num_groups=24 does not divide block_out_channels \[32, 64\]"):
        load_base(out)


# --- faults 7 and 8: not-a-checkpoint files, safetensors cut in the header ---------------------------------


@pytest.mark.parametrize("name, content, message", [
    ("control_sd15_canny.pth", b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n" * 3,
     "not a checkpoint: an HTML page"),
    ("model.ckpt", b"version https://git-lfs.github.com/spec/v1\noid sha256:4c86efd062ea772972dd2f2d4aba\nsize 7703807346\n",
     "not a checkpoint: a git-lfs pointer"),
])
def test_fault7_html_and_lfs_pointer(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_base(p)
    assert message in str(e.value) and "download the file again" in str(e.value) and "run code" not in str(e.value)


def test_fault8_safetensors_cut_inside_its_header(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({f"w{i}": torch.zeros(4) for i in range(50)}, str(p), metadata={"format": "pt"})
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    p.write_bytes(data[: 8 + n // 2])
    with pytest.raises(CheckpointError, match=rf"truncated inside its safetensors header \({8 + n // 2} bytes, "
                                              rf"the header alone needs {8 + n}\)"):
        read_checkpoint(p)


# --- fault 10: ControlNets of a pipeline folder --------------------------------------------------------------


def test_fault10_pipeline_folder_controlnets(tmp_path, tiny, pipe):
    import shutil

    d = tmp_path / "pipe"
    shutil.copytree(pipe, d)
    nets = [random_controlnet(tiny.unet, f"n{i}") for i in range(2)]
    # one ControlNet: --base PIPE picks it up, --controlnet PIPE is accepted
    save_diffusers_controlnet(nets[0], d / "controlnet")
    m = load_models(str(d), device="cpu", dtype="fp32", channels_last=False)
    assert list(m.controlnets) == ["controlnet"]
    _same_state(m.controlnets["controlnet"], nets[0])
    _same_state(load_controlnet(d, base=m.config), nets[0])
    # a MultiControlNetModel as diffusers saves it: controlnet/, controlnet_1/
    save_diffusers_controlnet(nets[1], d / "controlnet_1")
    m = load_models(str(d), device="cpu", dtype="fp32", channels_last=False)
    assert list(m.controlnets) == ["controlnet", "controlnet_1"]
    _same_state(m.controlnets["controlnet_1"], nets[1])
    with pytest.raises(CheckpointError, match=r"2 ControlNets; pass one of .*controlnet, .*controlnet_1"):
        load_controlnet(d)
    # an explicit ControlNet wins over the folder's
    m = load_models(str(d), [str(d / "controlnet_1")], device="cpu", dtype="fp32", channels_last=False)
    assert list(m.controlnets) == ["controlnet_1"]


# --- fault 11 (generation adds inpainting): a 9-channel base loads, with its ControlNets ----------------------


def test_inpainting_base_loads_with_nine_input_channels(tmp_path, sd1_like):
    cfg = sd1_like.config
    unet = randomize_(UNetModel(**{**cfg.unet.kwargs(), "in_channels": 9}), 2).eval()
    sd = base_state_dict(sd1_like)
    sd.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    p = tmp_path / "inpaint.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    b = load_base(p)  # no stored config: the channel count is read from the weights
    assert (b.config.unet.in_channels, b.config.unet.out_channels, b.unet.in_channels) == (9, 4, 9)
    _same_state(b.unet, unet)
    cn = ControlNet.from_unet(sd1_like.unet)
    q = tmp_path / "cn.safetensors"
    save_file({"control_model." + k: v for k, v in cn.state_dict().items()}, str(q))
    _same_state(load_controlnet(q, base=b.config), cn)


# --- --vae -----------------------------------------------------------------------------------------------------


def test_vae_files_swap_in(tmp_path, tiny, tiny_file):
    other = randomize_(AutoencoderKL(**TINY_SD1.vae.kwargs()), seed=9).eval()
    osd = other.state_dict()
    # A1111's vae-ft-mse-840000-ema-pruned.ckpt: under state_dict, with EMA bookkeeping
    ckpt = tmp_path / "vae-ft-mse.ckpt"
    torch.save({"state_dict": {**osd, "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(5)},
                "global_step": np.int64(840000)}, ckpt)
    prefixed = tmp_path / "vae_prefixed.safetensors"
    save_file({"first_stage_model." + k: v for k, v in osd.items()}, str(prefixed))
    folder = tmp_path / "vae_diffusers"
    pipe_dir = tmp_path / "p"
    save_diffusers_base(type(tiny)(tiny.config, tiny.unet, other, tiny.text_encoder), pipe_dir)
    os.rename(pipe_dir / "vae", folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = other.decode(z)
        for src in (ckpt, prefixed, folder):
            m = load_models(str(tiny_file), device="cpu", dtype="fp32", vae=str(src))
            assert torch.equal(m.base.vae.decode(z), want), src
            assert not torch.equal(load_models(str(tiny_file), device="cpu", dtype="fp32").base.vae.decode(z), want)
    wide = AutoencoderKL(**VAEConfig(ch=64, ch_mult=(1, 1, 1, 1), num_res_blocks=1).kwargs())
    bad = tmp_path / "sdxl_like_vae.safetensors"
    save_file(wide.state_dict(), str(bad))
    with pytest.raises(CheckpointError, match=r"another architecture than the base model's VAE \(ch: file 64 vs base 32\)"):
        load_vae(bad, TINY_SD1.vae)
    cn = tmp_path / "cn.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(cn))
    with pytest.raises(CheckpointError, match=r"not a VAE"):
        load_vae(cn, TINY_SD1.vae)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in osd.items() if not k.startswith("decoder.up.0.")}, str(partial))
    with pytest.raises(CheckpointError, match=r"missing keys.*decoder\.up\.0\."):
        load_vae(partial, TINY_SD1.vae)


def test_controlnet_params_carry_groups_to_diffusers_config():
    net = ControlNet(**{**TINY_SD1.controlnet.kwargs(), "norm_num_groups": 8})
    cfg = du.diffusers_config(net.config_params(), "controlnet")
    assert cfg["norm_num_groups"] == 8
    assert du.params_from_diffusers(cfg, "controlnet")["norm_num_groups"] == 8


def test_convert_to_ckpt_keeps_the_config(tmp_path, tiny, tiny_file, capsys):
    """`ctrlnet convert model.safetensors model.ckpt` wrote the weights alone: a model whose head
    counts the weights do not tell (tiny-sd1 here, custom and distilled models in use) could not be
    loaded back ("cannot infer the model architecture"). The pickle now carries the config as a
    plain string, read under weights_only, and both the file and the folder made from it load."""
    from ctrlnet.interfaces.cli import main

    out = tmp_path / "tiny16.ckpt"
    assert main(["convert", str(tiny_file), str(out), "--dtype", "fp16"]) == 0
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"state_dict", "ctrlnet_config"} and isinstance(obj["ctrlnet_config"], str)
    loaded = load_base(out)
    assert loaded.config == tiny.config
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v.half().to(loaded.unet.state_dict()[k].dtype)), k
    assert main(["convert", str(out), str(tmp_path / "pipe")]) == 0
    _same_state(load_base(tmp_path / "pipe").unet, loaded.unet)
    cn = tmp_path / "cn.pth"
    assert main(["convert", str(_write_cn(tmp_path, tiny)), str(cn), "--base", str(tiny_file)]) == 0
    assert load_controlnet(cn).config_params() == random_controlnet(tiny.unet, "x").config_params()


def _write_cn(tmp_path, tiny):
    p = tmp_path / "cn_in.pth"
    torch.save({f"control_model.{k}": v for k, v in random_controlnet(tiny.unet, "x").state_dict().items()}, p)
    return p
