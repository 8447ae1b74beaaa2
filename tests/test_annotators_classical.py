"""Behavioural tests of the weight-free annotators on images drawn here with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ctrlnet.annotators import get_annotator, list_annotators, registry, run_annotator
from ctrlnet.annotators.mlsd_classic import available_method, detect_segments
from ctrlnet.annotators.nms import nms
from ctrlnet.annotators.normal import normal_from_depth
from ctrlnet.annotators.scribble import detect_polarity
from ctrlnet.annotators.simple import inpaint_hint
from ctrlnet.image import ImageError

# A quadrilateral with one long side (141 px) and three of about 102 px.
POLY = np.array([[30, 20], [170, 40], [150, 140], [50, 120]], np.int32)
SIDES = [(POLY[i].astype(float), POLY[(i + 1) % 4].astype(float)) for i in range(4)]


def polygon_image(fill=(200, 180, 160), bg=40, h=160, w=200) -> np.ndarray:
    img = np.full((h, w, 3), bg, np.uint8)
    cv2.fillPoly(img, [POLY], fill)
    return img


def seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to segment ab."""
    t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * (b - a))))


def outline_points(step=1.0, margin=0.0):
    """Points along the polygon's sides, skipping ``margin`` px at each corner."""
    pts = []
    for a, b in SIDES:
        n = np.linalg.norm(b - a)
        for s in np.arange(margin, n - margin, step):
            pts.append(a + (b - a) * s / n)
    return np.array(pts)


def dist_to_white(mask: np.ndarray) -> np.ndarray:
    """Per-pixel distance to the nearest set pixel of a bool mask."""
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)


# ---------------------------------------------------------------- canny


def test_canny_edges_lie_on_the_polygon_outline_and_cover_it():
    out = run_annotator("canny", polygon_image())
    assert out.shape == (160, 200, 3) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255} and (out[:, :, :1] == out).all()
    ys, xs = np.nonzero(out[:, :, 0])
    contour = POLY.reshape(-1, 1, 2).astype(np.float32)
    d = np.array([abs(cv2.pointPolygonTest(contour, (float(x), float(y)), True)) for x, y in zip(xs, ys)])
    assert len(d) > 300
    assert (d <= 2.0).mean() > 0.99, f"{(d > 2).sum()} edge pixels far from the outline"
    # Every part of the outline has an edge pixel nearby (corners included).
    near = dist_to_white(out[:, :, 0] > 0)
    pts = outline_points()
    assert all(near[int(round(y)), int(round(x))] <= 2.0 for x, y in pts)


def test_canny_thresholds_matter_and_are_checked():
    img = polygon_image(fill=(100, 100, 100))  # a 60-level step: 3x3 Sobel |gx|+|gy| 240..360
    assert run_annotator("canny", img).any()
    assert not run_annotator("canny", img, low_threshold=500, high_threshold=600).any()
    with pytest.raises(ValueError, match="low_threshold"):
        run_annotator("canny", img, low_threshold=-1)
    with pytest.raises(ValueError, match="above high_threshold"):
        run_annotator("canny", img, low_threshold=200, high_threshold=100)


# ---------------------------------------------------------------- mlsd_classic

METHODS = [m for m in ("lsd", "hough") if m == "hough" or available_method() == "lsd"]


