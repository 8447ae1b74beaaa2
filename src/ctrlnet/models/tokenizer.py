"""The CLIP byte-level BPE tokenizer, offline, with the vocabulary shipped as package data.

One tokenizer serves both Stable Diffusion families; they differ only in padding:

- SD1 (``openai/clip-vit-large-patch14`` through HF ``CLIPTokenizer``) pads with EOS (``pad="eos"``);
- SD2 (``open_clip.tokenize``) pads with 0 (``pad="zero"``).

Both truncate to ``BOS + 75 tokens + EOS``. Text is cleaned the way the original tokenizers did it
with ``ftfy`` installed (as it was: ``open_clip_torch`` depends on it), minus mojibake repair:
HTML entities are unescaped, curly quotes straightened, Latin ligatures and full-width forms
unfolded, control characters dropped, NFC applied, whitespace collapsed, and the text lower-cased
with Python's ``str.lower`` (which, like the originals, writes a word-final Greek sigma as "ς").
For text without those characters the ids equal those of transformers' (fast) ``CLIPTokenizer``;
the pre-tokenizer is written out with ``unicodedata`` so neither ``ftfy`` nor ``regex`` is needed.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, Sequence

import torch

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
CHUNK_TOKENS = 75  # text tokens per 77-token window
VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges, as in the original vocab construction
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

Pad = Literal["eos", "zero"]


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character (the byte-level BPE alphabet).

    Insertion order is the id order of the first 256 vocabulary entries: the printable bytes map
    to themselves and come first, then the others in byte order, mapped to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return table


def default_vocab_path():
    """The shipped ``bpe_simple_vocab_16e6.txt.gz`` (a Traversable usable with ``open``)."""
    return resources.files("ctrlnet").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz")


@lru_cache(maxsize=4)
def load_bpe(path: str | None = None) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read the BPE file into ``(encoder, merge_ranks)``; cached, so many tokenizers share it.

    The id layout is the original one: 256 byte symbols, the same with ``</w>``, one id per merge
    (in rank order), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    src = default_vocab_path() if path is None else Path(path)
    with src.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    # line 0 is a header; the file holds more merges than the 49408-token vocabulary uses
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{src}: not a CLIP BPE merges file")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIALS)
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != VOCAB_SIZE:
        raise ValueError(f"{src}: vocabulary has {len(encoder)} distinct tokens, expected {VOCAB_SIZE}")
    ranks = {m: i for i, m in enumerate(merges)}
    return encoder, ranks


def _clean_table() -> dict[int, str | None]:
    """``str.translate`` table for ftfy's default character fixes that matter for prompts."""
    table: dict[int, str | None] = {}
    # fix_character_width: full-width ASCII and half-width forms, plus the ideographic space
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    # fix_latin_ligatures
    ligatures = {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
        "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    }
    table.update({ord(k): v for k, v in ligatures.items()})
    # uncurl_quotes
    for cp in [0x02BC, *range(0x2018, 0x201C)]:
        table[cp] = "'"
    for cp in range(0x201C, 0x2020):
        table[cp] = '"'
    # remove_control_chars (keeps \t \n \f \r, which become spaces below)
    for cp in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
               0xFEFF, *range(0xFFF9, 0xFFFD)]:
        table[cp] = None
    return table


_CLEAN = _clean_table()


def clean_text(text: str) -> str:
    """ftfy-like cleanup, whitespace collapse and lower-casing, applied before BPE."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(_CLEAN))
    # after control-character removal str.split() splits on exactly Unicode White_Space
    return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'P' anything else (punctuation, symbols, emoji)."""
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "P"


def pretokenize(text: str) -> list[str]:
    """Split cleaned text like CLIP's regex: specials | contractions | letters+ | one digit |
    runs of other non-space characters. Written out by hand so no ``regex`` module is needed."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
        if special:
            out.append(special)
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction:
            out.append(contraction)
            i += len(contraction)
            continue
        kind = _kind(text[i])
        if kind == "S":
            i += 1
            continue
        if kind == "N":  # numbers are split into single characters
            out.append(text[i])
            i += 1
            continue
        j = i + 1
        while j < n and _kind(text[j]) == kind:
            j += 1
        out.append(text[i:j])
        i = j
    return out


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length id tensors for the text encoders.

    Args:
        max_length: window length including BOS/EOS (77 for every SD checkpoint).
        vocab_path: a ``bpe_simple_vocab_16e6.txt.gz``; default is the copy shipped with ctrlnet.
    """

    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, max_length: int = 77, vocab_path: str | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.max_length = max_length
        self.encoder, self.ranks = load_bpe(vocab_path)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already mapped to the byte alphabet)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            # merge the best-ranked adjacent pair everywhere it occurs
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged: list[str] = []
            k = 0
            while k < len(parts):
                if k + 1 < len(parts) and parts[k] == best[0] and parts[k + 1] == best[1]:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        ids: list[int] = []
        for token in pretokenize(clean_text(text)):
            if token in _SPECIALS:
                ids.append(self.encoder[token])
            else:
                ids.extend(self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (cleaned and lower-cased, as encoded); specials appear verbatim."""
        out = bytearray()
        for i in ids:
            tok = self.decoder[int(i)]
            if tok in _SPECIALS:
                out += tok.encode() + b" "
                continue
            end = tok.endswith("</w>")
            out += bytes(self.byte_decoder[c] for c in (tok[:-4] if end else tok))
            if end:  # word end: the space the pre-tokenizer removed
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def _window(self, body: list[int], pad: Pad) -> list[int]:
        """BOS + body (at most max_length-2 ids) + EOS, padded to max_length."""
        body = body[: self.max_length - 2]
        ids = [BOS_ID, *body, EOS_ID]
        fill = EOS_ID if pad == "eos" else 0
        return ids + [fill] * (self.max_length - len(ids))

    def __call__(self, texts: str | Sequence[str], pad: Pad = "eos") -> torch.Tensor:
        """Fixed-length ids, truncated to BOS + 75 + EOS: ``(B, max_length)`` int64.

        ``pad="eos"`` matches SD1 (HF CLIPTokenizer), ``pad="zero"`` matches SD2 (open_clip).
        """
        if pad not in ("eos", "zero"):
            raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._window(self.encode(t), pad) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def chunks(self, text: str, n_chunks: int = 3, pad: Pad = "eos") -> list[list[int]]:
        """Long-prompt windows: the ids cut into pieces of 75, each wrapped in BOS/EOS and padded.

        Gives between 1 (also for an empty prompt) and ``n_chunks`` windows; ids beyond
        ``75 * n_chunks`` are dropped, as in ControlNet 1.1's anime-lineart CLIP hack and A1111.
        """
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
        if pad not in ("eos", "zero"):
            raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
        ids = self.encode(text)
        step = self.max_length - 2
        count = min(n_chunks, max(1, -(-len(ids) // step)))
        return [self._window(ids[k * step : (k + 1) * step], pad) for k in range(count)]

    def empty_chunk(self, pad: Pad = "eos") -> list[int]:
        """The window of an empty prompt, used to pad chunked batches."""
        return self._window([], pad)
