"""Synthetic colour clips for training and benchmarking the reference colorizer offline.

A clip is a textured background (gradient, stripes, checks or smooth blotches in two colours)
that pans, with 3-6 coloured shapes (circles, ellipses, boxes, triangles, some striped) moving
and bouncing off the borders. The colours of a clip share two or three CIE lightness levels, so
lightness alone does not identify them. Colours stay fixed through a clip, so the first frame is a good
reference for the later ones, as in real footage of one shot. Everything is a pure function of
the seed.
"""

from __future__ import annotations

import cv2
import numpy as np

from ctrlnet.colorize.lab import _rgb_float


def _random_color(rng: np.random.Generator, lightness: float) -> np.ndarray:
    """An RGB colour (0..255 floats) of the given CIE L with a random, clearly visible hue."""
    for _ in range(1000):
        a, b = rng.uniform(-90, 90, 2)
        if a * a + b * b < 30**2:
            continue
        rgb = _rgb_float(np.array([lightness, a, b], np.float64))
        if (rgb >= 0).all() and (rgb <= 1).all():
            return rgb * 255.0
    return np.full(3, lightness * 2.55)  # unreachable for mid lightness; a gray as a last resort


def _background(rng: np.random.Generator, size: int, levels: np.ndarray) -> np.ndarray:
    """A float (2S, 2S, 3) texture, twice the frame so the view can pan over it."""
    n = 2 * size
    c1, c2 = _random_color(rng, rng.choice(levels)), _random_color(rng, rng.choice(levels))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    kind = rng.integers(0, 4)
    if kind == 0:  # linear gradient
        ang = rng.uniform(0, np.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # soft stripes
        period = rng.uniform(0.1, 0.3)
        ang = rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period)
    elif kind == 2:  # checks
        cell = rng.uniform(0.08, 0.2)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    else:  # smooth blotches
        coarse = rng.random((6, 6)).astype(np.float32)
        t = cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