@pytest.mark.parametrize("method", METHODS)
def test_mlsd_classic_finds_each_side(method):
    img = polygon_image()
    seg = detect_segments(img, method=method)
    long = seg[np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]) >= 20]
    assert len(long) >= 4
    for x0, y0, x1, y1 in long:
        p, q = np.array([x0, y0]), np.array([x1, y1])
        # Both endpoints near one and the same true side.
        assert min(max(seg_dist(p, a, b), seg_dist(q, a, b)) for a, b in SIDES) <= 3.0, (x0, y0, x1, y1)
    out = run_annotator("mlsd_classic", img, method=method)
    assert set(np.unique(out)) <= {0, 255} and (out[:, :, :1] == out).all()
    near = dist_to_white(out[:, :, 0] > 0)
    for a, b in SIDES:
        n = np.linalg.norm(b - a)
        pts = [a + (b - a) * t for t in np.linspace(4 / n, 1 - 4 / n, 50)]
        covered = np.mean([near[int(round(y)), int(round(x))] <= 2.0 for x, y in pts])
        assert covered >= 0.9, f"side {a}->{b} only {covered:.0%} covered by {method}"
    # Thickness 1: the drawing is no more than the segments' pixels.
    assert (out[:, :, 0] > 0).sum() < 1.2 * sum(max(abs(s[2] - s[0]), abs(s[3] - s[1])) + 1 for s in seg)


def test_mlsd_classic_length_and_contrast_knobs():
    img = polygon_image()
    seg = detect_segments(img, min_length=120)
    assert len(seg) >= 1
    for x0, y0, x1, y1 in seg:  # only the 141 px side is that long
        assert seg_dist(np.array([x0, y0]), *SIDES[0]) <= 3 and seg_dist(np.array([x1, y1]), *SIDES[0]) <= 3
    faint = polygon_image(fill=(60, 60, 60))  # 20 levels of contrast = 0.078 of full scale
    assert len(detect_segments(faint)) == 0  # below the default thr_v=0.1
    assert len(detect_segments(faint, thr_v=0.05)) >= 4
    assert len(detect_segments(img, max_lines=2)) == 2
    with pytest.raises(ValueError, match="method"):
        detect_segments(img, method="magic")


def test_mlsd_classic_blank_image_gives_black():
    out = run_annotator("mlsd_classic", np.full((64, 80, 3), 128, np.uint8))
    assert out.shape == (64, 80, 3) and not out.any()


# ---------------------------------------------------------------- invert / none


def test_invert_round_trips_and_flips_line_art():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    inv = get_annotator("invert")
    assert np.array_equal(inv(inv(img)), img)
    art = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(art, (5, 5), (60, 50), (0, 0, 0), 2)
    out = run_annotator("invert", art)
    lines = art[:, :, 0] == 0
    assert (out[lines] == 255).all() and (out[~lines] == 0).all()


def test_none_is_identity():
    img = polygon_image()
    out = run_annotator("none", img)
    assert np.array_equal(out, img) and out is not img


# ---------------------------------------------------------------- shuffle


def palette_image():
    """A 4x4 grid of 16 distinct flat colours, 24 px blocks."""
    rng = np.random.default_rng(1)
    colours = rng.choice(256, size=(16, 3), replace=False).astype(np.uint8)
    img = np.zeros((96, 96, 3), np.uint8)
    for i in range(16):
        r, c = divmod(i, 4)
        img[r * 24 : (r + 1) * 24, c * 24 : (c + 1) * 24] = colours[i]
    return img, colours


def test_shuffle_moves_content_but_keeps_input_colours():
    img, colours = palette_image()
    out = run_annotator("shuffle", img, seed=3, noise_cell=32)
    assert out.shape == img.shape and not np.array_equal(out, img)
    # Output pixels are input pixels sampled elsewhere: all but the few interpolated at block
    # seams are exactly palette colours. (The shuffle resamples with repetition, so the colour
    # proportions are not kept; the set of colours is.)
    flat = out.reshape(-1, 3)
    is_palette = (flat[:, None, :] == colours[None]).all(axis=2).any(axis=1)
    assert is_palette.mean() > 0.9
    # Every output colour lies inside the input's colour range.
    assert (out.min(axis=(0, 1)) >= img.min(axis=(0, 1))).all() and (out.max(axis=(0, 1)) <= img.max(axis=(0, 1))).all()


