"""Text towers: checkpoint key layout, parity with transformers' CLIPTextModel after key conversion,
conversion round trips, the token-embedding hook."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ctrlnet.checkpoints.diffusers_clip import (
    clip_from_transformers,
    clip_to_transformers,
    openclip_fill_unrecoverable,
    openclip_from_transformers,
    openclip_to_transformers,
    openclip_unrecoverable_keys,
)
from ctrlnet.config import SD15, SD21, TINY_SD1, TINY_SD2
from ctrlnet.models.text_encoder import (
    HARMLESS_KEYS,
    CLIPTextEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    build_text_encoder,
)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat, masterpiece", "", "line art of 2 dogs!!! café 🎨"]
TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (LayerNorms too) so that no parameter is a no-op in the check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def _hf_model(cfg, layers: int, act: str):
    c = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act=act, layer_norm_eps=1e-5, attn_implementation="eager",
    )
    return transformers.CLIPTextModel(c).eval()


def _load_hf(model, sd):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def _expected_sd1_keys(layers: int) -> list[str]:
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.{w}" for n in ("q", "k", "v", "out") for w in ("weight", "bias")]
        keys += [p + f"{m}.{w}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for w in ("weight", "bias")]
    return keys + ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]


def _expected_sd2_keys(layers: int) -> list[str]:
    keys = ["token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        keys += [p + "attn.in_proj_weight", p + "attn.in_proj_bias", p + "attn.out_proj.weight", p + "attn.out_proj.bias"]
        keys += [p + f"{m}.{w}" for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj") for w in ("weight", "bias")]
    return keys + ["ln_final.weight", "ln_final.bias"]


def test_checkpoint_key_layout_full_size_on_meta():
    sd1 = build_text_encoder(SD15.text)  # meta: no memory
    assert isinstance(sd1, CLIPTextEncoder) and sd1.device.type == "meta"
    s = sd1.state_dict()
    assert sorted(s) == sorted(_expected_sd1_keys(12))
    assert s["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert s["text_model.encoder.layers.0.mlp.fc1.weight"].shape == (3072, 768)
    assert sum(v.numel() for v in s.values()) == 123_060_480  # CLIP ViT-L/14 text tower

    sd2 = build_text_encoder(SD21.text)
    assert isinstance(sd2, OpenCLIPTextEncoder)
    s = sd2.state_dict()
    assert sorted(s) == sorted(_expected_sd2_keys(24))
    assert s["positional_embedding"].shape == (77, 1024)
    assert s["transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert s["text_projection"].shape == (1024, 1024) and s["logit_scale"].shape == ()
    assert HARMLESS_KEYS == ("text_model.embeddings.position_ids",)


def test_meta_build_loads_with_assign_and_harmless_position_ids():
    cfg = TINY_SD1.text
    ref = _randomize(build_text_encoder(cfg, "cpu"), 0)
    sd = dict(ref.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as old official files carry
    model = build_text_encoder(cfg)  # meta
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert missing == [] and unexpected == list(HARMLESS_KEYS)
    assert all(not t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        assert torch.equal(model(PROMPTS), ref(PROMPTS))


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_sd1_parity_with_transformers(layer):
    cfg = replace(TINY_SD1.text, layer=layer)
    ours = _randomize(build_text_encoder(cfg, "cpu"), 1)
    hf_sd = clip_to_transformers(ours.state_dict(), text_model_prefix=False)
    hf = _load_hf(_hf_model(cfg, cfg.layers, "quick_gelu"), hf_sd)
    ids = ours.tokenizer(PROMPTS, pad="eos")
    with torch.no_grad():
        got = ours.encode_ids(ids)
        out = hf(input_ids=ids, output_hidden_states=True)
        # A1111 / ComfyUI / ControlNet 1.1 clip skip 2: final LN on hidden_states[-2]
        ref = out.last_hidden_state if layer == "last" else hf.final_layer_norm(out.hidden_states[-2])
    assert got.shape == (3, 77, cfg.width)
    assert (got - ref).abs().max().item() <= TOL
    # the two layers differ, so the check above really selects one
    with torch.no_grad():
        other = ours.encode_ids(ids, layer="penultimate" if layer == "last" else "last")
    assert (other - got).abs().max().item() > 1e-2


def test_sd2_parity_with_transformers_diffusers_layout():
    cfg = TINY_SD2.text  # penultimate, gelu, 3 layers
    ours = _randomize(build_text_encoder(cfg, "cpu"), 2)
    ids = ours.tokenizer(PROMPTS, pad="zero")
    assert ids[1, 2:].eq(0).all()
    with torch.no_grad():
        got = ours.encode_ids(ids)
        got_last = ours.encode_ids(ids, layer="last")

        # diffusers' conversion: last block dropped, last_hidden_state is the penultimate context
        small_sd = openclip_to_transformers(ours.state_dict(), text_model_prefix=False)
        hf_small = _load_hf(_hf_model(cfg, cfg.layers - 1, "gelu"), small_sd)
        assert (hf_small(input_ids=ids).last_hidden_state - got).abs().max().item() <= TOL

        # all blocks kept: final LN on hidden_states[-2] is the penultimate context
        hf_full = _load_hf(
            _hf_model(cfg, cfg.layers, "gelu"),
            openclip_to_transformers(ours.state_dict(), drop_last_layer=False, text_model_prefix=False),
        )
        out = hf_full(input_ids=ids, output_hidden_states=True)
        assert (hf_full.final_layer_norm(out.hidden_states[-2]) - got).abs().max().item() <= TOL
        assert (out.last_hidden_state - got_last).abs().max().item() <= TOL
    assert (got - got_last).abs().max().item() > 1e-2


def test_openclip_attention_matches_torch_multihead_attention():
    """Independent check of the packed q/k/v order against nn.MultiheadAttention (open_clip's module)."""
    cfg = TINY_SD2.text
    block = _randomize(build_text_encoder(cfg, "cpu"), 3).transformer.resblocks[0]
    mha = torch.nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
    mha.load_state_dict(block.attn.state_dict())
    x = torch.randn(2, 77, cfg.width, generator=torch.Generator().manual_seed(0))
    mask = torch.full((77, 77), float("-inf")).triu(1)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert (block.attn(x) - ref).abs().max().item() <= 1e-5


def test_clip_conversion_round_trip_and_layouts():
    ours = build_text_encoder(TINY_SD1.text, "cpu").state_dict()
    prefixed = clip_to_transformers(ours)
    assert set(prefixed) == set(ours)  # SD1: the same names
    bare = clip_to_transformers(ours, text_model_prefix=False)
    assert all(not k.startswith("text_model.") for k in bare)
    for sd in (prefixed, bare, {**bare, "embeddings.position_ids": torch.arange(77)[None]}):
        back = clip_from_transformers(sd)
        assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="unexpected key"):
        clip_from_transformers({**prefixed, "text_projection.weight": torch.zeros(1)})


