"""CLIP BPE tokenizer: hard-coded ids, parity with transformers' CLIPTokenizer, padding, chunks."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from ctrlnet.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    default_vocab_path,
    pretokenize,
)

PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "masterpiece, best quality, 1girl, (blue eyes:1.2), [smile], <lora:x:0.5>",
    "It's a dog's life; they're here, we'll see, I'm sure, you've got it, he'd say 'dog' isn't",
    "3.14159 + 2e10 = 2023-01-01 12:30pm #42 $100 50% 1,000,000",
    "café naïve Ünïcödé jalapeño résumé Straße",
    "日本語のテキスト 中文 한국어 русский текст العربية",
    "emoji 🎨🖌️👍🏽 and symbols ©®™ ♪ → ∞ ≠",
    "",
    "     ",
    "multiple    spaces\tand\ttabs\nand\nnew lines  ",
    "hello-world_foo.bar/baz\\qux|a~b`c^d",
    "!!!???...,,,;;;",
    "a<|endoftext|>b <|startoftext|> c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    ", ".join(f"tag{i} detailed scenery" for i in range(60)),  # ~300 tokens
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' CLIPTokenizer built from our vocab file the way HF's vocab.json/merges.txt are."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_clip_tok")
    lines = gzip.decompress(default_vocab_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    t = transformers.CLIPTokenizer.from_pretrained(str(d))
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, len(t)) == (BOS_ID, EOS_ID, EOS_ID, 49408)
    return t


def test_known_ids(tok):
    # Derived from the merges file: a merge on line n (1-based, line 1 is the header) gets id n + 510
    # (512 byte symbols first): "o f</w>" is line 29 -> 539, "pho to</w>" 615 -> 1125,
    # "do g</w>" 1419 -> 1929, "c at</w>" 1858 -> 2368; "a</w>" is byte symbol 64 + 256 = 320.
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("dog") == [1929]
    assert tok.encode("") == []
    ids = tok(["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7:].eq(EOS_ID).all()
    assert tok.vocab_size == 49408
    assert tok.decoder[BOS_ID] == "<|startoftext|>" and tok.decoder[EOS_ID] == "<|endoftext|>"


def test_vocab_id_layout_from_file(tok):
    lines = gzip.decompress(default_vocab_path().read_bytes()).decode("utf-8").split("\n")
    for n in (29, 615, 1419, 1858, 48895):  # 1-based line numbers; 48895 is the last merge used
        a, b = lines[n - 1].split()
        assert tok.encoder[a + b] == n + 510
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_matches_transformers(tok, hf, prompt):
    assert tok.encode(prompt) == hf(prompt, add_special_tokens=False)["input_ids"]


def test_batch_matches_transformers_padding_and_truncation(tok, hf):
    ours = tok(PROMPTS, pad="eos")
    ref = hf(PROMPTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    assert ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref)
    long_row = ours[-1]
    assert long_row[0] == BOS_ID and long_row[76] == EOS_ID  # truncated: BOS + 75 + EOS


def test_zero_padding_open_clip_semantics(tok):
    short, long = "a photo of a cat", PROMPTS[-1]
    ids = tok([short, long], pad="zero")
    assert ids[0, :7].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert ids[0, 7:].eq(0).all()
    body = tok.encode(long)
    assert len(body) > 75
    # open_clip: tokens[:77] then tokens[-1] = EOT -> the last kept token is EOS
    assert ids[1].tolist() == [BOS_ID, *body[:75], EOS_ID]
    with pytest.raises(ValueError, match="pad must be"):
        tok([short], pad="none")


def test_cleanup_like_ftfy(tok, hf):
    """Where the originals (ftfy + Python's str.lower) and transformers' fast tokenizer differ, we
    follow the originals: compare against HF on the already-clean equivalent text."""
    pairs = [
        ("it’s “quoted”", "it's \"quoted\""),  # uncurl_quotes
        ("ﬁsh ﬂower", "fish flower"),  # fix_latin_ligatures
        ("ＦＵＬＬ　ｗｉｄｔｈ１２", "full width12"),  # fix_character_width, ideographic space
        ("salt &amp; pepper &lt;3 &amp;amp;", "salt & pepper <3 &"),  # html.unescape twice
        ("ΟΔΟΣ", "οδος"),  # str.lower applies Greek final sigma
        ("bad\x00con\x07trol\ufeffchars", "badcontrolchars"),  # remove_control_chars
        ("cafe\u0301", "café"),  # NFC
    ]
    for raw, clean in pairs:
        assert tok.encode(raw) == hf(clean, add_special_tokens=False)["input_ids"], raw
    assert clean_text("  A\u00a0\u2003B\n") == "a b"


def test_pretokenize_rules():
    assert pretokenize("it's 123 ab!!c 'dog") == ["it", "'s", "1", "2", "3", "ab", "!!", "c", "'d", "og"]
    assert pretokenize("<|endoftext|>x") == ["<|endoftext|>", "x"]


def test_decode_roundtrip(tok):
    text = "a red car, café 🎨 1girl"
    assert tok.decode(tok.encode(text)) == "a red car , café 🎨 1 girl"


def test_chunks(tok):
    words = " ".join(f"w{i}" for i in range(200))  # "w" + digits: 1 + len(str(i)) tokens each
    ids = tok.encode(words)
    assert len(ids) == sum(1 + len(str(i)) for i in range(200)) == 690
    chunks = tok.chunks(words, n_chunks=3)
    assert len(chunks) == 3
    for k, c in enumerate(chunks):
        assert len(c) == 77 and c[0] == BOS_ID and c[76] == EOS_ID
        assert c[1:76] == ids[75 * k : 75 * (k + 1)]
    assert len(tok.chunks(words, n_chunks=20)) == 10  # ceil(690 / 75)

    assert tok.chunks("", 3) == [tok.empty_chunk()] == [[BOS_ID] + [EOS_ID] * 76]
    exact = " ".join(["cat"] * 75)
    assert len(tok.chunks(exact, 3)) == 1
    assert len(tok.chunks(exact + " cat", 3)) == 2
    two = tok.chunks(exact + " cat", 3, pad="zero")
    assert two[1][:3] == [BOS_ID, 2368, EOS_ID] and set(two[1][3:]) == {0}
    assert tok.chunks("a photo of a cat", 3)[0] == tok(["a photo of a cat"])[0].tolist()
    with pytest.raises(ValueError, match="n_chunks"):
        tok.chunks("x", 0)
