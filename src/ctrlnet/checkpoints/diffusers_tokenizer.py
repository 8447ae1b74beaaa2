"""The ``tokenizer/`` folder of a diffusers pipeline: transformers' ``CLIPTokenizer`` files written
from the BPE vocabulary ctrlnet ships, with the settings that give ctrlnet's ids for each family.

- ``vocab.json``: token -> id in CLIP's layout (256 byte symbols, the same with ``</w>``, one token per
  merge in rank order, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407);
- ``merges.txt``: the merges in rank order, under the ``#version: 0.2`` header;
- ``tokenizer_config.json`` / ``special_tokens_map.json``: 77 tokens, lower-casing, and the padding
  token of the family: ``<|endoftext|>`` for SD1 (``openai/clip-vit-large-patch14``), ``!`` (id 0)
  for SD2, whose open_clip tokenizer pads with zeros (as ``stabilityai/stable-diffusion-2-1``'s
  ``tokenizer/`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

from ctrlnet.models.tokenizer import BOS_ID, EOS_ID, Pad, load_bpe

PAD_TOKEN = {"eos": "<|endoftext|>", "zero": "!"}


def write_tokenizer(folder: Path, pad: Pad, max_length: int = 77) -> Path:
    """Write the four tokenizer files into ``folder`` (created); returns ``folder``."""
    if pad not in PAD_TOKEN:
        raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
    encoder, ranks = load_bpe()
    if encoder["<|startoftext|>"] != BOS_ID or encoder["<|endoftext|>"] != EOS_ID:
        raise ValueError("the shipped vocabulary does not have CLIP's special-token ids")
    merges = sorted(ranks, key=ranks.get)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": PAD_TOKEN[pad]}
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=max_length, do_lower_case=True,
                  errors="replace", add_prefix_space=False, clean_up_tokenization_spaces=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder
