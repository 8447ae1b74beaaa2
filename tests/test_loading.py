"""Loading makes each weight once, in its final dtype and layout: no full-precision copy of the
model ever exists, values are exactly the file's cast, and bad keys are still named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from ctrlnet.checkpoints.convert import base_state_dict, controlnet_state_dict, write_single_file
from ctrlnet.checkpoints.diffusers_folder import save_diffusers_base
from ctrlnet.checkpoints import io
from ctrlnet.checkpoints.io import PIECE_BYTES, CheckpointError, read_checkpoint
from ctrlnet.checkpoints.load import load_base, load_controlnet
from ctrlnet.pipeline import load_models, random_base, random_controlnet

CL = torch.channels_last


class NewTensors(TorchDispatchMode):
    """Records every tensor an op makes in new memory (views of existing storage are left out)."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() > 1 \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((str(func), t.dtype, t.numel() * t.element_size()))
        return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    base = random_base("tiny-sd1", seed=3)
    net = random_controlnet(base.unet, "c")
    with torch.no_grad():  # 1-D weights too, so a wrong cast of any tensor shows
        for m in (base.unet, base.vae, base.text_encoder, net):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    write_single_file(base_state_dict(base), d / "base.safetensors", config=base.config, dtype=torch.float16)
    write_single_file(controlnet_state_dict(net), d / "control.safetensors", config=base.config,
                      dtype=torch.float16)
    save_diffusers_base(base, d / "pipe", dtype=torch.float16, controlnets={"c": net})
    return d


