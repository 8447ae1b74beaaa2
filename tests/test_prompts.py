"""A1111 prompts: emphasis parsing and arithmetic, 75-token windows of any number, BREAK, the
comma rule, cond/uncond padding, textual-inversion embeddings and <lora:...> tags.

The oracles are transcriptions of AUTOMATIC1111's stable-diffusion-webui code, written here in
its own shape (a regex tokenizer for the parser; ``tokenize_line`` + ``process_tokens`` + the
"Original" emphasis for the encoding), so the implementation under test is checked against a
second, independent reading of the same algorithm.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from ctrlnet.generation.embeddings import (
    Embedding,
    EmbeddingError,
    EmbeddingIndex,
    load_embedding,
    load_embeddings,
)
from ctrlnet.generation.prompts import (
    LoraTag,
    empty_chunk,
    encode_prompts,
    extract_lora_tags,
    parse_prompt_attention,
    tokenize_prompt,
)
from ctrlnet.models.tokenizer import BOS_ID, EOS_ID
from helpers import randomize_
from ctrlnet.pipeline import GenerationRequest, generate, load_models, random_base


# --- oracle: A1111 modules/prompt_parser.py parse_prompt_attention (transcribed) -------------------

_A1111_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_parse(text):
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _A1111_ATTENTION.finditer(text):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(_A1111_BREAK, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# --- oracle: A1111 modules/sd_hijack_clip.py tokenize_line / process_tokens + sd_emphasis Original ----

def a1111_tokenize_line(tok, line, backtrack=20):
    comma = tok.encoder[",</w>"]
    parsed = a1111_parse(line)
    tokenized = [tok.encode(text) for text, _ in parsed]
    chunks, chunk = [], {"tokens": [], "multipliers": []}
    last_comma = -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = 75 - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [EOS_ID] * to_add
            chunk["multipliers"] += [1.0] * to_add
        chunk["tokens"] = [BOS_ID] + chunk["tokens"] + [EOS_ID]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": []}

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk["tokens"])
            elif (backtrack != 0 and len(chunk["tokens"]) == 75 and last_comma != -1
                  and len(chunk["tokens"]) - last_comma <= backtrack):
                loc = last_comma + 1
                reloc_tokens, reloc_mults = chunk["tokens"][loc:], chunk["multipliers"][loc:]
                chunk["tokens"], chunk["multipliers"] = chunk["tokens"][:loc], chunk["multipliers"][:loc]
                next_chunk()
                chunk["tokens"], chunk["multipliers"] = reloc_tokens, reloc_mults
            if len(chunk["tokens"]) == 75:
                next_chunk()
            chunk["tokens"].append(token)
            chunk["multipliers"].append(weight)
            position += 1
    if chunk["tokens"] or not chunks:
        next_chunk()
    return chunks


def a1111_encode(te, line, layer=None):
    """One prompt through A1111's forward(): chunks encoded one at a time, emphasis, hstack."""
    zs = []
    for chunk in a1111_tokenize_line(te.tokenizer, line):
        tokens = torch.tensor([chunk["tokens"]])
        if te.pad == "zero":  # id_end != id_pad (SD2)
            index = chunk["tokens"].index(EOS_ID)
            tokens[0, index + 1:] = 0
        z = te.encode_ids(tokens, layer)
        multipliers = torch.tensor([chunk["multipliers"]])
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        z = z * (original_mean / new_mean)
        zs.append(z)
    return torch.hstack(zs)


