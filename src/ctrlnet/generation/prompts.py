"""Prompts as A1111 users write them -> the UNet's cross-attention context.

The behaviour follows AUTOMATIC1111's stable-diffusion-webui (``modules/prompt_parser.py``
``parse_prompt_attention``, ``modules/sd_hijack_clip.py`` ``tokenize_line``/``process_tokens``,
``modules/sd_emphasis.py`` "Original" emphasis, ``modules/extra_networks.py``), with its default
options:

1. **Emphasis** (:func:`parse_prompt_attention`): ``(a)`` x1.1, ``((a))`` x1.21, ``(a:1.3)`` x1.3,
   ``[a]`` x(1/1.1), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` literal characters, unclosed brackets
   apply to the end of the prompt; ``BREAK`` (upper case, a word on its own) ends the current
   window. The prompt becomes ``(text, weight)`` fragments.
2. **Windows** (:func:`tokenize_prompt`): each fragment is tokenized on its own; tokens fill
   75-token windows, as many as the prompt needs. When a window is full and a comma lies within
   the last 20 tokens, the text after that comma moves to the next window (A1111's
   ``comma_padding_backtrack=20``). Each window is ``[BOS] + 75 tokens + [EOS]``, padded with EOS
   (SD1) or, after the first EOS, with 0 (SD2, open_clip).
3. **Encoding** (:func:`encode_prompts`): every window goes through the text encoder on its own;
   its output is multiplied position-wise by the weights and rescaled so its mean is what it was
   (``z *= w; z *= old_mean / new_mean``), and the windows are concatenated along the sequence:
   ``(B, 77 * k, width)``. The conditional and unconditional batches get the same ``k``: shorter
   prompts are padded with empty windows (A1111's ``pad_cond_uncond``).

Textual-inversion embeddings (:mod:`ctrlnet.generation.embeddings`) are found by their names'
tokens in each fragment and take as many window positions as they have vectors.

Where this differs from A1111, on purpose: the mean is restored per prompt and window (A1111
takes it over the batch it encodes together, which is one prompt in normal use); an
embedding moved to the next window by the comma rule moves with its vectors (A1111 leaves them
behind); different prompts in one batch are padded with empty windows too (A1111 repeats the
last vector there); a prompt longer than ``max_chunks`` windows is refused instead of encoded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ctrlnet.generation.embeddings import Embedding, EmbeddingIndex
from ctrlnet.models.tokenizer import BOS_ID, CHUNK_TOKENS, EOS_ID, CLIPTokenizer, Pad

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by this constant (not a division by 1.1)
BREAK_WEIGHT = -1.0  # A1111 marks a BREAK as the fragment ("BREAK", -1.0)
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack
MAX_CHUNKS = 32  # 2400 tokens; longer prompts are refused before encoding
EMBEDDING_PLACEHOLDER_ID = 0  # the id under an embedding's vectors (replaced before the encoder sees it)

Fragment = tuple[str, float]

_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT_CLOSE_RE = re.compile(r":([+-]?[.\d]+)\)")  # ":1.3)" closes a round bracket with a weight
_SPECIAL = frozenset("\\()[]:")


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split a prompt into ``(text, weight)`` fragments (A1111 ``parse_prompt_attention``).

    ``BREAK`` outside any bracket gives the fragment ``("BREAK", -1.0)``; inside brackets it is
    scaled like any text and ends up an ordinary word, as in A1111. Adjacent fragments of equal
    weight are merged; an empty prompt gives ``[("", 1.0)]``. Raises ``ValueError`` for a weight
    that is not a number (``(a:1.2.3)``).

    Example: ``"a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."`` ->
    ``[("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
    (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]`` (weights rounded here).
    """
    out: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index in `out` where each open bracket starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    def add_text(piece: str) -> None:
        for k, part in enumerate(_BREAK_RE.split(piece)):
            if k:
                out.append(["BREAK", BREAK_WEIGHT])
            out.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in "()[]\\":
                out.append([nxt, 1.0])
                i += 2
            else:  # a lone backslash is dropped (it leaves an empty fragment, as in A1111)
                out.append(["", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(out))
            i += 1
        elif c == "[":
            square_open.append(len(out))
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE_RE.match(text, i)
            if m is None:
                add_text(":")
                i += 1
            elif round_open:
                try:
                    w = float(m.group(1))
                except ValueError:
                    raise ValueError(f"emphasis weight {m.group(1)!r} in the prompt is not a number "
                                     f"(at {text[max(0, i - 20) : m.end()]!r})") from None
                scale(round_open.pop(), w)
                i = m.end()
            else:  # no bracket to close: plain text
                add_text(m.group(0))
                i = m.end()
        elif c == ")":
            if round_open:
                scale(round_open.pop(), ROUND_MULTIPLIER)
            else:
                add_text(")")
            i += 1
        elif c == "]":
            if square_open:
                scale(square_open.pop(), SQUARE_MULTIPLIER)
            else:
                add_text("]")
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    # unclosed brackets reach to the end of the prompt
    for start in round_open:
        scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale(start, SQUARE_MULTIPLIER)
    if not out:
        return [("", 1.0)]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def is_break(fragment: Fragment) -> bool:
    return fragment[0] == "BREAK" and fragment[1] == BREAK_WEIGHT


@dataclass
class PromptChunk:
    """One 77-token window of a prompt.

    Attributes:
        ids: 77 token ids: BOS, up to 75 prompt tokens, EOS, padding.
        weights: 77 emphasis multipliers (1.0 at BOS, EOS and padding).
        inserts: ``(position, embedding)``: the embedding's vectors replace the token embeddings
            at ``position .. position + n - 1`` (positions count BOS).
    """

    ids: list[int]
    weights: list[float]
    inserts: list[tuple[int, Embedding]] = field(default_factory=list)


def _window(body: list[int], weights: list[float], inserts, pad: Pad) -> PromptChunk:
    fill = CHUNK_TOKENS + 1 - len(body)  # EOS, then padding up to 77
    ids = [BOS_ID, *body] + [EOS_ID] * fill
    if pad == "zero":  # open_clip pads with 0 after the first EOS (A1111 process_tokens for SD2)
        first = ids.index(EOS_ID)
        ids = ids[: first + 1] + [0] * (len(ids) - first - 1)
    return PromptChunk(ids, [1.0, *weights] + [1.0] * fill, [(p + 1, e) for p, e in inserts])


def empty_chunk(pad: Pad = "eos") -> PromptChunk:
    """The window of an empty prompt (what shorter prompts are padded with)."""
    return _window([], [], [], pad)


def tokenize_prompt(tokenizer: CLIPTokenizer, prompt: str, *, pad: Pad = "eos",
                    embeddings: EmbeddingIndex | None = None,
                    comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """A prompt's windows (A1111 ``tokenize_line``): at least one, as many as the tokens need.

    ``comma_backtrack`` (tokens; 0 turns it off): when a window is full and its last comma is at
    most this many tokens back, the tokens after that comma start the next window. An embedding
    that does not fit in the current window starts the next one.
    """
    if pad not in ("eos", "zero"):
        raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
    if comma_backtrack < 0:
        raise ValueError(f"comma_backtrack must be >= 0, got {comma_backtrack}")
    comma = tokenizer.encoder[",</w>"]
    chunks: list[PromptChunk] = []
    body: list[int] = []
    weights: list[float] = []
    inserts: list[tuple[int, Embedding]] = []  # positions in `body`
    last_comma = -1

    def close() -> None:
        nonlocal body, weights, inserts, last_comma
        chunks.append(_window(body, weights, inserts, pad))
        body, weights, inserts, last_comma = [], [], [], -1

    for frag in parse_prompt_attention(prompt):
        if is_break(frag):
            close()
            continue
        text, weight = frag
        tokens = tokenizer.encode(text)
        pos = 0
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == comma:
                last_comma = len(body)
            elif (comma_backtrack and len(body) == CHUNK_TOKENS and last_comma != -1
                  and len(body) - last_comma <= comma_backtrack):
                cut = last_comma + 1  # the text after the comma moves to the next window
                moved = (body[cut:], weights[cut:], [(p - cut, e) for p, e in inserts if p >= cut])
                body, weights, inserts = body[:cut], weights[:cut], [(p, e) for p, e in inserts if p < cut]
                close()
                body, weights, inserts = moved
            if len(body) == CHUNK_TOKENS:
                close()
            found = embeddings.match(tokens, pos) if embeddings else None
            if found is None:
                body.append(tok)
                weights.append(weight)
                pos += 1
                continue
            emb, n_ids = found
            if len(body) + emb.num_vectors > CHUNK_TOKENS:
                close()
            inserts.append((len(body), emb))
            body += [EMBEDDING_PLACEHOLDER_ID] * emb.num_vectors
            weights += [weight] * emb.num_vectors
            pos += n_ids
    if body or not chunks:
        close()
    return chunks


def _encode_windows(text_encoder, chunks: list[PromptChunk], layer) -> torch.Tensor:
    """Encode windows ``(R, 77, width)`` with embeddings inserted and emphasis applied."""
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long)  # (R, 77)
    if any(c.inserts for c in chunks):
        embeds = text_encoder.embed_tokens(ids)  # (R, 77, C)
        for r, c in enumerate(chunks):
            for p, emb in c.inserts:
                embeds[r, p : p + emb.num_vectors] = emb.vectors.to(embeds.device, embeds.dtype)
        z = text_encoder.encode_embeds(embeds, layer)
    else:
        z = text_encoder.encode_ids(ids, layer)
    w = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=z.device)  # (R, 77)
    rows = (w != 1.0).any(dim=1)  # windows without emphasis are left as they are (the factor is exactly 1)
    if rows.any():
        zw = z[rows].float()  # (r, 77, C), in fp32 whatever the encoder's dtype
        old_mean = zw.mean(dim=(1, 2), keepdim=True)
        zw = zw * w[rows][:, :, None]
        new_mean = zw.mean(dim=(1, 2), keepdim=True)
        # a zero mean (weights that cancel) would give NaN; such a window is left unrescaled
        zw = zw * torch.where(new_mean == 0, 1.0, old_mean / new_mean)
        z = z.clone()
        z[rows] = zw.to(z.dtype)
    return z


