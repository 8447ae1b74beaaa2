"""Colorization pieces: line-art polarity and clean-up, the luminance merge, the nearest-luminance
baseline, synthetic clips, video-pairs selection, and the line-art request settings."""

import json

import cv2
import numpy as np
import pytest

from ctrlnet.colorize.lab import chroma_error, lightness, merge_luminance, to_gray, transfer_by_luminance
from ctrlnet.colorize.lineart import lineart_request, prepare_lineart
from ctrlnet.colorize.pairs import frame_similarity, select_pairs, ssim

av = pytest.importorskip("av")


def drawing(h=64, w=96):
    img = np.full((h, w, 3), 255, np.uint8)  # black lines on white paper
    cv2.line(img, (5, 5), (90, 50), (0, 0, 0), 2)
    cv2.circle(img, (30, 40), 12, (0, 0, 0), 1)
    return img


def test_lineart_inversion_polarity():
    img = drawing()
    cmap = prepare_lineart(img)  # auto: mostly light -> inverted
    assert cmap.shape == (64, 96, 3) and cmap.dtype == np.uint8
    line = img[..., 0] == 0
    assert (cmap[line] == 255).all() and (cmap[~line] == 0).all()
    # already white-on-black input is kept as is (auto), and invert=True forces the flip
    assert np.array_equal(prepare_lineart(cmap), cmap)
    assert np.array_equal(prepare_lineart(img, invert=False), img)
    assert np.array_equal(prepare_lineart(cmap, invert=True), img)


def test_lineart_binarise_and_speck_removal():
    img = drawing().astype(np.int16)
    img += np.random.default_rng(0).integers(-40, 40, img.shape)  # scanner noise
    img = img.clip(0, 255).astype(np.uint8)
    img[10:12, 70:72] = 0  # a 4-pixel speck of dust
    raw = prepare_lineart(img)
    assert len(np.unique(raw)) > 2
    clean = prepare_lineart(img, binarize=128, min_area=10)
    assert set(np.unique(clean)) == {0, 255}
    assert (clean[10:12, 70:72] == 0).all()  # the speck is gone
    assert (raw[10:12, 70:72] > 200).all()
    assert clean[drawing()[..., 0] == 0].mean() > 250  # the real lines stay
    assert set(np.unique(prepare_lineart(img, binarize="otsu"))) == {0, 255}
    with pytest.raises(ValueError, match="binarize"):
        prepare_lineart(img, binarize=300)


def test_lineart_request_uses_anime_settings_and_guess_mode():
    cmap = prepare_lineart(drawing())
    r = lineart_request(cmap, "", anime=True)
    assert (r.clip_skip, r.prompt_chunks, r.guess_mode) == (2, 3, True)
    r = lineart_request(cmap, "1girl, red hair", anime=False, strength=0.7)
    assert (r.clip_skip, r.prompt_chunks, r.guess_mode) == (1, 1, False)
    assert r.controls[0].strength == 0.7 and r.controls[0].annotator is None


def test_luminance_merge_keeps_L_within_one_level():
    rng = np.random.default_rng(1)
    colored = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)  # saturated noise: many out-of-gamut mixes
    source = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    for src in (source, to_gray(source)):
        out = merge_luminance(colored, src)
        d = np.abs(lightness(out).astype(int) - lightness(src).astype(int))
        assert out.shape == src.shape and d.max() <= 1
    # chroma comes from the coloured image: a gray source takes on its colours
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 200
    out = merge_luminance(red, np.full((40, 40, 3), 120, np.uint8))
    assert out[..., 0].mean() > out[..., 1].mean() + 40
    # a smaller generated image is resized to the source
    assert merge_luminance(red[:20, :20], source).shape == source.shape


def test_luminance_transfer_baseline_and_chroma_error():
    rng = np.random.default_rng(2)
    ref = np.zeros((32, 32, 3), np.uint8)
    ref[:16] = (220, 40, 40)  # light red top
    ref[16:] = (20, 20, 120)  # dark blue bottom
    out = transfer_by_luminance(to_gray(ref[::-1]), ref)  # same colours, other place
    assert chroma_error(out, ref[::-1]) < 6.0
    assert chroma_error(to_gray(ref), ref) > 30.0  # gray is far from the colours
    assert chroma_error(ref, ref) == 0.0
    noise = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert abs(lightness(transfer_by_luminance(noise, ref)).astype(int) - lightness(noise).astype(int)).max() <= 1


