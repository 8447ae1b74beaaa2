"""Synthetic clips where lightness cannot decide colour: every lightness level of a clip holds two
clearly different hues at exactly the same 8-bit lightness, the regions move and change, and the
nearest-luminance baseline fails on them by construction (while it does well on the classic clips)."""

from __future__ import annotations

import numpy as np
import pytest

from ctrlnet.colorize.lab import _lab_float, chroma_error, lightness, to_gray, transfer_by_luminance
from ctrlnet.colorize.synthetic import (ISO_MIN_AB, isoluminant_clip, isoluminant_pair, make_clip,
                                        synthetic_clip)


def test_isoluminant_pair_has_equal_lightness_and_distant_chroma():
    rng = np.random.default_rng(0)
    for level in (100, 130, 160, 180):
        a, b = isoluminant_pair(rng, level)
        la, lb = (lightness(c.reshape(1, 1, 3))[0, 0] for c in (a, b))
        assert la == lb == level
        ab = _lab_float(np.stack([a, b]).reshape(1, 2, 3))[0, :, 1:]
        assert np.linalg.norm(ab[0] - ab[1]) >= ISO_MIN_AB
    with pytest.raises(ValueError, match="level 3"):
        isoluminant_pair(rng, 3, tries=20)  # near black there is no room for chroma


def _level_hues(frame: np.ndarray, min_share: float = 0.02) -> dict[int, list[np.ndarray]]:
    """Flat colours covering at least ``min_share`` of the frame, grouped by 8-bit lightness."""
    flat = frame.reshape(-1, 3)
    colors, counts = np.unique(flat, axis=0, return_counts=True)
    big = colors[counts >= min_share * len(flat)]
    out: dict[int, list[np.ndarray]] = {}
    for c in big:
        out.setdefault(int(lightness(c.reshape(1, 1, 3))[0, 0]), []).append(c)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_each_level_holds_two_hues_that_move(seed):
    frames = isoluminant_clip(12, 96, seed=seed)
    assert len(frames) == 12 and frames[0].shape == (96, 96, 3) and frames[0].dtype == np.uint8
    levels = _level_hues(frames[0])
    # two lightness levels, each with two flat colours of opposite hue (the neutral outline aside)
    shared = {lv: cs for lv, cs in levels.items() if len(cs) >= 2}
    assert len(shared) == 2, {lv: [c.tolist() for c in cs] for lv, cs in levels.items()}
    for cs in shared.values():
        ab = _lab_float(np.stack(cs).reshape(1, -1, 3))[0, :, 1:]
        assert max(np.linalg.norm(ab[i] - ab[j]) for i in range(len(cs)) for j in range(i)) >= ISO_MIN_AB
    assert np.abs(frames[11].astype(int) - frames[0].astype(int)).mean() > 1  # it moves
    assert all(np.array_equal(a, b) for a, b in zip(frames, isoluminant_clip(12, 96, seed=seed)))


def test_nearest_luminance_fails_on_them_and_not_on_the_classic_clips():
    """Measured (benchmarks/colorize.py --baselines-only, 3 clips x 30 frames at 128 px): nearest-L
    31.9 on isoluminant clips (gray 42.4), 7.5 on the classic ones (gray 37.6)."""
    def baseline(kind):
        errs, grays = [], []
        for seed in range(4):
            frames = make_clip(kind, 9, 96, seed=500 + seed)
            for f in frames[4::4]:
                errs.append(chroma_error(transfer_by_luminance(f, frames[0]), f))
                grays.append(chroma_error(to_gray(f), f))
        return float(np.mean(errs)), float(np.mean(grays))

    iso, iso_gray = baseline("isoluminant")
    classic, classic_gray = baseline("classic")
    assert iso > 15 and iso > 0.35 * iso_gray, (iso, iso_gray)
    assert classic < 0.3 * classic_gray, (classic, classic_gray)
    assert iso > 2 * classic
    with pytest.raises(ValueError, match="clip kind"):
        make_clip("plaid", 2)
    assert np.array_equal(make_clip("classic", 2, 64, 3)[1], synthetic_clip(2, 64, 3)[1])