def encode_prompts(text_encoder, cond: Sequence[str], uncond: Sequence[str], *, clip_skip: int = 1,
                   min_chunks: int = 1, embeddings: Mapping[str, Embedding] | Sequence[Embedding] | None = None,
                   comma_backtrack: int = COMMA_BACKTRACK, max_chunks: int = MAX_CHUNKS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts for a batch of prompts and negative prompts, A1111-style (see the module doc).

    Args:
        text_encoder: a :class:`ctrlnet.models.text_encoder.TextEncoder` (SD1 CLIP or SD2 OpenCLIP).
        cond, uncond: ``B`` prompts and ``B`` negative prompts (``B >= 1``).
        clip_skip: 1 = the model's own layer; 2 = the penultimate layer (A1111 "Clip skip"; SD2
            already uses it).
        min_chunks: at least this many windows (3 for ControlNet 1.1's anime line-art model).
        embeddings: textual-inversion embeddings, called by name in the prompts.
        comma_backtrack: see :func:`tokenize_prompt`; 0 cuts windows every 75 tokens exactly.
        max_chunks: refuse prompts needing more windows than this.

    Returns:
        ``(cond, uncond)``, each ``(B, 77 * k, width)`` in the encoder's dtype, on its device, with
        the same ``k >= min_chunks``.

    Raises:
        ValueError: bad arguments, a prompt longer than ``max_chunks`` windows, an emphasis weight
            that is not a number, an embedding of another width
            (:class:`~ctrlnet.generation.embeddings.EmbeddingError`).
    """
    cond, uncond = list(cond), list(uncond)
    if not cond or len(cond) != len(uncond):
        raise ValueError(f"need as many negative prompts as prompts (at least one), got {len(cond)} and {len(uncond)}")
    for p in cond + uncond:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    if clip_skip not in (1, 2):
        raise ValueError(f"clip_skip must be 1 or 2, got {clip_skip!r}")
    if not 1 <= min_chunks <= max_chunks:
        raise ValueError(f"need 1 <= min_chunks <= max_chunks, got {min_chunks} and {max_chunks}")
    tok = text_encoder.tokenizer
    index = EmbeddingIndex(embeddings, tok, text_encoder.cfg.width) if embeddings else None
    layer = "penultimate" if clip_skip == 2 else None

    unique = list(dict.fromkeys(cond + uncond))  # a batch repeats its prompt: encode each once
    windows = {p: tokenize_prompt(tok, p, pad=text_encoder.pad, embeddings=index, comma_backtrack=comma_backtrack)
               for p in unique}
    for p, ws in windows.items():
        if len(ws) > max_chunks:
            raise ValueError(f"a prompt needs {len(ws)} windows of {CHUNK_TOKENS} tokens; the limit is {max_chunks} "
                             f"({max_chunks * CHUNK_TOKENS} tokens). It begins: {p[:60]!r}")
    k = max(min_chunks, *(len(ws) for ws in windows.values()))
    empty = empty_chunk(text_encoder.pad)
    rows = [c for p in unique for c in windows[p] + [empty] * (k - len(windows[p]))]
    z = _encode_windows(text_encoder, rows, layer)  # (U*k, 77, C)
    z = z.reshape(len(unique), k * z.shape[1], z.shape[2])  # windows side by side along the sequence
    where = {p: i for i, p in enumerate(unique)}

    def pick(prompts: list[str]) -> torch.Tensor:
        return z[torch.tensor([where[p] for p in prompts], device=z.device)]

    return pick(cond), pick(uncond)


# --- <lora:NAME:WEIGHT> tags ------------------------------------------------------------------------

_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")  # A1111 extra_networks.re_extra_net
LORA_KINDS = ("lora", "lyco")  # "lyco" is A1111's alias for LyCORIS files, handled by the same loader
UNSUPPORTED_KINDS = ("hypernet",)


class LoraTag(NamedTuple):
    """A ``<lora:name:weight>`` tag: the LoRA's name (file stem) and its multiplier."""

    name: str
    weight: float


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{tag} in the prompt: {value!r} is not a number") from None


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove ``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` (and ``<lyco:...>``) tags from a prompt.

    As A1111 (``extra_networks.parse_prompt`` and the Lora extension): the weight defaults to 1.0;
    ``te=W``/``unet=W`` named values and a third positional value (the UNet weight) are read, and
    the tag is replaced by nothing (the text around it, commas included, stays as written, so the
    prompt encodes as in A1111). Tags are returned in prompt order, repeats included.

    Raises ``ValueError`` naming the tag for a weight that is not a number, an empty name,
    different text-encoder and UNet weights or ``dyn=`` (not supported here), unknown named
    values, and ``<hypernet:...>`` (hypernetworks are not supported). Other ``<word:...>`` text
    is left in the prompt.
    """
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        kind, args, tag = m.group(1), m.group(2), m.group(0)
        if kind in UNSUPPORTED_KINDS:
            raise ValueError(f"{tag} in the prompt: hypernetworks are not supported")
        if kind not in LORA_KINDS:
            return tag
        positional, named = [], {}
        for item in args.split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0].strip()] = parts[1]
            else:
                positional.append(item)
        name = positional[0].strip() if positional else ""
        if not name:
            raise ValueError(f"{tag} in the prompt has no LoRA name")
        unknown = set(named) - {"te", "unet"}
        if unknown:
            raise ValueError(f"{tag} in the prompt: unknown setting(s) {sorted(unknown)}; "
                             "write <lora:NAME:WEIGHT> (te= and unet= are also read)")
        if len(positional) > 3:
            raise ValueError(f"{tag} in the prompt: dynamic rank (dyn) is not supported; write <lora:NAME:WEIGHT>")
        te = _number(positional[1], tag) if len(positional) > 1 else 1.0
        te = _number(named["te"], tag) if "te" in named else te
        unet = _number(positional[2], tag) if len(positional) > 2 else te
        unet = _number(named["unet"], tag) if "unet" in named else unet
        if unet != te:
            raise ValueError(f"{tag} in the prompt: different text-encoder ({te}) and UNet ({unet}) weights are "
                             "not supported; give one weight")
        tags.append(LoraTag(name, te))
        return ""

    return _EXTRA_NETWORK_RE.sub(found, prompt), tags