def test_ssim_identity_and_order():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    b = np.roll(a, 1, axis=1)
    assert ssim(a, b) < 0.5
    img = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (9, 9), 3)
    near, far = np.roll(img, 1, axis=1), np.roll(img, 6, axis=1)
    assert 1.0 > frame_similarity(img, near) > frame_similarity(img, far)


def _shift_clip(n=24, size=64, cell=12):
    """Frames of one smooth texture shifted by 1 px per frame: similarity falls with the gap."""
    rng = np.random.default_rng(4)
    w = size + n + 8
    coarse = rng.random((size // cell + 2, w // cell + 2, 3)).astype(np.float32)
    big = cv2.resize(coarse, ((w // cell + 2) * cell, (size // cell + 2) * cell), interpolation=cv2.INTER_CUBIC)
    big = big[:size, :w]
    big = ((big - big.min()) / (big.max() - big.min()) * 255).astype(np.uint8)
    return [big[:, i:i + size].copy() for i in range(n)]


def test_select_pairs_keeps_range_and_gap():
    frames = _shift_clip()
    sim = {g: frame_similarity(frames[0], frames[g]) for g in range(1, 12)}
    assert all(sim[g] > sim[g + 1] for g in range(1, 11))
    low, high = sim[5] - 1e-3, sim[3] + 1e-3  # gaps 3..5 in range; 1-2 too similar
    pairs = select_pairs(frames, low, high, min_gap=4, max_gap=10)
    assert pairs
    for p in pairs:
        assert p.target - p.reference >= 4
        assert low <= p.similarity <= high
        assert p.similarity == pytest.approx(frame_similarity(frames[p.reference], frames[p.target]), abs=1e-6)
    assert all(b.reference - a.reference >= 4 for a, b in zip(pairs, pairs[1:]))  # stride = min_gap
    assert select_pairs(frames, 0.999, 1.0, min_gap=3) == []
    with pytest.raises(ValueError, match="similarity range"):
        select_pairs(frames, 0.9, 0.8)


def test_video_pairs_writes_triples_from_a_video(tmp_path):
    from ctrlnet.colorize.pairs import video_pairs
    from ctrlnet.colorize.video import count_frames, probe, write_video
    from ctrlnet.image import load_image

    frames = _shift_clip(20)
    video = tmp_path / "clip.mp4"
    assert write_video(frames, video, 12) == 20
    info = probe(video)
    assert (info.width, info.height, info.fps) == (64, 64, 12) and count_frames(video) == 20
    decoded = list(__import__("ctrlnet.colorize.video", fromlist=["read_frames"]).read_frames(video))
    s3 = frame_similarity(decoded[0], decoded[3])
    s6 = frame_similarity(decoded[0], decoded[6])
    rows = video_pairs([video], tmp_path / "pairs", s6 - 0.01, s3 + 0.01, min_gap=3, max_gap=8)
    assert rows
    written = [json.loads(x) for x in (tmp_path / "pairs" / "prompt.json").read_text().splitlines()]
    assert written == rows
    for r in rows:
        i, j = r["frames"]
        assert j - i >= 3 and s6 - 0.01 <= r["similarity"] <= s3 + 0.01
        ref, gray, color = (load_image(tmp_path / "pairs" / r[k]) for k in ("reference", "source", "target"))
        assert np.abs(ref.astype(int) - decoded[i]).mean() < 1  # the reference is frame i
        assert np.array_equal(color, decoded[j])
        assert np.array_equal(gray, to_gray(decoded[j]))


def test_write_video_keeps_odd_size_and_ntsc_rate(tmp_path):
    from fractions import Fraction

    from ctrlnet.colorize.video import count_frames, probe, write_video

    frames = [np.full((97, 91, 3), 40 * i, np.uint8) for i in range(4)]
    for ext in ("mp4", "avi"):
        path = tmp_path / f"v.{ext}"
        assert write_video(frames, path, Fraction(30000, 1001)) == 4
        info = probe(path)
        assert (info.width, info.height, info.fps) == (91, 97, Fraction(30000, 1001))
        assert count_frames(path) == 4
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "e.mp4", 24)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