def a1111_pad(te, z, k, layer=None):
    """sd_samplers_cfg_denoiser.pad_cond_uncond: a shorter context is extended with empty-prompt
    windows to k windows."""
    empty = a1111_encode(te, "", layer)
    return torch.cat([z, empty.repeat(1, k - z.shape[1] // 77, 1)], dim=1)


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1():
    # every parameter random (LayerNorm biases too): with zero biases a context's mean is ~0 and the
    # mean-restoring ratio would be ill-conditioned
    return randomize_(random_base("tiny-sd1", seed=3).text_encoder, seed=3)


@pytest.fixture(scope="module")
def sd2():
    return randomize_(random_base("tiny-sd2", seed=4).text_encoder, seed=4)


WORDS = ("red", "cat", "sky", "tree", "house", "girl", "blue", "dog", "river", "moon")


def words(n, sep=" ", offset=0):
    """n one-token words (each of WORDS is one CLIP token)."""
    return sep.join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


PROMPTS = [
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a BREAK b", "BREAK a", "a BREAK", "(a BREAK b)", "(BREAK:0)", "(BREAK:-1)", "[[a]] ((b)) (c:0.0)",
    "a\\b \\\\ c\\", "a:b (c:d) (e:+1.5) (f:-.5) g:1.2) ]x[ y)", "((a:1.1):1.1)", "",
    words(80, ", "), words(74) + ", " + words(10), words(60) + ", " + words(14) + " (" + words(5) + ":1.2) z",
    words(300), "(" + words(90, ", ") + ")" + " BREAK [" + words(40) + "]",
]


# --- parsing -----------------------------------------------------------------------------------------

def test_parse_matches_a1111_docstring_examples():
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [t for t, _ in got] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [w for _, w in got] == [1.0, 1.5730000000000004, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641000000000006, 1.1]
    assert parse_prompt_attention("(word:1.3) [x]") == [("word", 1.3), (" ", 1.0), ("x", 1 / 1.1)]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


def _assert_same(text):
    try:
        want = [tuple(x) for x in a1111_parse(text)]
    except ValueError:
        with pytest.raises(ValueError, match="not a number"):
            parse_prompt_attention(text)
        return
    assert parse_prompt_attention(text) == want, text  # exact, floats included


@pytest.mark.parametrize("text", PROMPTS)
def test_parse_equals_a1111_transcription(text):
    _assert_same(text)


def test_parse_equals_a1111_on_random_prompts():
    pieces = ["a", "cat", " ", "  ", "(", ")", "[", "]", ":", "1.2", "0.5", ".", "-", "+", "\\", "BREAK",
              ",", "x_BREAK", "BREAKx", "\n", "٣", "é"]
    rng = random.Random(0)
    for _ in range(3000):
        _assert_same("".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))))
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt_attention("(a:1.2.3)")


# --- windows and encoding against the A1111 transcription --------------------------------------------

@pytest.mark.parametrize("text", PROMPTS)
def test_windows_equal_a1111_tokenize_line(sd1, text):
    ours = tokenize_prompt(sd1.tokenizer, text)
    theirs = a1111_tokenize_line(sd1.tokenizer, text)
    assert [c.ids for c in ours] == [c["tokens"] for c in theirs]
    assert [c.weights for c in ours] == [c["multipliers"] for c in theirs]


