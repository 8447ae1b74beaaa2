"""The text towers that turn prompts into the UNet's cross-attention context.

- ``kind="clip"`` (SD1): the HF ``CLIPTextModel`` layout. State-dict keys equal the original
  checkpoint keys with ``cond_stage_model.transformer.`` stripped (``text_model.encoder.layers.0...``).
- ``kind="openclip"`` (SD2): the open_clip text tower of ``FrozenOpenCLIPEmbedder``. Keys equal the
  original keys with ``cond_stage_model.model.`` stripped (``transformer.resblocks.0.attn.in_proj_weight``).

Both are pre-LayerNorm causal transformers; ``layer="penultimate"`` runs all but the last block and
then applies the final LayerNorm (SD2's FrozenOpenCLIPEmbedder, and "CLIP skip 2" for SD1 as in
A1111/ComfyUI and ControlNet 1.1's anime-lineart model).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctrlnet.config import TextEncoderConfig
from ctrlnet.models.tokenizer import CLIPTokenizer, Pad

# Key suffixes some official checkpoints carry that hold no learned state (transformers <4.31 saved
# the position_ids buffer). The checkpoint loader may ignore them; we compute positions on the fly.
HARMLESS_KEYS: tuple[str, ...] = ("text_model.embeddings.position_ids",)

Layer = Literal["last", "penultimate"]

_LN_EPS = 1e-5  # both HF CLIP and open_clip


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation (SD1's text tower)."""
    return x * torch.sigmoid(1.702 * x)


def _act(name: str):
    acts = {"quick_gelu": quick_gelu, "gelu": F.gelu}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(acts)}")
    return acts[name]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention on ``(B, L, C)`` projections; returns ``(B, L, C)``."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, c)


def _check_cfg(cfg: TextEncoderConfig) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.layers < 1 or (cfg.layer == "penultimate" and cfg.layers < 2):
        raise ValueError(f"layer={cfg.layer!r} needs more than {cfg.layers} layer(s)")
    _act(cfg.act)


# --- SD1: HF CLIPTextModel layout ----------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = _act(act)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: str):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=_LN_EPS)
        self.mlp = CLIPMLP(width, hidden, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _normal_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    # A meta-built model (the loaders') has nothing to initialise, and normal_ on meta imports
    # torch._dynamo the first time it runs: seconds of every model load.
    return t if t.is_meta else nn.init.normal_(t, std=std)


def _embedding(num: int, width: int, std: float = 1.0) -> nn.Embedding:
    """``nn.Embedding(num, width)`` with its N(0, std^2) weights (the same draws), none on meta."""
    return nn.Embedding(num, width, _weight=_normal_(torch.empty(num, width), std))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg.width, cfg.heads, cfg.width * cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers)
        )


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        # read as rows by CLIPTextEncoder (no position_ids buffer: a meta-built model loaded with
        # assign=True keeps no uninitialised tensors)
        self.position_embedding = _embedding(cfg.max_length, cfg.width)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=_LN_EPS)


# --- SD2: open_clip layout -----------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter names (packed q/k/v), computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = _act(act)
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=_LN_EPS)
        self.attn = OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=_LN_EPS)
        self.mlp = OpenCLIPMLP(width, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.width * cfg.mlp_ratio, cfg.act)
            for _ in range(cfg.layers)
        )


