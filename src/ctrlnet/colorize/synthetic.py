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