def test_shuffle_flow_is_smooth_and_spans_the_image():
    # A ramp encodes the sampled x position in its value: the output shows the flow field.
    ramp = np.tile(np.linspace(0, 255, 128).astype(np.uint8)[None, :, None], (128, 1, 3))
    out = run_annotator("shuffle", ramp, seed=11, noise_cell=64).astype(np.float32)[:, :, 0]
    assert out.min() <= 2 and out.max() >= 253  # the min-max normalised flow reaches both edges
    assert np.abs(np.diff(out, axis=1)).mean() < 8 and np.abs(np.diff(out, axis=0)).mean() < 8


def test_shuffle_seeded_and_sized():
    img, _ = palette_image()
    a = run_annotator("shuffle", img, seed=5, noise_cell=32)
    assert np.array_equal(a, run_annotator("shuffle", img, seed=5, noise_cell=32))
    assert not np.array_equal(a, run_annotator("shuffle", img, seed=6, noise_cell=32))
    # The draws are those of the global legacy generator seeded the same way (the original app).
    state = np.random.get_state()
    try:
        np.random.seed(5)
        first = np.random.uniform(0, 1, size=(96 // 32 + 2, 96 // 32 + 2))
    finally:
        np.random.set_state(state)
    assert np.array_equal(first, np.random.RandomState(5).uniform(0, 1, size=first.shape))
    big = run_annotator("shuffle", img, seed=5, height=64, width=80)
    assert big.shape == (64, 80, 3)


# ---------------------------------------------------------------- tile


@pytest.mark.parametrize("rate", [2.0, 3.0, 4.5])
def test_tile_downsamples_and_keeps_mean_colour(rate):
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.integers(0, 256, (101, 77, 3), dtype=np.uint8), (0, 0), 2)
    out = run_annotator("tile", img, down_sampling_rate=rate)
    assert out.shape == (int(101 / rate), int(77 / rate), 3)
    assert np.abs(out.reshape(-1, 3).mean(0) - img.reshape(-1, 3).mean(0)).max() < 1.5


def test_tile_small_rate_is_identity_and_bad_rate_raises():
    img = polygon_image()
    assert np.array_equal(run_annotator("tile", img), img)
    assert np.array_equal(run_annotator("tile", img, down_sampling_rate=1.05), img)
    with pytest.raises(ValueError, match="down_sampling_rate"):
        run_annotator("tile", img, down_sampling_rate=0)


# ---------------------------------------------------------------- recolor


def test_recolor_luminance_is_lab_lightness():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    out = run_annotator("recolor_luminance", img)
    L = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[:, :, 0]
    assert np.array_equal(out, np.stack([L] * 3, axis=2))
    # Pure green is much lighter than pure blue (a BGR/RGB mix-up would swap red and blue only).
    prim = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    r, g, b = run_annotator("recolor_luminance", prim)[0, :, 0].astype(int)
    assert g > r > b
    dark = run_annotator("recolor_luminance", img, gamma_correction=2.0)[:, :, 0]
    expect = np.round((L / 255.0) ** 2 * 255).astype(np.uint8)
    assert np.abs(dark.astype(int) - expect).max() <= 1
    with pytest.raises(ValueError, match="gamma"):
        run_annotator("recolor_luminance", img, gamma_correction=0)


def test_recolor_intensity_is_hsv_value():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    out = run_annotator("recolor_intensity", img)
    V = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[:, :, 2]
    assert np.array_equal(out[:, :, 0], V) and (out[:, :, :1] == out).all()
    bright = run_annotator("recolor_intensity", img, gamma_correction=0.5)[:, :, 0]
    assert (bright >= V).all() and (bright > V).any()


# ---------------------------------------------------------------- inpaint


def test_inpaint_hint_marks_mask_with_minus_one():
    img = polygon_image()
    mask = np.zeros((160, 200), bool)
    mask[50:90, 60:120] = True
    hint = inpaint_hint(img, mask)
    assert hint.dtype == np.float32 and hint.shape == (160, 200, 3)
    assert (hint[mask] == -1).all()
    assert np.array_equal(hint[~mask], img[~mask].astype(np.float32) / 255.0)
    view = run_annotator("inpaint", img, mask=mask.astype(np.uint8) * 255)
    assert view.dtype == np.uint8 and (view[mask] == 0).all() and np.array_equal(view[~mask], img[~mask])


def test_inpaint_mask_resize_blur_and_missing_mask():
    img = polygon_image()
    small = np.zeros((80, 100), np.uint8)
    small[20:50, 30:70] = 255  # a half-size mask: resized to the image
    hint = inpaint_hint(img, small)
    assert (hint[45:95, 65:135] == -1).all() and (hint[:35] >= 0).all()
    blurred = inpaint_hint(img, small, mask_blur=5.0)
    assert (blurred[55:85, 75:125] == -1).all() and (blurred[:30] >= 0).all()
    # Blurring rounds the corners off.
    assert hint[40, 60, 0] == -1 and blurred[40, 60, 0] >= 0
    with pytest.raises(TypeError, match="mask"):
        run_annotator("inpaint", img)


# ---------------------------------------------------------------- normal


def sphere_depth(h=129, w=129, r=50.0):
    """Inverse depth of a sphere (larger = nearer) on a zero background, as uint8 0..255."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rr = (xx - w // 2) ** 2 + (yy - h // 2) ** 2
    d = np.sqrt(np.clip(r * r - rr, 0, None))
    return np.round(d / d.max() * 255).astype(np.uint8)


def test_normal_on_sphere_points_outwards():
    depth = sphere_depth()
    out = run_annotator("normal", depth)  # (z, y, x) channel order, as the model was fed
    assert out.shape == (129, 129, 3) and out.dtype == np.uint8
    c, off = 64, 30  # 0.6 of the radius: inside the foreground (bg_th 0.4)
    z, y, x = (out[..., i].astype(int) for i in range(3))
    # Left of centre the surface rises towards the viewer to the right: +x (MiDaS convention).
    assert x[c, c - off] > 170 and x[c, c + off] < 85
    assert y[c - off, c] > 170 and y[c + off, c] < 85  # top: depth grows downward -> +y
    assert abs(x[c, c] - 127) <= 2 and abs(y[c, c] - 127) <= 2 and z[c, c] >= 250
    assert abs(y[c, c - off] - 127) <= 2 and abs(x[c - off, c] - 127) <= 2
    assert tuple(out[2, 2]) == (255, 127, 127)  # background is flat


def test_normal_matches_closed_form_on_a_ramp():
    # Depth rising by s per pixel: Sobel gives 8 s, so n = (8 s, 0, a) / |.|.
    s, a = 0.75, np.pi * 2.0
    d = np.tile(np.arange(64, dtype=np.float32) * s, (48, 1))
    n = normal_from_depth(d, a=a, bg_th=0.4)
    nx = 8 * s / np.hypot(8 * s, a)
    fg = (d - d.min()) / (d.max() - d.min()) >= 0.4
    fg[:, -1] = False  # the Sobel border reflects, so the last column differs
    assert np.allclose(n[fg, 0], nx, atol=1e-5) and np.allclose(n[fg, 1], 0, atol=1e-6)
    assert np.array_equal(n[:, 0], np.tile([0, 0, 1], (48, 1)).astype(np.float32))  # background column
    out = run_annotator("normal", np.zeros((48, 64, 3), np.uint8) + 9, depth=d, a=a)
    assert out[10, 50, 2] == int(nx * 127.5 + 127.5) and out[10, 50, 0] == int(a / np.hypot(8 * s, a) * 127.5 + 127.5)
    assert np.allclose(np.linalg.norm(n, axis=2), 1, atol=1e-5)


def test_normal_needs_depth_for_colour_images():
    rgb = polygon_image()
    with pytest.raises(ValueError, match="depth"):
        run_annotator("normal", rgb)
    depth = sphere_depth(160, 200)
    # A colour image with depth= gives the same map as the depth image itself.
    assert np.array_equal(run_annotator("normal", rgb, depth=depth), run_annotator("normal", depth))
    half = cv2.resize(depth, (100, 80), interpolation=cv2.INTER_AREA)
    assert run_annotator("normal", rgb, depth=half).shape == (160, 200, 3)
    with pytest.raises(ImageError, match="depth"):
        run_annotator("normal", rgb, depth=np.zeros(10))


# ---------------------------------------------------------------- scribble


def drawing(ink=0, paper=255):
    img = np.full((90, 120, 3), paper, np.uint8)
    cv2.line(img, (10, 10), (110, 80), (ink, ink, ink), 3)
    cv2.circle(img, (40, 60), 20, (ink, ink, ink), 2)
    return img


def test_scribble_polarity_handling():
    bow, wob = drawing(0, 255), drawing(255, 0)
    strokes = bow[:, :, 0] == 0
    expect = np.where(strokes[:, :, None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    assert detect_polarity(bow) == "black_on_white" and detect_polarity(wob) == "white_on_black"
    for img, pol in ((bow, "black_on_white"), (wob, "white_on_black")):
        assert np.array_equal(run_annotator("scribble", img), expect)
        assert np.array_equal(run_annotator("scribble", img, polarity=pol), expect)
    # Forcing the wrong polarity marks the paper instead of the ink.
    assert np.array_equal(run_annotator("scribble", bow, polarity="white_on_black"), 255 - expect)
    red_ink = bow.copy()
    red_ink[strokes] = (220, 0, 0)  # coloured ink on paper still counts
    assert np.array_equal(run_annotator("scribble", red_ink), expect)
    with pytest.raises(ValueError, match="polarity"):
        run_annotator("scribble", bow, polarity="sideways")


def test_nms_matches_directional_dilation():
    # Reference formulation: a pixel is kept if it equals the 3-neighbourhood max along some
    # direction, computed with OpenCV dilations (borders ignored by dilate).
    rng = np.random.default_rng(5)
    smooth = cv2.resize(rng.integers(0, 256, (12, 15)).astype(np.uint8), (75, 60), interpolation=cv2.INTER_CUBIC)
    band = np.zeros((60, 75), np.uint8)
    band[25:36] = 255  # flat along x: ties everywhere, which count as maxima
    kernels = [np.zeros((3, 3), np.uint8) for _ in range(4)]
    kernels[0][1, :] = 1
    kernels[1][:, 1] = 1
    np.fill_diagonal(kernels[2], 1)
    np.fill_diagonal(np.fliplr(kernels[3]), 1)
    for x in (smooth, band):
        blurred = cv2.GaussianBlur(x.astype(np.float32), (0, 0), 3.0)
        kept = np.zeros_like(blurred)
        for k in kernels:
            m = cv2.dilate(blurred, k) == blurred
            kept[m] = blurred[m]
        for t in (60, 127):
            expect = np.where(kept > t, 255, 0).astype(np.uint8)
            assert expect.any() and np.array_equal(nms(x, t, 3.0), expect)


def test_fake_scribble_thins_a_soft_edge_into_a_stroke():
    soft = np.zeros((100, 140), np.uint8)
    cv2.circle(soft, (70, 50), 35, 255, 7)  # a fat soft ring of radius 35
    soft = cv2.GaussianBlur(soft, (0, 0), 3)
    yy, xx = np.mgrid[0:100, 0:140]
    radius = np.hypot(xx - 70, yy - 50)
    # NMS alone thins the 13 px wide ring (> 127) to about 1.5 px on average.
    thin = nms(soft, 127, 3.0) > 0
    assert ((soft > 127).sum() > 5 * thin.sum()) and thin.sum() < 2 * 2 * np.pi * 35
    assert np.abs(radius[thin] - 35).max() <= 4.5  # widest where the ring runs along an axis
    img = np.full((100, 140, 3), 128, np.uint8)
    out = run_annotator("fake_scribble", img, soft_edge=soft)
    assert out.shape == (100, 140, 3) and set(np.unique(out)) <= {0, 255}
    stroke = out[:, :, 0] > 0
    # The re-thickened stroke follows the ridge: centred on it, nothing away from it.
    assert np.abs(radius[stroke] - 35).max() <= 9
    assert stroke[np.abs(radius - 35) <= 1].all()
    # A half-size map is resized to the image first.
    small = cv2.resize(soft, (70, 50), interpolation=cv2.INTER_AREA)
    stroke2 = run_annotator("fake_scribble", img, soft_edge=small)[:, :, 0] > 0
    assert np.abs(radius[stroke2] - 35).max() <= 10 and stroke2[np.abs(radius - 35) <= 1].all()


def test_fake_scribble_calls_hed_or_explains(monkeypatch):
    img = np.full((64, 64, 3), 128, np.uint8)
    real = registry.get_annotator

    def hed_without_weights(image, weights_dir=None, **kw):
        raise FileNotFoundError("annotator weights file 'ControlNetHED.pth' not found")

    monkeypatch.setattr(registry, "get_annotator", lambda n: hed_without_weights if n == "hed" else real(n))
    with pytest.raises(FileNotFoundError, match="soft_edge=.*weights_dir.*ControlNetHED"):
        run_annotator("fake_scribble", img)
    calls = {}

    def fake_hed(image, weights_dir=None, **kw):
        calls["args"] = (image.shape, weights_dir, kw)
        m = np.zeros(image.shape[:2], np.uint8)
        m[28:37] = 255
        return m

    monkeypatch.setattr(registry, "get_annotator", lambda n: fake_hed if n == "hed" else real(n))
    out = run_annotator("fake_scribble", img, weights_dir="/nowhere", safe=True)
    assert calls["args"] == ((64, 64, 3), "/nowhere", {"safe": True})
    assert out[32, 32, 0] == 255 and not out[:10].any()


# ---------------------------------------------------------------- all annotators: input kinds

MINE = {
    "canny": {},
    "scribble": {},
    "fake_scribble": {"soft_edge": np.tile(np.linspace(0, 255, 77).astype(np.uint8), (101, 1))},
    "invert": {},
    "shuffle": {"seed": 0},
    "tile": {},
    "inpaint": {"mask": np.eye(101, 77, dtype=bool)},
    "recolor_luminance": {},
    "recolor_intensity": {},
    "none": {},
    "mlsd_classic": {},
    "normal": {},
}


def input_kinds():
    rng = np.random.default_rng(6)
    gray = cv2.GaussianBlur(rng.integers(0, 256, (101, 77), dtype=np.uint8), (0, 0), 3)
    return {
        "gray": gray,
        "rgba": np.dstack([gray, gray, gray, np.full_like(gray, 200)]),
        "uint16": gray.astype(np.uint16) * 257,
        "odd_rgb": np.dstack([gray, gray, gray]),
        "float01": gray.astype(np.float32) / 255.0,
    }


def test_every_owned_name_is_registered():
    assert set(MINE) <= set(list_annotators())


@pytest.mark.parametrize("name", sorted(MINE))
def test_accepts_all_image_kinds(name):
    for kind, img in input_kinds().items():
        out = run_annotator(name, img, **MINE[name])
        assert out.dtype == np.uint8 and out.shape == (101, 77, 3), (name, kind, out.shape)


@pytest.mark.parametrize("name", sorted(MINE))
@pytest.mark.parametrize("bad", ["not an image", np.arange(10), np.zeros((4, 5, 6))])
def test_rejects_non_images(name, bad):
    with pytest.raises((ImageError, TypeError, ValueError)) as err:
        run_annotator(name, bad, **MINE[name])
    assert any(w in str(err.value) for w in ("dtype", "shape", "image")), str(err.value)
    # Called directly (not through run_annotator) they check their input too.
    with pytest.raises(ImageError):
        get_annotator(name)(bad, **MINE[name])