# --- the encoders --------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Prompts -> context ``(B, 77, width)``. Subclasses own the weights under checkpoint names.

    Build with :func:`build_text_encoder`. ``state_dict()`` keys are the original checkpoint keys
    with the ``cond_stage_model.transformer.`` (SD1) / ``cond_stage_model.model.`` (SD2) prefix
    stripped; ``.tokenizer`` is a plain attribute and holds no state.
    """

    pad: Pad = "eos"

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        _check_cfg(cfg)
        self.cfg = cfg
        self.tokenizer = CLIPTokenizer(max_length=cfg.max_length)

    # subclasses: token table, positions, blocks, final LN
    def _token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def _positions(self, n: int) -> torch.Tensor:
        """The first ``n`` rows of the position embedding, ``(n, width)``."""
        raise NotImplementedError

    def _blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._final_norm().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._final_norm().weight.dtype

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token-table rows of ``ids`` ``(B, L)`` -> ``(B, L, width)``, before positions are added.

        Callers may replace rows (textual-inversion vectors) and pass the result to
        :meth:`encode_embeds`; this is the tower's only input hook, no module is patched.
        """
        return self._token_embedding()(ids.to(self.device))

    def encode_embeds(self, token_embeds: torch.Tensor, layer: Layer | None = None) -> torch.Tensor:
        """Context from token embeddings ``(B, L<=77, width)`` (as :meth:`embed_tokens` gives) ->
        ``(B, L, width)``: positions added, blocks run, final LayerNorm applied.

        ``layer`` overrides ``cfg.layer``: ``"last"`` = final LN of the last block's output,
        ``"penultimate"`` = final LN of the output of all blocks but the last.
        """
        layer = self.cfg.layer if layer is None else layer
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        c = self.cfg
        if token_embeds.ndim != 3 or token_embeds.shape[1] > c.max_length or token_embeds.shape[2] != c.width:
            raise ValueError(f"token embeddings must be (B, L<={self.cfg.max_length}, {self.cfg.width}), "
                             f"got {tuple(token_embeds.shape)}")
        blocks = self._blocks()
        n = len(blocks) - (1 if layer == "penultimate" else 0)
        x = token_embeds.to(self.device, self.dtype) + self._positions(token_embeds.shape[1])  # (B, L, C)
        for block in blocks[:n]:
            x = block(x)
        return self._final_norm()(x)

    def encode_ids(self, ids: torch.Tensor, layer: Layer | None = None) -> torch.Tensor:
        """Context from token ids ``(B, L<=77)`` -> ``(B, L, width)`` (see :meth:`encode_embeds`)."""
        if ids.ndim != 2 or ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"ids must be (B, L<={self.cfg.max_length}), got {tuple(ids.shape)}")
        return self.encode_embeds(self.embed_tokens(ids), layer)

    def forward(self, texts: str | Sequence[str], layer: Layer | None = None) -> torch.Tensor:
        """Context for prompts: ``(B, 77, width)``; prompts longer than 75 tokens are truncated and
        emphasis is not parsed. Prompts as users write them go through
        :func:`ctrlnet.generation.prompts.encode_prompts` (any length, A1111 emphasis, embeddings)."""
        return self.encode_ids(self.tokenizer(texts, pad=self.pad), layer)


class CLIPTextEncoder(TextEncoder):
    """SD1 tower (``kind="clip"``): ``text_model.{embeddings,encoder,final_layer_norm}``; pads with EOS."""

    pad: Pad = "eos"

    def __init__(self, cfg: TextEncoderConfig):
        if cfg.kind != "clip":
            raise ValueError(f"CLIPTextEncoder needs kind='clip', got {cfg.kind!r}")
        super().__init__(cfg)
        self.text_model = CLIPTextTransformer(cfg)

    def _token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def _positions(self, n: int) -> torch.Tensor:
        return self.text_model.embeddings.position_embedding.weight[:n]

    def _blocks(self) -> Sequence[nn.Module]:
        return self.text_model.encoder.layers

    def _final_norm(self) -> nn.Module:
        return self.text_model.final_layer_norm


class OpenCLIPTextEncoder(TextEncoder):
    """SD2 tower (``kind="openclip"``): open_clip's text half of ``CLIP``; pads with 0.

    ``text_projection`` ``(width, projection_dim)`` and ``logit_scale`` are kept so original
    checkpoints load with nothing left over; SD does not use them.
    """

    pad: Pad = "zero"

    def __init__(self, cfg: TextEncoderConfig):
        if cfg.kind != "openclip":
            raise ValueError(f"OpenCLIPTextEncoder needs kind='openclip', got {cfg.kind!r}")
        super().__init__(cfg)
        proj = cfg.projection_dim or cfg.width  # open_clip's embed_dim; 0 in the config means "width"
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=_LN_EPS)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, proj))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # open_clip's initialisation, for randomly built models
        _normal_(self.token_embedding.weight, std=0.02)
        _normal_(self.positional_embedding, std=0.01)
        _normal_(self.text_projection, std=cfg.width**-0.5)

    def _token_embedding(self) -> nn.Embedding:
        return self.token_embedding

    def _positions(self, n: int) -> torch.Tensor:
        return self.positional_embedding[:n]

    def _blocks(self) -> Sequence[nn.Module]:
        return self.transformer.resblocks

    def _final_norm(self) -> nn.Module:
        return self.ln_final


def build_text_encoder(
    cfg: TextEncoderConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> TextEncoder:
    """Build the tower for ``cfg.kind`` on ``device`` (default ``meta``: no memory, load weights
    with ``load_state_dict(sd, assign=True)``); on a real device weights are random."""
    classes = {"clip": CLIPTextEncoder, "openclip": OpenCLIPTextEncoder}
    if cfg.kind not in classes:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}; expected one of {sorted(classes)}")
    with torch.device(device):
        model = classes[cfg.kind](cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
