"""Text-encoder keys: transformers' ``CLIPTextModel`` (diffusers folders) <-> ours.

Two transformers layouts exist and both are accepted: ``text_model.embeddings.…`` (transformers 4
``CLIPTextModel``, every published diffusers folder, ``CLIPTextModelWithProjection``) and the bare
``embeddings.…`` of transformers >= 5's ``CLIPTextModel`` (in memory and as it saves). The ``to``
functions write the former unless ``text_model_prefix=False``.

SD1: our ``kind="clip"`` keys *are* the prefixed ``CLIPTextModel`` keys; the conversion only
drops the stateless ``text_model.embeddings.position_ids`` and checks the key set.

SD2: diffusers stores the OpenCLIP tower as a ``CLIPTextModel`` (``hidden_act="gelu"``) made the way
``diffusers.loaders.single_file_utils.convert_open_clip_checkpoint`` does it:

- ``attn.in_proj_{weight,bias}`` split into ``self_attn.{q,k,v}_proj``; ``ln_1/ln_2`` ->
  ``layer_norm1/2``; ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``; ``ln_final`` -> ``final_layer_norm``;
  ``token_embedding``/``positional_embedding`` -> ``embeddings.{token,position}_embedding.weight``;
- the **last resblock is dropped** (23 of 24 layers), so ``last_hidden_state`` of that model equals
  SD2's penultimate-layer context: ``ln_final`` after all blocks but the last;
- ``text_projection`` is dropped (``CLIPTextModel`` has none; ``CLIPTextModelWithProjection`` keeps
  it as ``text_projection.weight`` = its transpose) and ``logit_scale`` is dropped.

So from a diffusers SD2 folder the last resblock, ``text_projection`` and ``logit_scale`` cannot be
recovered. SD never uses them (``layer="penultimate"``, no pooling). :func:`openclip_fill_unrecoverable`
supplies explicit stand-ins (an identity block, a zero projection, the init ``logit_scale``) so
the full-size tower loads strictly.
"""

from __future__ import annotations

import math
import re

import torch

from ctrlnet.config import TextEncoderConfig

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

_POSITION_IDS = "text_model.embeddings.position_ids"

# open_clip name -> transformers name, inside one block
_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OURS_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_BARE_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _with_prefix(sd: StateDict) -> StateDict:
    """Normalise transformers >= 5 bare keys to the ``text_model.``-prefixed layout."""
    return {("text_model." + k if k.startswith(_BARE_ROOTS) else k): v for k, v in sd.items()}


def _strip_prefix(sd: StateDict, text_model_prefix: bool) -> StateDict:
    if text_model_prefix:
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _unexpected(keys, what: str) -> ValueError:
    keys = sorted(keys)
    more = " …" if len(keys) > 8 else ""
    return ValueError(f"{what}: {len(keys)} unexpected key(s): {', '.join(keys[:8])}{more}")


# --- SD1 -----------------------------------------------------------------------------------------


def clip_from_transformers(sd: StateDict) -> StateDict:
    """SD1 ``CLIPTextModel`` state dict (either layout) -> our ``kind="clip"`` keys."""
    out = {k: v for k, v in _with_prefix(sd).items() if k != _POSITION_IDS}
    bad = [k for k in out if not k.startswith("text_model.")]
    if bad:
        raise _unexpected(bad, "not a CLIPTextModel state dict")
    return out


def clip_to_transformers(sd: StateDict, *, text_model_prefix: bool = True) -> StateDict:
    """Our ``kind="clip"`` keys -> ``CLIPTextModel`` keys (``text_model.…``, or bare with
    ``text_model_prefix=False`` for transformers >= 5's ``CLIPTextModel.load_state_dict``)."""
    return _strip_prefix(clip_from_transformers(sd), text_model_prefix)


# --- SD2 -----------------------------------------------------------------------------------------


def _num_blocks(keys, pattern: re.Pattern) -> int:
    idx = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(idx) + 1 if idx else 0


def openclip_to_transformers(
    sd: StateDict, *, drop_last_layer: bool = True, with_projection: bool = False, text_model_prefix: bool = True
) -> StateDict:
    """Our ``kind="openclip"`` keys -> ``CLIPTextModel`` keys, as diffusers converts SD2.

    ``drop_last_layer=True`` (diffusers' choice) gives a model with ``layers - 1`` blocks whose
    ``last_hidden_state`` is SD2's penultimate context; ``False`` keeps every block (then
    ``final_layer_norm(hidden_states[-2])`` is the penultimate context). ``with_projection=True``
    adds ``text_projection.weight`` (``CLIPTextModelWithProjection``). ``logit_scale`` is always dropped.
    ``text_model_prefix=False`` gives transformers >= 5's bare ``CLIPTextModel`` keys.
    """
    if with_projection and not text_model_prefix:
        raise ValueError("CLIPTextModelWithProjection keys always carry the text_model. prefix")
    n = _num_blocks(sd, _OURS_BLOCK)
    keep = n - 1 if drop_last_layer else n
    out: StateDict = {}
    for key, value in sd.items():
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.T.contiguous()
        elif key == "logit_scale":
            continue
        elif m := _OURS_BLOCK.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if i >= keep:
                continue
            prefix = f"text_model.encoder.layers.{i}.self_attn."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}{name}_proj.{kind}"] = part.clone()
            elif rest in _BLOCK_MAP:
                out[f"text_model.encoder.layers.{i}.{_BLOCK_MAP[rest]}"] = value
            else:
                raise _unexpected([key], "not an OpenCLIP text tower state dict")
        else:
            raise _unexpected([key], "not an OpenCLIP text tower state dict")
    return _strip_prefix(out, text_model_prefix)