def _file_tensors(path, prefix):
    sd = read_checkpoint(path).state_dict
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and v.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_are_the_files_values_cast_once(files, dtype):
    base = load_base(files / "base.safetensors", dtype=dtype, memory_format=CL)
    net = load_controlnet(files / "control.safetensors", base=base.config, dtype=dtype, memory_format=CL)
    for module, path, prefix in ((base.unet, "base", "model.diffusion_model."),
                                 (base.vae, "base", "first_stage_model."),
                                 (net, "control", "control_model.")):
        want = _file_tensors(files / f"{path}.safetensors", prefix)
        got = module.state_dict()
        assert set(want) <= set(got)
        for k, v in want.items():
            assert got[k].dtype == dtype, k
            assert torch.equal(got[k], v.to(dtype)), k  # bit for bit: one rounding, fp16 -> dtype
            if v.ndim == 4 and module is not base.vae:
                assert got[k].is_contiguous(memory_format=CL), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tensors_cut_into_many_pieces_load_the_same(files, tmp_path, monkeypatch, dtype):
    # Pieces of 96 bytes: flat tensors are cut mid-run and channels-last weights one row (output
    # channel) at a time, so every boundary case of the piecewise read and cast is exercised.
    monkeypatch.setattr(io, "PIECE_BYTES", 96)
    net = load_controlnet(files / "control.safetensors", dtype=dtype, memory_format=CL)
    want = _file_tensors(files / "control.safetensors", "control_model.")
    got = net.state_dict()
    assert any(v.numel() * 2 > 96 and v.ndim == 4 for v in want.values())
    for k, v in want.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
        if v.ndim == 4:
            assert got[k].is_contiguous(memory_format=CL), k
    # a NaN in the last piece of a tensor, and one in the middle of a channels-last weight
    sd = {k: v.clone() for k, v in read_checkpoint(files / "control.safetensors").state_dict.items()}
    flat, conv = "control_model.input_blocks.0.0.bias", "control_model.input_blocks.1.0.in_layers.2.weight"
    for key, where in ((flat, (-1,)), (conv, (sd[conv].shape[0] // 2, 1, 1, 1))):
        bad = {**sd, key: sd[key].clone()}
        bad[key][where] = float("nan")
        save_file(bad, str(tmp_path / "nan.safetensors"), metadata=read_checkpoint(files / "control.safetensors").metadata)
        with pytest.raises(CheckpointError, match=r"NaN or infinite values \(" + key.split(".", 1)[1].replace(".", r"\.")):
            load_controlnet(tmp_path / "nan.safetensors", dtype=dtype, memory_format=CL)


def test_bf16_load_makes_no_fp32_tensor(files):
    # One thread: the loader then reads inline, where the dispatch mode (thread-local) sees every op.
    torch.set_num_threads(1)  # (conftest restores the count)
    with NewTensors() as seen:
        m = load_models(str(files / "base.safetensors"), [str(files / "control.safetensors")],
                        device="cpu", dtype="bf16")
    # the only fp32 tensors: one cache-sized staging piece per loaded part (fp16 -> fp32 -> bf16 per
    # piece, io.MappedFile.read_into), never a weight: no fp32 copy of the model exists
    fp32 = [(f, n) for f, dt, n in seen.made if dt == torch.float32]
    assert len(fp32) <= 4 and all(n <= 2 * PIECE_BYTES for _, n in fp32), \
        f"fp32 tensors were made while loading in bf16: {fp32[:5]}"
    made = sum(n for _, dt, n in seen.made if dt == torch.bfloat16)
    params = sum(p.numel() * 2 for mod in (m.base.unet, m.base.vae, m.base.text_encoder, *m.controlnets.values())
                 for p in mod.parameters())
    # every weight made once: what was allocated in bf16 is the model (+ a few scalar sums), not twice it
    assert params <= made < params * 1.01
    assert {p.dtype for mod in (m.base.unet, m.base.vae, m.base.text_encoder, *m.controlnets.values())
            for p in mod.parameters()} == {torch.bfloat16}
    assert m.base.unet.input_blocks[0][0].weight.is_contiguous(memory_format=CL)


def test_diffusers_folder_loads_in_the_asked_dtype_through_its_files(files):
    ours = load_models(str(files / "pipe"), device="cpu", dtype="bf16")
    single = load_models(str(files / "base.safetensors"), [str(files / "control.safetensors")],
                         device="cpu", dtype="bf16")
    for a, b in ((ours.base.unet, single.base.unet), (ours.base.vae, single.base.vae),
                 (next(iter(ours.controlnets.values())), next(iter(single.controlnets.values())))):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == torch.bfloat16 for k in sb)


def test_every_tensor_is_found_in_its_map(files):
    ckpt = read_checkpoint(files / "base.safetensors")
    for k, v in ckpt.state_dict.items():
        out = torch.empty_like(v, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        assert ckpt.mapped.read_into(v, out), k
        assert torch.equal(out, v.to(out.dtype)), k
    foreign = torch.zeros(3)  # not in the map: the loader copies it the ordinary way
    assert ckpt.mapped.offset(foreign) is None and not ckpt.mapped.read_into(foreign, torch.empty(3))
    ckpt.mapped.release()


def test_missing_and_unexpected_keys_are_named(files, tmp_path):
    ckpt = read_checkpoint(files / "base.safetensors")
    sd = {k: v.clone() for k, v in ckpt.state_dict.items() if k != "model.diffusion_model.out.2.bias"}
    sd["model.diffusion_model.surplus.weight"] = torch.zeros(2, dtype=torch.float16)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=ckpt.metadata)
    with pytest.raises(CheckpointError) as e:
        load_models(str(tmp_path / "bad.safetensors"), device="cpu", dtype="bf16")
    msg = str(e.value)
    assert "missing keys (1): out.2.bias" in msg and "unexpected keys (1): surplus.weight" in msg


def test_nan_refused_and_large_finite_fp16_accepted(files, tmp_path):
    ckpt = read_checkpoint(files / "control.safetensors")
    sd = {k: v.clone() for k, v in ckpt.state_dict.items()}
    key = "control_model.input_blocks.0.0.weight"
    # finite, but its fp16 sum overflows: the fast check must fall back, not refuse
    sd[key] = torch.full_like(sd[key], 60000.0)
    save_file(sd, str(tmp_path / "big.safetensors"), metadata=ckpt.metadata)
    net = load_controlnet(tmp_path / "big.safetensors", dtype=torch.float16)
    assert float(net.input_blocks[0][0].weight.float().max()) == 60000.0
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"), metadata=ckpt.metadata)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values \(input_blocks.0.0.weight\)"):
        load_controlnet(tmp_path / "nan.safetensors", dtype=torch.bfloat16)
