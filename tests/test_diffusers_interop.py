"""What `ctrlnet convert` writes opens in diffusers and draws ctrlnet's image (issue 14, fault 9); LoRA
files made with PEFT give diffusers' image in ctrlnet, in both key formats, and leave no trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctrlnet.checkpoints.convert import base_state_dict, controlnet_state_dict, write_single_file
from ctrlnet.checkpoints.lora import LoRAError, load_lora
from ctrlnet.checkpoints.load import load_base, load_controlnet
from ctrlnet.interfaces.cli import main
from ctrlnet.models.patching import apply_loras
from ctrlnet.models.tokenizer import CLIPTokenizer
from ctrlnet.pipeline import ControlSpec, GenerationRequest, Models, generate, random_base, random_controlnet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "A RED circle, best quality, (blue:1.2)", "",
           "It's 3.14 o'clock; café naïve", ", ".join(f"tag{i}" for i in range(60))]
HINT = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
# Random tiny models amplify float differences (SDPA vs eager attention, ~1e-6) chaotically for some
# weights and settings: tiny-sd2 at seed 3 and CFG 7 ends 2.4e-3 apart in latents after 4 steps
# (0.6 of a level in pixels), at seed 1 and CFG 3 1.5e-5 apart. These settings keep the comparison
# about the pipelines, not about the conditioning of a random network.
STEPS, CFG, SEED = 4, 3.0, 42


def _ctrlnet_image(models: Models, prompt: str, negative: str, controls=()) -> np.ndarray:
    req = GenerationRequest(prompt=prompt, added_prompt="", negative_prompt=negative, controls=list(controls),
                            resolution=64, steps=STEPS, guidance_scale=CFG, seed=SEED, sampler="ddim")
    return generate(models, req).images[0]


def _diffusers_image(pipe, prompt: str, negative: str, **kw) -> np.ndarray:
    # ctrlnet's first noise: torch.randn of the latent shape from a CPU generator seeded with the seed
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))
    out = pipe(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=STEPS,
               guidance_scale=CFG, latents=noise, output_type="np", **kw)
    return (out.images[0] * 255).round().astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- fault 9: convert -> diffusers StableDiffusionControlNetPipeline ---------------------------------------


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
def test_fault9_converted_folder_opens_in_diffusers_and_draws_ctrlnets_image(tmp_path, preset, capsys):
    from PIL import Image

    base = random_base(preset, seed=1)
    cn = random_controlnet(base.unet, "canny")
    src = write_single_file(base_state_dict(base), tmp_path / "base.safetensors", base.config)
    cn_file = write_single_file(controlnet_state_dict(cn), tmp_path / "cn.safetensors")
    out = tmp_path / "pipe"
    assert main(["convert", str(src), str(out), "--controlnet", str(cn_file)]) == 0
    assert "float32" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"] and index["controlnet"][1] == "ControlNetModel"

    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(out)  # no extra argument
    pipe.set_progress_bar_config(disable=True)
    # the tokenizer gives ctrlnet's ids, padding included (SD1: end token, SD2: 0 = "!")
    pad = base.text_encoder.pad
    ours = CLIPTokenizer()(PROMPTS, pad=pad)
    theirs = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(theirs.input_ids, ours)
    assert (ours[2, 2:] == (49407 if pad == "eos" else 0)).all()

    models = Models(base, {"canny": cn}, torch.device("cpu"), torch.float32)
    for prompt, negative in (("a red circle", "blurry"),):
        want = _ctrlnet_image(models, prompt, negative, [ControlSpec(image=HINT)])
        got = _diffusers_image(pipe, prompt, negative, image=Image.fromarray(HINT))
        assert want.std() > 10  # a non-trivial image
        assert _max_diff(want, got) <= 1


def test_fault9_dtype_defaults_to_the_source(tmp_path, capsys):
    base = random_base("tiny-sd1")
    src = write_single_file(base_state_dict(base), tmp_path / "half.safetensors", base.config, torch.float16)
    assert main(["convert", str(src), str(tmp_path / "pipe")]) == 0
    assert "float16" in capsys.readouterr().out
    sd = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert main(["convert", str(src), str(tmp_path / "full.safetensors"), "--dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "full.safetensors")).values()} == {torch.float32}
    # a control_sd15-style file converts whole (--part all) into a ControlNet pipeline
    cn = random_controlnet(base.unet, "x")
    both = write_single_file({**base_state_dict(base), **controlnet_state_dict(cn)}, tmp_path / "both.safetensors",
                             base.config)
    assert main(["convert", str(both), str(tmp_path / "all"), "--part", "all"]) == 0
    got = load_controlnet(tmp_path / "all" / "controlnet", base=base.config)
    for k, v in cn.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


# --- LoRA ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """tiny-sd1 converted to diffusers, with a PEFT LoRA trained-as-random on its UNet and text encoder."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("lora")
    base = random_base("tiny-sd1", seed=4)
    src = write_single_file(base_state_dict(base), d / "base.safetensors", base.config)
    assert main(["convert", str(src), str(d / "pipe")]) == 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(d / "pipe" / "unet")
    te = transformers.CLIPTextModel.from_pretrained(d / "pipe" / "text_encoder")
    torch.manual_seed(0)
    # conv1/conv2 are the ResBlocks' 3x3 convolutions (LoCon), proj_in/out 1x1 convs in SD1
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "time_emb_proj"])
    tcfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, te)  # transformers' add_adapter wants peft >= 0.22; plain PEFT is the same
    usd = {k: (v * 0.5 if "lora_B" in k else v) for k, v in get_peft_model_state_dict(unet).items()}
    tsd = {k: (v * 0.5 if "lora_B" in k else v) for k, v in get_peft_model_state_dict(te).items()}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        d / "peft", unet_lora_layers=usd, text_encoder_lora_layers=tsd,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    peft_file = d / "peft" / "pytorch_lora_weights.safetensors"
    # the same LoRA as kohya/A1111 write it: lora_unet_/lora_te_ names, lora_down/lora_up, alpha
    kohya = {}
    for k, v in load_file(str(peft_file)).items():
        part, rest = k.split(".", 1)
        module, _, field = rest.rpartition(".lora_")
        if part == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # sd-scripts names the text model's modules in full
        name = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if field.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(8.0 if part == "unet" else 3.0)
    kohya_file = d / "kohya_lora.safetensors"
    save_file(kohya, str(kohya_file))
    models = Models(load_base(d / "pipe"), {}, torch.device("cpu"), torch.float32)
    return d, models, peft_file, kohya_file, tcfg