def test_comma_rule_moves_the_tail_to_the_next_window(sd1):
    tok = sd1.tokenizer
    text = words(70) + ", " + words(10, offset=3)  # 70 + comma + 10 = 81 tokens; the comma is 6 back
    ws = tokenize_prompt(tok, text)
    assert len(ws) == 2
    assert ws[0].ids[71] == tok.encoder[",</w>"] and ws[0].ids[72:] == [EOS_ID] * 5  # window 1 ends at the comma
    assert ws[1].ids[1:11] == tok.encode(words(10, offset=3)) and ws[1].ids[11] == EOS_ID
    plain = tokenize_prompt(tok, text, comma_backtrack=0)  # cut at 75 exactly
    assert plain[0].ids[1:76] == tok.encode(text)[:75] and plain[1].ids[1:7] == tok.encode(text)[75:]
    far = words(50) + ", " + words(30)  # the comma is 25 tokens back: no move
    assert tokenize_prompt(tok, far)[0].ids[1:76] == tok.encode(far)[:75]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_contexts_equal_a1111_transcription(family, request):
    te = request.getfixturevalue(family)
    cond = [PROMPTS[0], PROMPTS[19], PROMPTS[20], PROMPTS[21]]
    uncond = ["lowres, (bad hands:1.4)", "", "[blurry]", "x BREAK y"]
    with torch.no_grad():
        got_c, got_u = encode_prompts(te, cond, uncond)
        want = {p: a1111_encode(te, p) for p in cond + uncond}
        k = max(z.shape[1] // 77 for z in want.values())
        for i, (c, u) in enumerate(zip(cond, uncond)):
            want_c, want_u = a1111_pad(te, want[c], k), a1111_pad(te, want[u], k)
            assert got_c.shape[1] == want_c.shape[1] == got_u.shape[1], (i, got_c.shape, want_c.shape)
            torch.testing.assert_close(got_c[i], want_c[0], rtol=0, atol=2e-6)  # measured: 0.0
            torch.testing.assert_close(got_u[i], want_u[0], rtol=0, atol=2e-6)
    assert got_c.shape == (4, 77 * 4, te.cfg.width)  # 300 words need 4 windows


def test_emphasis_arithmetic_scales_then_restores_the_mean(sd1):
    with torch.no_grad():
        plain, _ = encode_prompts(sd1, ["a red cat"], [""])
        up, _ = encode_prompts(sd1, ["a (red:1.5) cat"], [""])
    ids = tokenize_prompt(sd1.tokenizer, "a red cat")[0].ids
    red = ids.index(sd1.tokenizer.encoder["red</w>"])
    w = torch.ones(77)
    w[red] = 1.5
    z = plain[0] * w[:, None]
    z = z * (plain[0].mean() / z.mean())
    torch.testing.assert_close(up[0], z, rtol=0, atol=1e-6)
    assert math.isclose(float(up[0].mean()), float(plain[0].mean()), rel_tol=1e-5)


# --- properties users rely on ----------------------------------------------------------------------

def test_weight_one_equals_plain_text_exactly(sd1, sd2):
    with torch.no_grad():
        for te in (sd1, sd2):
            a, ua = encode_prompts(te, ["a (red:1.0) car"], ["(blurry:1.0)"])
            b, ub = encode_prompts(te, ["a red car"], ["blurry"])
            assert torch.equal(a, b) and torch.equal(ua, ub)
            c, _ = encode_prompts(te, ["a (red:1.1) car"], ["blurry"])
            assert not torch.allclose(a, c, atol=1e-4)


def test_long_prompts_keep_every_word(sd1):
    base = words(299)  # 299 one-token words: 4 windows, past the old limit of 225 tokens
    with torch.no_grad():
        a, ua = encode_prompts(sd1, [base + " dog"], [""])
        b, _ = encode_prompts(sd1, [base + " moon"], [""])
    assert a.shape == ua.shape == (1, 77 * 4, 32)
    assert torch.equal(a[:, : 77 * 3], b[:, : 77 * 3])  # the first three windows are the same
    assert (a[:, 77 * 3 :] - b[:, 77 * 3 :]).abs().max() > 1e-3  # the last word changes the last window
    empty = encode_prompts(sd1, [""], [""])[0][0]
    for k in range(4):  # the negative prompt is padded with empty windows
        torch.testing.assert_close(ua[0, 77 * k : 77 * (k + 1)], empty, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="windows of 75 tokens; the limit is 3"):
        encode_prompts(sd1, [base], [""], max_chunks=3)


def test_break_starts_a_new_window(sd1):
    with torch.no_grad():
        z, _ = encode_prompts(sd1, ["a red cat BREAK a blue dog"], [""])
        first, _ = encode_prompts(sd1, ["a red cat"], [""])
        second, _ = encode_prompts(sd1, ["a blue dog"], [""])
    assert z.shape == (1, 154, 32)
    torch.testing.assert_close(z[:, :77], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(z[:, 77:], second, rtol=0, atol=1e-6)
    ws = tokenize_prompt(sd1.tokenizer, "a red cat BREAK a blue dog")
    assert ws[0].ids[:5] == [BOS_ID, *sd1.tokenizer.encode("a red cat"), EOS_ID]
    assert len(tokenize_prompt(sd1.tokenizer, "a BREAK")) == 1  # nothing after it: no empty window
    assert len(tokenize_prompt(sd1.tokenizer, "BREAK a")) == 2  # A1111: an empty first window


def test_min_chunks_clip_skip_and_sd2_padding(sd1, sd2):
    with torch.no_grad():
        c3, u3 = encode_prompts(sd1, ["a cat"], [""], clip_skip=2, min_chunks=3)
        c1, _ = encode_prompts(sd1, ["a cat"], [""], clip_skip=2)
        last, _ = encode_prompts(sd1, ["a cat"], [""])
    assert c3.shape == u3.shape == (1, 231, 32) and c1.shape == (1, 77, 32)
    assert torch.equal(c3[:, :77], c1)
    assert torch.equal(c1[0], sd1(["a cat"], layer="penultimate")[0])  # short prompt = the plain tower
    assert torch.equal(last[0], sd1(["a cat"])[0])
    assert (c1 - last).abs().max() > 1e-3
    ws = tokenize_prompt(sd2.tokenizer, words(80), pad="zero")
    assert ws[1].ids[:7] == [BOS_ID, *sd2.tokenizer.encode(words(80))[75:], EOS_ID] and set(ws[1].ids[7:]) == {0}
    assert empty_chunk("zero").ids == [BOS_ID, EOS_ID] + [0] * 75
    with torch.no_grad():
        assert torch.equal(encode_prompts(sd2, ["a cat"], [""])[0][0], sd2(["a cat"])[0])
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(sd1, ["a"], [""], clip_skip=3)
    with pytest.raises(ValueError, match="as many negative prompts"):
        encode_prompts(sd1, ["a", "b"], [""])


def test_anime_hack_windows_without_the_comma_rule(sd1):
    """comma_backtrack=0 and min_chunks=3 reproduce ControlNet 1.1's anime line-art CLIP hack
    (cldm/hack.py: ids cut every 75, three windows, EOS padding) for prompts up to 225 tokens."""
    text = words(100, ", ")  # 199 tokens with the commas: 3 windows
    ids = sd1.tokenizer.encode(text)
    rows = []
    for k in range(3):
        part = [BOS_ID] + ids[75 * k : 75 * (k + 1)] + [EOS_ID]
        rows.append(part + [EOS_ID] * (77 - len(part)))
    with torch.no_grad():
        want = sd1.encode_ids(torch.tensor(rows), "penultimate").reshape(1, 231, 32)
        got, _ = encode_prompts(sd1, [text], [""], clip_skip=2, min_chunks=3, comma_backtrack=0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- textual inversion ---------------------------------------------------------------------------

def _rows(te, text):
    return te.embed_tokens(torch.tensor([te.tokenizer.encode(text)]))[0].detach().clone()  # (n, C)


def test_embedding_of_a_word_gives_that_words_context(sd1, sd2):
    for te in (sd1, sd2):
        cat = Embedding("mycatvec", _rows(te, "cat"))
        with torch.no_grad():
            got, _ = encode_prompts(te, ["a photo of mycatvec, (mycatvec:1.3)"], [""], embeddings={"mycatvec": cat})
            want, _ = encode_prompts(te, ["a photo of cat, (cat:1.3)"], [""])
        assert torch.equal(got, want)


def test_multi_vector_embedding_takes_several_positions(sd1):
    two = Embedding("redcatpair", _rows(sd1, "red cat"))
    assert two.num_vectors == 2
    index = EmbeddingIndex([two], sd1.tokenizer, 32)
    ws = tokenize_prompt(sd1.tokenizer, "a redcatpair on a sky", embeddings=index)
    assert ws[0].inserts == [(2, two)]
    tail = sd1.tokenizer.encode("on a sky")
    assert ws[0].ids[4:7] == tail and ws[0].ids[7] == EOS_ID  # the words after it moved by two
    with torch.no_grad():
        got, _ = encode_prompts(sd1, ["a redcatpair on a sky"], [""], embeddings=[two])
        want, _ = encode_prompts(sd1, ["a red cat on a sky"], [""])
    assert torch.equal(got, want)
    # 74 tokens then the two vectors: they do not fit, so they open the next window
    ws = tokenize_prompt(sd1.tokenizer, words(74) + " redcatpair", embeddings=index)
    assert len(ws) == 2 and ws[0].inserts == [] and ws[1].inserts == [(1, two)]
    assert ws[0].ids[75] == EOS_ID and ws[1].ids[3] == EOS_ID
    # moved by the comma rule, an embedding keeps its vectors (A1111 leaves them behind)
    ws = tokenize_prompt(sd1.tokenizer, words(70) + ", redcatpair " + words(10), embeddings=index)
    assert ws[0].inserts == [] and ws[1].inserts == [(1, two)]


def test_embedding_width_and_names_refused(sd1, sd2):
    wide = Embedding("sd1style", torch.zeros(1, 32))
    with pytest.raises(EmbeddingError, match=r"'sd1style'.*32 wide.*48 wide"):
        encode_prompts(sd2, ["sd1style"], [""], embeddings=[wide])
    with pytest.raises(EmbeddingError, match=r"768 wide, SD1.x.*1024 wide, SD2.x"):
        EmbeddingIndex([Embedding("x", torch.zeros(1, 768))], sd1.tokenizer, 1024)
    with pytest.raises(EmbeddingError, match="76 vectors"):
        Embedding("huge", torch.zeros(76, 32))
    with pytest.raises(EmbeddingError, match="NaN"):
        Embedding("bad", torch.full((1, 32), float("nan")))
    with pytest.raises(EmbeddingError, match="gives no tokens"):
        EmbeddingIndex([Embedding("\x01", torch.zeros(1, 32))], sd1.tokenizer, 32)  # a control character


def test_embedding_files(tmp_path):
    from safetensors.torch import save_file

    vec = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "other", "step": 500,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "a1111.pt")
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})},
               tmp_path / "oldtorch.pt")
    save_file({"emb_params": vec.contiguous()}, tmp_path / "kohya.safetensors")
    torch.save({"<my-token>": vec[0].clone()}, tmp_path / "learned_embeds.bin")
    (tmp_path / "a1111.preview.png").write_bytes(b"\x89PNG")  # skipped in a folder
    got = load_embeddings(tmp_path)
    assert sorted(got) == ["a1111", "kohya", "learned_embeds", "oldtorch"]  # named by file, not by content
    for name in ("a1111", "oldtorch", "kohya"):
        assert torch.equal(got[name].vectors, vec) and got[name].vectors.dtype == torch.float32
    assert torch.equal(got["learned_embeds"].vectors, vec[:1])

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"string_to_param": {"*": vec}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="would run code"):
        load_embedding(tmp_path / "evil.pt")
    torch.save({"string_to_param": {"*": vec, "#": vec}}, tmp_path / "two.pt")
    with pytest.raises(EmbeddingError, match="exactly one term, found 2"):
        load_embedding(tmp_path / "two.pt")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EmbeddingError, match="empty"):
        load_embedding(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all, sorry")
    with pytest.raises(EmbeddingError, match="not a readable embedding"):
        load_embedding(tmp_path / "junk.pt")
    data = (tmp_path / "kohya.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(EmbeddingError, match="truncated"):
        load_embedding(tmp_path / "cut.safetensors")
    with pytest.raises(EmbeddingError, match="no embedding file"):
        load_embedding(tmp_path / "missing.pt")
    (tmp_path / "dup").mkdir()
    torch.save({"string_to_param": {"*": vec}}, tmp_path / "dup" / "same.pt")
    save_file({"emb_params": vec.contiguous()}, tmp_path / "dup" / "same.safetensors")
    with pytest.raises(EmbeddingError, match="two embeddings are called 'same'"):
        load_embeddings(tmp_path / "dup")


# --- <lora:...> tags --------------------------------------------------------------------------------

def test_extract_lora_tags():
    text, tags = extract_lora_tags("a cat, <lora:ink_style:0.8>, <lora:detail> <lyco:locon:0.5> at night")
    assert text == "a cat, ,   at night"  # removed, text around them kept (A1111)
    assert tags == [LoraTag("ink_style", 0.8), LoraTag("detail", 1.0), LoraTag("locon", 0.5)]
    assert extract_lora_tags("<lora:a:te=0.7>")[1] == [("a", 0.7)]
    assert extract_lora_tags("<lora:a:0.6:0.6>")[1] == [("a", 0.6)]
    assert extract_lora_tags("<lora:a:-1>")[1] == [("a", -1.0)]
    assert extract_lora_tags("no tags, <3 (x:1.2)") == ("no tags, <3 (x:1.2)", [])
    assert extract_lora_tags("<other:thing:1>") == ("<other:thing:1>", [])
    for bad, msg in [("<lora:a:heavy>", "not a number"), ("<lora: :1>", "no LoRA name"),
                     ("<lora:a:1:0.5>", "different text-encoder"), ("<lora:a:1:1:8>", "dyn"),
                     ("<lora:a:foo=1>", "unknown setting"), ("<hypernet:h:1>", "hypernetworks")]:
        with pytest.raises(ValueError, match=msg):
            extract_lora_tags(bad)


# --- whole images through the current pipeline ----------------------------------------------------

@pytest.fixture(scope="module")
def models():
    return load_models("random:tiny-sd1", {}, device="cpu", dtype="fp32")


def _image(models, prompt, negative="", seed=5):
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, added_prompt="", resolution=64, steps=2,
                            seed=seed, guidance_scale=7.0)
    return generate(models, req).images[0].astype(int)


def test_long_prompt_and_emphasis_in_images(models):
    base = words(299)
    a, b = _image(models, base + " dog"), _image(models, base + " moon")
    assert np.abs(a - b).max() > 0  # a word after token 225 changes the image
    assert np.array_equal(_image(models, "a (red:1.0) car"), _image(models, "a red car"))
    assert not np.array_equal(_image(models, "a (red:1.6) car"), _image(models, "a red car"))