class _Shape:
    def __init__(self, rng: np.random.Generator, size: int, levels: np.ndarray):
        self.kind = ["circle", "ellipse", "box", "triangle"][int(rng.integers(0, 4))]
        self.r = rng.uniform(0.08, 0.2) * size
        self.pos = rng.uniform(self.r, size - self.r, 2)
        speed = rng.uniform(0.2, 1.0) * size / 128
        ang = rng.uniform(0, 2 * np.pi)
        self.vel = np.array([np.cos(ang), np.sin(ang)]) * speed
        self.spin = rng.uniform(-1.5, 1.5)  # degrees per frame
        self.angle = rng.uniform(0, 360)
        self.color = _random_color(rng, rng.choice(levels))
        self.stripe = _random_color(rng, rng.choice(levels)) if rng.random() < 0.3 else None
        self.size = size

    def step(self) -> None:
        self.pos = self.pos + self.vel
        for k in range(2):
            if self.pos[k] < self.r or self.pos[k] > self.size - self.r:
                self.vel[k] = -self.vel[k]
                self.pos[k] = np.clip(self.pos[k], self.r, self.size - self.r)
        self.angle += self.spin

    def draw(self, img: np.ndarray) -> None:
        mask = np.zeros(img.shape[:2], np.uint8)
        s = 16  # sub-pixel precision of cv2 drawing (4 fractional bits)
        cx, cy = (self.pos * s).round().astype(int)
        r = int(self.r * s)
        if self.kind == "circle":
            cv2.circle(mask, (cx, cy), r, 255, -1, cv2.LINE_AA, 4)
        elif self.kind == "ellipse":
            cv2.ellipse(mask, (cx, cy), (r, r // 2), self.angle, 0, 360, 255, -1, cv2.LINE_AA, 4)
        else:
            k = 4 if self.kind == "box" else 3
            a = np.deg2rad(self.angle) + np.arange(k) * 2 * np.pi / k
            pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1).round().astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA, 4)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        color = np.broadcast_to(self.color, img.shape).copy()
        if self.stripe is not None:
            yy = np.arange(img.shape[0])[:, None, None]
            color = np.where((yy // 4) % 2 == 0, self.color, self.stripe)
        img[:] = img * (1 - alpha) + color * alpha


def synthetic_clip(n_frames: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``n_frames`` RGB uint8 frames (size, size, 3) of one synthetic shot."""
    rng = np.random.default_rng(seed)
    # colours share two or three lightness levels: gray alone cannot tell them apart, so a
    # colorizer has to find where each colour went, not look it up by lightness
    levels = rng.choice(np.array([35.0, 55.0, 75.0]), size=int(rng.integers(2, 4)), replace=False)
    bg = _background(rng, size, levels)
    pan = rng.uniform(-0.4, 0.4, 2) * size / 128  # pixels per frame
    off = rng.uniform(0, size / 2, 2)
    shapes = [_Shape(rng, size, levels) for _ in range(int(rng.integers(3, 7)))]
    return _film(bg, shapes, size, n_frames, pan, off)


def _film(bg: np.ndarray, shapes: list, size: int, n_frames: int, pan: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    """Frames of a view of ``size`` px panning over the texture ``bg`` by ``pan`` px per frame from
    ``off``, with ``shapes`` drawn and stepped each frame. (H, W, 3) uint8 each."""
    frames = []
    for _ in range(n_frames):
        ox, oy = off.round().astype(int)
        img = bg[oy:oy + size, ox:ox + size].copy()
        for sh in shapes:
            sh.draw(img)
            sh.step()
        off = off + pan
        for k in range(2):  # the view bounces inside the texture instead of wrapping (a jump)
            if not 0 <= off[k] <= size:
                pan[k] = -pan[k]
                off[k] = np.clip(off[k], 0, size)
        frames.append(img.clip(0, 255).round().astype(np.uint8))
    return frames


# ---- clips where lightness cannot decide the colour ----------------------------------------------

def _level(rgb: np.ndarray) -> int:
    """OpenCV 8-bit Lab lightness of one uint8 RGB colour."""
    return int(cv2.cvtColor(rgb.reshape(1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2LAB)[0, 0, 0])


def _ab(rgb: np.ndarray) -> np.ndarray:
    from ctrlnet.colorize.lab import _lab_float

    return _lab_float(rgb.reshape(1, 1, 3).astype(np.uint8))[0, 0, 1:]


def isoluminant_color(rng: np.random.Generator, level: int, hue: float, chroma: float) -> np.ndarray | None:
    """A uint8 RGB colour whose 8-bit lightness is exactly ``level`` (OpenCV L, 0..255) with about
    the given Lab hue (radians) and chroma; None when that is outside the sRGB gamut."""
    L = level * 100.0 / 255.0
    rgb = _rgb_float(np.array([L, chroma * np.cos(hue), chroma * np.sin(hue)], np.float64))
    if (rgb < 0).any() or (rgb > 1).any():
        return None
    c = np.round(rgb * 255.0).astype(np.int16)
    for _ in range(8):  # rounding moved L by a level or two: a gray nudge puts it back exactly
        d = _level(c.clip(0, 255)) - level
        if d == 0:
            return c.clip(0, 255).astype(np.uint8)
        c = c - np.sign(d)
        if (c < 0).any() or (c > 255).any():
            return None
    return None


def isoluminant_pair(rng: np.random.Generator, level: int, min_ab_distance: float = 60.0,
                     tries: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 RGB colours of exactly the same 8-bit lightness ``level`` whose Lab (a, b) are at
    least ``min_ab_distance`` apart (roughly opposite hues). ValueError when none is found
    (lightness too close to black or white for that much chroma)."""
    for _ in range(tries):
        h = rng.uniform(0, 2 * np.pi)
        a = isoluminant_color(rng, level, h, rng.uniform(30, 60))
        b = isoluminant_color(rng, level, h + np.pi + rng.uniform(-0.6, 0.6), rng.uniform(30, 60))
        if a is not None and b is not None and np.linalg.norm(_ab(a) - _ab(b)) >= min_ab_distance:
            return a, b
    raise ValueError(f"no two colours of lightness level {level} are {min_ab_distance} apart in (a, b)")


# 8-bit lightness levels the clips draw from (L* about 39..71): mid-tones hold the most chroma.
ISO_LEVELS = np.arange(100, 182, 2)
ISO_MIN_LEVEL_GAP = 40  # levels of one clip differ this much (about 16 L*): clearly distinct grays
ISO_MIN_AB = 60.0


def _texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """A hard-edged (anti-aliased) two-region mask (n, n) float in [0, 1], about half each:
    stripes, checks or blobs. Hard edges: a gradient would give every mixture its own lightness."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes
        period, ang = rng.uniform(0.15, 0.35), rng.uniform(0, np.pi)
        t = np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period)
    elif kind == 1:  # checks
        cell = rng.uniform(0.12, 0.25)
        t = np.cos(np.pi * xx / cell) * np.cos(np.pi * yy / cell)
    else:  # blobs: smooth noise cut at its median
        coarse = rng.random((5, 5)).astype(np.float32)
        t = cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC)
        t = t - np.median(t)
    # about one pixel of anti-aliasing across the edge
    grad = np.hypot(*np.gradient(t)) + 1e-6
    return np.clip(0.5 + t / grad / 1.5, 0, 1)


class _IsoShape(_Shape):
    """A shape filled with the other hue of a lightness level the background also uses, with a
    neutral outline (so it stays visible in gray), moving, turning and changing size."""

    def __init__(self, rng, size, fill, stripe, outline, outline_px):
        super().__init__(rng, size, np.array([50.0]))
        self.r = rng.uniform(0.12, 0.24) * size
        self.pos = rng.uniform(self.r, size - self.r, 2)
        self.color, self.stripe = fill.astype(np.float64), None if stripe is None else stripe.astype(np.float64)
        self.outline, self.outline_px = outline.astype(np.float64), outline_px
        self.r0, self.phase, self.pulse = self.r, rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
        self.t = 0

    def step(self) -> None:
        super().step()
        self.t += 1
        self.r = self.r0 * (1 + self.pulse * np.sin(self.phase + self.t * 0.15))

    def draw(self, img: np.ndarray) -> None:
        fill, r = self.color, self.r
        self.color, self.r = self.outline, r + self.outline_px  # the outline: a slightly larger shape under it
        stripe, self.stripe = self.stripe, None
        super().draw(img)
        self.color, self.r, self.stripe = fill, r, stripe
        super().draw(img)


def isoluminant_clip(n_frames: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``n_frames`` RGB uint8 frames (size, size, 3) of a shot where lightness cannot decide colour.

    Two lightness levels; each holds two colours of exactly the same 8-bit Lab lightness and
    opposite hues (at least :data:`ISO_MIN_AB` apart in a, b). The background is a hard-edged
    two-region texture (one hue of each level) that pans; 3-6 shapes filled with the other hue of
    a level (some striped across both levels) move, turn and pulse in size, each with a thin
    neutral outline so the gray frame still shows where it is. A pixel's lightness thus names
    two colours about equally often: a lightness -> colour table (the nearest-luminance baseline)
    is wrong on about half of every level, while a colorizer that finds where each region went
    can be right. Colours stay fixed through the clip. A pure function of the seed.
    """
    rng = np.random.default_rng(seed)
    lo = int(rng.choice(ISO_LEVELS[ISO_LEVELS <= ISO_LEVELS.max() - ISO_MIN_LEVEL_GAP]))
    hi = int(rng.choice(ISO_LEVELS[ISO_LEVELS >= lo + ISO_MIN_LEVEL_GAP]))
    (a1, b1), (a2, b2) = isoluminant_pair(rng, lo, ISO_MIN_AB), isoluminant_pair(rng, hi, ISO_MIN_AB)
    # the background takes one hue of each level, the shapes the other
    if rng.random() < 0.5:
        a1, b1 = b1, a1
    if rng.random() < 0.5:
        a2, b2 = b2, a2
    n = 2 * size
    t = _texture(rng, n)[..., None]
    bg = a1.astype(np.float64) * (1 - t) + a2.astype(np.float64) * t  # (2S, 2S, 3)
    outline = np.full(3, 20.0) if rng.random() < 0.5 else np.full(3, 240.0)
    outline_px = max(1.0, size / 96)
    shapes = []
    first = int(rng.integers(0, 2))
    for k in range(int(rng.integers(3, 7))):  # fills alternate: both levels hold two hues
        fill, other = (b1, b2) if (k + first) % 2 == 0 else (b2, b1)
        striped = k >= 2 and rng.random() < 0.3  # the first two are solid: one of each level for sure
        shapes.append(_IsoShape(rng, size, fill, other if striped else None, outline, outline_px))
    pan = rng.uniform(-0.4, 0.4, 2) * size / 128
    off = rng.uniform(0, size / 2, 2)
    return _film(bg, shapes, size, n_frames, pan, off)


CLIP_KINDS = ("isoluminant", "classic")


def make_clip(kind: str, n_frames: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """A clip of ``kind`` (:data:`CLIP_KINDS`): ``isoluminant`` (:func:`isoluminant_clip`) or
    ``classic`` (:func:`synthetic_clip`). ValueError for another kind."""
    if kind == "isoluminant":
        return isoluminant_clip(n_frames, size, seed)
    if kind == "classic":
        return synthetic_clip(n_frames, size, seed)
    raise ValueError(f"clip kind must be one of {', '.join(CLIP_KINDS)}, got {kind!r}")