def _diffusers_with_lora(folder, peft_file, tcfg, weight: float):
    """diffusers' pipeline with the LoRA as diffusers/PEFT apply it (unmerged adapters): the UNet through
    diffusers' ``lora_state_dict`` + ``load_lora_into_unet`` (what ``load_lora_weights`` does), the text encoder through PEFT
    directly (``load_lora_weights`` would go through transformers' adapter API, which needs peft >= 0.22,
    newer than the registry here has)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    state_dict, alphas, metadata = pipe.lora_state_dict(peft_file, return_lora_metadata=True)
    pipe.load_lora_into_unet(state_dict, alphas, unet=pipe.unet, adapter_name="t", metadata=metadata)
    pipe.unet.set_adapters(["t"], weights=[weight])
    te = pipe.text_encoder
    inject_adapter_in_model(tcfg, te, adapter_name="t")
    tsd = {k[len("text_encoder."):]: v for k, v in load_file(str(peft_file)).items() if k.startswith("text_encoder.")}
    result = set_peft_model_state_dict(te, tsd, adapter_name="t")
    assert not result.unexpected_keys
    for m in te.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("t", weight)  # scaling = weight * lora_alpha / r, as set_adapters does
    return pipe


def _snapshot(models: Models) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in (("unet", models.base.unet), ("text", models.base.text_encoder))
            for k, v in m.state_dict().items()}


def _assert_unchanged(models: Models, snap: dict[str, torch.Tensor]) -> None:
    now = _snapshot(models)
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k


def test_lora_image_matches_diffusers_in_both_formats(sd1):
    d, models, peft_file, kohya_file, tcfg = sd1
    lora = load_lora(peft_file)
    assert lora.format == "diffusers" and {"unet", "text"} <= lora.parts
    assert any(layer.down.ndim == 4 and layer.down.shape[-1] == 3 for layer in lora.layers.values())  # 3x3 LoCon
    snap = _snapshot(models)
    plain = _ctrlnet_image(models, "a red circle", "blurry")
    pipe = _diffusers_with_lora(d / "pipe", peft_file, tcfg, 0.7)
    want = _diffusers_image(pipe, "a red circle", "blurry")
    with apply_loras(models.base.unet, models.base.text_encoder, {}, [(peft_file, 0.7)]):
        got = _ctrlnet_image(models, "a red circle", "blurry")
        patched = _snapshot(models)
    assert _max_diff(plain, want) > 10  # the LoRA changes the image ...
    assert _max_diff(got, want) <= 1  # ... as diffusers applies it
    _assert_unchanged(models, snap)
    with apply_loras(models.base.unet, models.base.text_encoder, {}, [(kohya_file, 0.7)]):
        kohya_patched = _snapshot(models)
    for k in patched:  # the kohya file is the same LoRA: the same weights, bit for bit
        assert torch.equal(patched[k], kohya_patched[k]), k
    _assert_unchanged(models, snap)


def test_lora_weight_zero_and_restore_after_errors(sd1):
    d, models, peft_file, kohya_file, _ = sd1
    snap = _snapshot(models)
    plain = _ctrlnet_image(models, "a cat", "")
    with apply_loras(models.base.unet, models.base.text_encoder, {}, [(kohya_file, 0.0)]):
        assert np.array_equal(_ctrlnet_image(models, "a cat", ""), plain)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_loras(models.base.unet, models.base.text_encoder, {}, [(kohya_file, 1.0), (peft_file, -0.5)]):
            assert not torch.equal(models.base.unet.input_blocks[1][0].in_layers[2].weight,
                                   snap["unet.input_blocks.1.0.in_layers.2.weight"])
            raise RuntimeError("boom")
    _assert_unchanged(models, snap)
    # a bad file among good ones changes nothing
    bad = d / "bad.safetensors"
    sd = load_file(str(kohya_file))
    sd["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 4)
    sd["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(4, 4)
    save_file(sd, str(bad))
    with pytest.raises(LoRAError, match=r"1 LoRA layers match no weight.*unet:not_a_module"):
        with apply_loras(models.base.unet, models.base.text_encoder, {}, [(kohya_file, 1.0), (bad, 1.0)]):
            pass
    _assert_unchanged(models, snap)


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_x.lora_down.weight": (2, 4), "something_else": (1,)}, r"1 keys are not LoRA weights.*something_else"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (2, 4)}, r"an SDXL LoRA"),
    ({"lora_unet_x.hada_w1_a": (2, 4)}, r"LyCORIS LoHa layers are not supported"),
    ({"lora_unet_x.lora_down.weight": (2, 4)}, r"lack their down or up weight: unet:x"),
    ({"lora_unet_x.lora_down.weight": (2, 4), "lora_unet_x.lora_up.weight": (4, 3)}, r"disagree on the rank"),
])
def test_lora_files_refused_by_name(tmp_path, keys, message):
    p = tmp_path / "l.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(p))
    with pytest.raises(LoRAError, match=message):
        load_lora(p)


def test_lora_original_names_controlnet_keys_and_old_diffusers_form(tmp_path):
    base = random_base("tiny-sd1", seed=5)
    cn = random_controlnet(base.unet, "c")
    g = torch.Generator().manual_seed(1)
    down3 = torch.randn(3, 32, 3, 3, generator=g)  # a 3x3 LoCon layer, original module names
    up3 = torch.randn(32, 3, 1, 1, generator=g)
    down_c, up_c = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    down_o, up_o = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    lora = {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": down3,
            "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": up3,
            "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(1.5),
            "control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight": down_c,
            "control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": up_c,
            # the old diffusers form, diffusers module names
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora.down.weight": down_o,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora.up.weight": up_o}
    p = tmp_path / "mixed.safetensors"
    save_file(lora, str(p))
    w3 = base.unet.input_blocks[1][0].in_layers[2].weight
    wc = cn.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    wo = base.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_v.weight
    before = [w.detach().clone() for w in (w3, wc, wo)]
    want = [before[0] + 0.5 * 1.5 / 3 * (up3.flatten(1) @ down3.flatten(1)).reshape(w3.shape),
            before[1] + 0.5 * (up_c @ down_c), before[2] + 0.5 * (up_o @ down_o)]
    with apply_loras(base.unet, base.text_encoder, {"c": cn}, [(p, 0.5)]):
        for w, e in zip((w3, wc, wo), want):
            assert (w - e).abs().max() <= 1e-6
    for w, b in zip((w3, wc, wo), before):
        assert torch.equal(w, b)
    with pytest.raises(LoRAError, match="ControlNet layers .* but no ControlNet is loaded"):
        with apply_loras(base.unet, base.text_encoder, {}, [(p, 0.5)]):
            pass


def test_lora_on_the_sd2_text_tower_updates_packed_qkv_rows(tmp_path):
    """kohya names SD2 text layers as transformers does (q_proj, k_proj, ...); ours packs q/k/v."""
    from ctrlnet.checkpoints import diffusers_clip as dc

    base = random_base("tiny-sd2", seed=6)
    te = base.text_encoder
    w = base.config.text.width
    g = torch.Generator().manual_seed(2)
    parts = {q: (torch.randn(2, w, generator=g), torch.randn(w, 2, generator=g)) for q in ("q", "k", "v")}
    fc_down, fc_up = torch.randn(2, w, generator=g), torch.randn(4 * w, 2, generator=g)
    sd = {}
    for q, (dn, up) in parts.items():
        sd[f"lora_te_text_model_encoder_layers_1_self_attn_{q}_proj.lora_down.weight"] = dn
        sd[f"lora_te_text_model_encoder_layers_1_self_attn_{q}_proj.lora_up.weight"] = up
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = fc_down
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = fc_up
    p = tmp_path / "sd2_te.safetensors"
    save_file(sd, str(p))
    def hf_names():
        return {k: v.clone() for k, v in dc.openclip_to_transformers(te.state_dict(), drop_last_layer=False).items()}

    hf_before = hf_names()
    with apply_loras(base.unet, te, {}, [(p, 1.0)]):
        hf_after = hf_names()
    for q, (dn, up) in parts.items():
        k = f"text_model.encoder.layers.1.self_attn.{q}_proj.weight"
        assert (hf_after[k] - hf_before[k] - up @ dn).abs().max() <= 1e-6
    k = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert (hf_after[k] - hf_before[k] - fc_up @ fc_down).abs().max() <= 1e-6
    assert torch.equal(dc.openclip_to_transformers(te.state_dict(), drop_last_layer=False)[k], hf_before[k])
