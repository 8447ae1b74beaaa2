"""The fill50k colour vocabulary: the whole CSS/X11 list with compounds split into words, pairs far
enough apart to see, a held-out share of pairs the recipe never trains on, and the first model's
20-colour benchmark reproduced."""

from __future__ import annotations

import numpy as np
import pytest

from ctrlnet.training.builders import make_fill50k, read_jsonl
from ctrlnet.training.colors import (BASIC_20, COLORS, MIN_PAIR_DELTA_E, basic20_pairs, color_distance, color_pairs,
                                     fill50k_prompt, is_heldout_pair, lab, parse_fill50k_prompt, split_pairs,
                                     vocabulary)


def test_vocabulary_is_the_css_x11_list_with_words_split():
    mc = pytest.importorskip("matplotlib.colors")
    css = {k: v for k, v in mc.CSS4_COLORS.items() if "grey" not in k and k != "rebeccapurple"}
    assert len(COLORS) == len(css) == 140
    # each name is the CSS name split into words, with the CSS value
    joined = {"".join(name.split()): rgb for name, rgb in COLORS.items()}
    assert joined == {k: tuple(int(v[i:i + 2], 16) for i in (1, 3, 5)) for k, v in css.items()}
    for name in ("pale golden rod", "old lace", "light sea green", "light golden rod yellow", "medium aqua marine",
                 "corn flower blue", "dark slate gray", "yellow", "green"):
        assert name in COLORS, name
    assert all(name == " ".join(name.split()) and name.islower() for name in COLORS)
    assert set(BASIC_20) <= set(COLORS) and vocabulary("basic20") == {n: COLORS[n] for n in BASIC_20}
    with pytest.raises(KeyError, match="known: css, basic20"):
        vocabulary("x11")


def test_lab_matches_known_values_and_prompts_round_trip():
    # sRGB D65: white L*=100; red (53.24, 80.09, 67.20) (CIE references, 0.1 tolerance)
    assert np.allclose(lab((255, 255, 255)), (100, 0, 0), atol=0.1)
    assert np.allclose(lab((255, 0, 0)), (53.24, 80.09, 67.20), atol=0.1)
    assert color_distance((0, 0, 0), (255, 255, 255)) == pytest.approx(100, abs=0.1)
    for name in COLORS:
        assert parse_fill50k_prompt(fill50k_prompt(name, "black")) == (name, "black")
    assert parse_fill50k_prompt("Pale  Golden Rod circle with old lace background") == ("pale golden rod", "old lace")
    with pytest.raises(ValueError, match="unknown colour"):
        parse_fill50k_prompt("goldish circle with red background")


def test_every_name_tokenizes_to_its_own_ids():
    from ctrlnet.models.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer()
    ids = {name: tuple(tok.encode(name)) for name in COLORS}
    assert len(set(ids.values())) == len(COLORS)  # no two names look alike to the text encoder
    longest = max(len(tok.encode(fill50k_prompt(a, b))) for a in COLORS for b in ("light golden rod yellow",))
    assert longest + 2 <= 77  # with start and end tokens, within one window


def test_pairs_are_far_apart_and_the_held_out_share_is_stable():
    pairs = color_pairs()
    assert len(pairs) == 15892  # of 140 * 139 ordered pairs, those >= Delta E 40 apart
    L = {n: lab(v) for n, v in COLORS.items()}
    assert min(np.linalg.norm(L[a] - L[b]) for a, b in pairs) >= MIN_PAIR_DELTA_E
    # Delta E 40 means at least 51.7 apart in RGB (so the benchmark's nearest-colour split works)
    assert min(np.linalg.norm(np.subtract(COLORS[a], COLORS[b], dtype=float)) for a, b in pairs) > 51
    train, held = split_pairs(pairs)
    assert len(train) + len(held) == len(pairs) and not set(train) & set(held)
    assert 0.04 < len(held) / len(pairs) < 0.06
    assert {c for p in held for c in p} == set(COLORS)  # the held-out pairs use every colour
    assert split_pairs(list(reversed(pairs)))[1] == list(reversed(held))  # by name, not by order


def test_make_fill50k_draws_only_the_given_pairs(tmp_path):
    pairs = color_pairs()
    train, held = split_pairs(pairs)
    make_fill50k(tmp_path / "t", 200, 32, seed=5, pairs=train)
    rows = read_jsonl(tmp_path / "t" / "prompt.json")
    assert not any(is_heldout_pair(r["circle_color"], r["background_color"]) for r in rows)
    assert all(color_distance(COLORS[r["circle_color"]], COLORS[r["background_color"]]) >= MIN_PAIR_DELTA_E
               for r in rows)
    assert len({r["circle_color"] for r in rows}) > 60  # the whole vocabulary, not 20 names
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_fill50k(tmp_path / "x", 2, 32, pairs=[("red", "ultramarine")])
    assert not (tmp_path / "x").exists()  # refused before the folder is claimed
    # the pairs are part of the data set's settings: a resume with others is refused, with the same resumes
    with pytest.raises(ValueError, match=r"cannot resume the data set .* \(pairs: now "):
        make_fill50k(tmp_path / "t", 200, 32, seed=5, pairs=held, resume=True)
    before = (tmp_path / "t" / "prompt.json").read_bytes()
    make_fill50k(tmp_path / "t", 200, 32, seed=5, pairs=train, resume=True)
    assert (tmp_path / "t" / "prompt.json").read_bytes() == before


def test_basic20_pairs_are_the_first_models_rule():
    import hashlib

    pairs = basic20_pairs()
    # the list the first model's colors.color_pairs() gave (commit 71193a9), by count and digest
    assert len(pairs) == 348
    assert hashlib.sha256(repr(pairs).encode()).hexdigest()[:16] == "7e24c539c036a76f"