def openclip_from_transformers(sd: StateDict) -> StateDict:
    """``CLIPTextModel`` keys of an SD2 text encoder -> our ``kind="openclip"`` keys.

    Recovers every key that exists (q/k/v are re-packed into ``in_proj_*``; ``text_projection.weight``
    of a ``CLIPTextModelWithProjection`` becomes ``text_projection``). A diffusers SD2 folder holds
    one block fewer than the original and no projection / logit scale: load the result into a tower
    built with ``layers=n_blocks, layer="last"`` (same output), or complete it with
    :func:`openclip_fill_unrecoverable`.
    """
    inv_block = {v: k for k, v in _BLOCK_MAP.items()}
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    out: StateDict = {}
    for key, value in _with_prefix(sd).items():
        if key == _POSITION_IDS:
            continue
        if key in inv_top:
            out[inv_top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := _HF_BLOCK.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if mq := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((i, mq.group(2)), {})[mq.group(1)] = value
            elif rest in inv_block:
                out[f"transformer.resblocks.{i}.{inv_block[rest]}"] = value
            else:
                raise _unexpected([key], "not a CLIPTextModel state dict")
        else:
            raise _unexpected([key], "not a CLIPTextModel state dict")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {i}: self_attn {kind} has only {sorted(parts)} of q/k/v")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"], dim=0)
    return out


def openclip_unrecoverable_keys(cfg: TextEncoderConfig, n_blocks: int) -> list[str]:
    """Keys of a ``cfg`` tower that a ``CLIPTextModel`` with ``n_blocks`` layers cannot provide."""
    keys = [
        f"transformer.resblocks.{i}.{rest}"
        for i in range(n_blocks, cfg.layers)
        for rest in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                     "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                     "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    ]
    return keys + ["text_projection", "logit_scale"]


def openclip_fill_unrecoverable(sd: StateDict, cfg: TextEncoderConfig) -> tuple[StateDict, list[str]]:
    """Complete a converted SD2 state dict for a full ``cfg`` tower; returns ``(sd, filled_keys)``.

    The dropped last block becomes an identity block (zero projections: each residual branch adds
    0), ``text_projection`` zeros and ``logit_scale`` open_clip's init ``log(1/0.07)``. Refused when
    a missing block would be *used*: only the last block may be missing, and only for
    ``cfg.layer == "penultimate"``, so the context is exactly the original's.
    """
    if cfg.kind != "openclip":
        raise ValueError(f"needs an openclip config, got kind={cfg.kind!r}")
    n = _num_blocks(sd, _OURS_BLOCK)
    used = cfg.layers - (1 if cfg.layer == "penultimate" else 0)
    if n < used:
        raise ValueError(
            f"state dict has {n} blocks but layer={cfg.layer!r} of a {cfg.layers}-layer tower uses {used}; "
            "the missing blocks cannot be recovered"
        )
    ref = sd.get("ln_final.weight")
    if ref is None:
        raise ValueError("state dict has no ln_final.weight; not an OpenCLIP text tower")
    w, h = cfg.width, cfg.width * cfg.mlp_ratio
    like = {"dtype": ref.dtype, "device": ref.device}
    shapes = {
        "ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
        "mlp.c_fc.weight": (h, w), "mlp.c_fc.bias": (h,), "mlp.c_proj.weight": (w, h), "mlp.c_proj.bias": (w,),
    }
    out = dict(sd)
    filled: list[str] = []
    for key in openclip_unrecoverable_keys(cfg, n):
        if key in out:
            continue
        if key == "text_projection":
            value = torch.zeros(w, cfg.projection_dim or w, **like)
        elif key == "logit_scale":
            value = torch.tensor(math.log(1 / 0.07), **like)
        else:
            rest = key.split(".", 3)[3]
            # LayerNorm gains of 1 keep it an ordinary block; zero out_proj/c_proj make it identity
            make = torch.ones if rest in ("ln_1.weight", "ln_2.weight") else torch.zeros
            value = make(shapes[rest], **like)
        out[key] = value
        filled.append(key)
    return out, filled
