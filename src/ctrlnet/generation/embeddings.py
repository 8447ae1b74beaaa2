"""Textual-inversion embeddings: vectors that stand in for a word in the prompt.

A file's name (without its extension) is the word: ``easynegative.pt`` is used by writing
``easynegative`` in a prompt, also inside emphasis (``(easynegative:0.8)``), as in A1111. Where the
word's tokens appear, the embedding's ``n`` vectors replace them in the token embeddings: an
``n``-vector embedding takes ``n`` positions of its 75-token window
(:mod:`ctrlnet.generation.prompts` places them; the text encoder only receives token embeddings).

Formats read (A1111 ``modules/textual_inversion``):

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "string_to_token": ..., "name": ..., "step": ...}``
  (older files pickled ``string_to_param`` as a ``torch.nn.ParameterDict``; read too);
- ``.safetensors`` with ``emb_params`` (kohya's trainers) or any single tensor;
- diffusers ``learned_embeds.bin``: ``{"<token>": (D,) or (n, D)}`` with one entry.

Pickles are read with ``torch.load(weights_only=True)``: no code from a file runs. An embedding
trained for another text encoder (768 wide for SD1's CLIP ViT-L, 1024 for SD2's OpenCLIP ViT-H,
SDXL's ``clip_l``/``clip_g`` pairs) is refused by name when it is used with a model.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.checkpoints.io import CheckpointError, read_checkpoint
from ctrlnet.models.tokenizer import CHUNK_TOKENS, CLIPTokenizer

SUFFIXES = (".pt", ".bin", ".safetensors")
FAMILIES = {768: "SD1.x, CLIP ViT-L/14", 1024: "SD2.x, OpenCLIP ViT-H/14", 1280: "SDXL, OpenCLIP ViT-bigG"}


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message names the file or the embedding."""


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class Embedding:
    """One textual-inversion embedding.

    Attributes:
        name: the word that calls it in a prompt (the file name without extension).
        vectors: ``(n, width)`` float32 on the CPU, ``1 <= n <= 75``.
        source: where it was read from (for messages).
    """

    name: str
    vectors: torch.Tensor
    source: str = ""

    def __post_init__(self):
        v = self.vectors
        where = f"embedding {self.name!r}" + (f" ({self.source})" if self.source else "")
        if not self.name.strip():
            raise EmbeddingError(f"{where}: the name is empty")
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise EmbeddingError(f"{where}: expected a float tensor of shape (vectors, width), got "
                                 f"{type(v).__name__} {tuple(getattr(v, 'shape', ()))}")
        if not 1 <= v.shape[0] <= CHUNK_TOKENS:
            raise EmbeddingError(f"{where} has {v.shape[0]} vectors; one 75-token window holds 1 to {CHUNK_TOKENS}")
        if not torch.isfinite(v).all():
            raise EmbeddingError(f"{where} contains NaN or infinite values")

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def _family(width: int) -> str:
    return f"{width} wide" + (f", {FAMILIES[width]}" if width in FAMILIES else "")


def embedding_from_data(data, name: str, source: str = "") -> Embedding:
    """Build an :class:`Embedding` from a loaded file's content (A1111 ``.pt`` dict, a safetensors
    state dict or a diffusers ``{token: tensor}``); raises :class:`EmbeddingError` naming ``source``."""
    where = source or name
    if not isinstance(data, Mapping) or not data:
        raise EmbeddingError(f"{where}: not a textual-inversion embedding (found {type(data).__name__})")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):  # pickled by torch 1.11
            params = dict(vars(params).get("_parameters") or {})
        if not isinstance(params, Mapping) or len(params) != 1:
            n = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise EmbeddingError(f"{where}: 'string_to_param' must hold exactly one term, found {n}")
        vec = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(f"{where}: an SDXL embedding (clip_l + clip_g vectors); "
                             "SD1.x and SD2.x models need one set of vectors of their own width")
    else:  # diffusers {token: tensor}, safetensors {"emb_params": tensor}
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise EmbeddingError(f"{where}: expected one tensor (an A1111 'string_to_param', 'emb_params' or a "
                                 f"diffusers {{token: tensor}}), found {len(tensors)}: {sorted(map(str, tensors))[:8]}")
        vec = next(iter(tensors.values()))
    if not isinstance(vec, torch.Tensor):
        raise EmbeddingError(f"{where}: the embedding is a {type(vec).__name__}, not a tensor")
    vec = vec.detach()
    if vec.ndim == 1:  # one vector stored flat (diffusers)
        vec = vec[None]
    if vec.is_floating_point():
        vec = vec.to("cpu", torch.float32)
    return Embedding(name, vec, source)