def test_openclip_conversion_round_trip_and_unrecoverable_keys():
    cfg = TINY_SD2.text
    model = _randomize(build_text_encoder(cfg, "cpu"), 4)
    ours = model.state_dict()

    # everything but logit_scale survives with all blocks and the projection kept
    full = openclip_to_transformers(ours, drop_last_layer=False, with_projection=True)
    back = openclip_from_transformers(full)
    assert set(back) == set(ours) - {"logit_scale"}
    assert all(torch.equal(back[k], ours[k]) for k in back)

    # diffusers' SD2 layout (prefixed, as in published folders, or transformers >= 5 bare)
    for prefix in (True, False):
        dif = openclip_to_transformers(ours, text_model_prefix=prefix)
        assert not any(".layers.2." in k for k in dif) and "text_projection.weight" not in dif
        rec = openclip_from_transformers(dif)
        missing = set(ours) - set(rec)
        assert missing == set(openclip_unrecoverable_keys(cfg, cfg.layers - 1))
        assert len(missing) == 12 + 2

    # filled stand-ins load strictly and reproduce the penultimate context exactly
    rec = openclip_from_transformers(openclip_to_transformers(ours))
    filled_sd, filled = openclip_fill_unrecoverable(rec, cfg)
    assert sorted(filled) == sorted(openclip_unrecoverable_keys(cfg, cfg.layers - 1))
    loaded = build_text_encoder(cfg)
    loaded.load_state_dict(filled_sd, strict=True, assign=True)
    ids = model.tokenizer(PROMPTS, pad="zero")
    with torch.no_grad():
        assert torch.equal(loaded.encode_ids(ids), model.encode_ids(ids))
        # the stand-in block is an identity: "last" equals "penultimate"
        assert torch.equal(loaded.encode_ids(ids, layer="last"), loaded.encode_ids(ids))

    # a tower of the transformers depth with layer="last" is the same function, no stand-ins needed
    short = build_text_encoder(replace(cfg, layers=cfg.layers - 1, layer="last"))
    missing, unexpected = short.load_state_dict(rec, strict=False, assign=True)
    assert set(missing) == {"text_projection", "logit_scale"} and not unexpected

    # stand-ins are refused when the missing block would be used
    with pytest.raises(ValueError, match="cannot be recovered"):
        openclip_fill_unrecoverable(rec, replace(cfg, layer="last"))


def test_token_embedding_hook():
    """embed_tokens + encode_embeds is encode_ids; rows replaced in between reach the blocks
    (the path textual-inversion embeddings take; prompt policy is tested in test_prompts.py)."""
    for cfg, seed in ((TINY_SD1.text, 5), (TINY_SD2.text, 6)):
        enc = _randomize(build_text_encoder(cfg, "cpu"), seed)
        ids = enc.tokenizer(["a photo of a cat", "a photo of a dog"], pad=enc.pad)
        with torch.no_grad():
            embeds = enc.embed_tokens(ids)  # (2, 77, C)
            assert embeds.shape == (2, 77, cfg.width)
            assert torch.equal(enc.encode_embeds(embeds), enc.encode_ids(ids))
            assert torch.equal(enc.encode_embeds(embeds, "penultimate"), enc.encode_ids(ids, "penultimate"))
            dog = embeds[1, 5].clone()
            embeds[0, 5] = dog  # "cat" -> the vector of "dog"
            assert torch.equal(enc.encode_embeds(embeds)[0], enc.encode_ids(ids)[1])
        with pytest.raises(ValueError, match="token embeddings must be"):
            enc.encode_embeds(torch.zeros(1, 78, cfg.width))
        with pytest.raises(ValueError, match="token embeddings must be"):
            enc.encode_embeds(torch.zeros(1, 77, cfg.width + 1))


def test_config_errors():
    with pytest.raises(ValueError, match="kind='clip'"):
        CLIPTextEncoder(TINY_SD2.text)
    with pytest.raises(ValueError, match="not divisible"):
        build_text_encoder(replace(TINY_SD1.text, heads=5))
    with pytest.raises(ValueError, match="unknown activation"):
        build_text_encoder(replace(TINY_SD1.text, act="relu"))
    enc = build_text_encoder(TINY_SD1.text, "cpu")
    assert isinstance(enc, TextEncoder)
    with pytest.raises(ValueError, match="layer must be"):
        enc.encode_ids(torch.zeros(1, 77, dtype=torch.long), layer="first")
    with pytest.raises(ValueError, match="ids must be"):
        enc.encode_ids(torch.zeros(1, 78, dtype=torch.long))