def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_embedding(path, name: str | None = None) -> Embedding:
    """Read one embedding file (format sniffed from content); ``name`` defaults to the file stem.

    Raises :class:`EmbeddingError` naming the file: missing, empty, truncated, not an embedding,
    several terms, or a pickle holding anything but tensors and plain values.
    """
    path = Path(path)
    name = path.stem if name is None else name
    if not path.is_file():
        raise EmbeddingError(f"no embedding file at {path}")
    if path.stat().st_size == 0:
        raise EmbeddingError(f"{path}: the file is empty")
    if path.suffix.lower() in (".png", ".webp", ".jxl", ".avif"):
        raise EmbeddingError(f"{path}: embeddings stored inside images are not supported; use the .pt or "
                             ".safetensors file")
    if _is_safetensors(path):
        try:
            data = read_checkpoint(path).state_dict
        except CheckpointError as e:
            raise EmbeddingError(str(e)) from None
        return embedding_from_data(data, name, str(path))
    try:
        # ParameterDict: A1111 files written by torch 1.11 pickled one; it is torch's own class and
        # rebuilding it runs no code from the file
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the global it refused
        if found:
            raise EmbeddingError(f"{path}: refused: the pickle refers to {found.group(1)}, not only tensors and plain "
                                 "values, and loading it would run code") from None
        raise EmbeddingError(f"{path}: not a readable embedding file (a damaged or foreign pickle)") from None
    except Exception as e:  # torch.load raises many types on junk (zip, EOF, ...)
        raise EmbeddingError(f"{path}: not a readable embedding file, or truncated "
                             f"({e.__class__.__name__}: {e})") from None
    return embedding_from_data(data, name, str(path))


def load_embeddings(paths: str | Path | Iterable[str | Path]) -> dict[str, Embedding]:
    """Embeddings from files and folders (a folder gives its ``.pt``/``.bin``/``.safetensors``
    files, as A1111's ``embeddings/`` folder; other files there, such as preview images, are
    skipped). Returns ``{name: Embedding}``; two files with one name are refused."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        else:
            files.append(p)
    out: dict[str, Embedding] = {}
    for f in files:
        emb = load_embedding(f)
        if emb.name in out:
            raise EmbeddingError(f"two embeddings are called {emb.name!r}: {out[emb.name].source} and {f}")
        out[emb.name] = emb
    return out


class EmbeddingIndex:
    """Embeddings looked up by the token ids of their names, for one tokenizer and text width.

    Built once per encoding call; refuses (naming it) an embedding of another width or whose
    name gives no tokens. Where two names start alike, the longest match wins (A1111).
    """

    def __init__(self, embeddings: Mapping[str, Embedding] | Sequence[Embedding], tokenizer: CLIPTokenizer,
                 width: int):
        items = list(embeddings.values()) if isinstance(embeddings, Mapping) else list(embeddings)
        self._by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        for emb in items:
            if not isinstance(emb, Embedding):
                raise TypeError(f"expected Embedding objects, got {type(emb).__name__}")
            if emb.width != width:
                raise EmbeddingError(
                    f"embedding {emb.name!r} ({emb.source or 'in memory'}) has vectors {_family(emb.width)}; this "
                    f"model's text encoder is {_family(width)}: the embedding was trained for another model family"
                )
            ids = tokenizer.encode(emb.name)
            if not ids:
                raise EmbeddingError(f"embedding name {emb.name!r} gives no tokens, so no prompt can call it")
            group = self._by_first.setdefault(ids[0], [])
            group.append((ids, emb))
            group.sort(key=lambda t: len(t[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._by_first)

    def match(self, tokens: Sequence[int], pos: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at ``tokens[pos]``, and how many ids the name spans."""
        for ids, emb in self._by_first.get(tokens[pos], ()):
            if list(tokens[pos : pos + len(ids)]) == ids:
                return emb, len(ids)
        return None
