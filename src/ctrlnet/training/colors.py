"""Named colours for the fill50k-style data set (CSS colour values, names split into words)."""

from __future__ import annotations

import numpy as np

# Well-separated CSS colours; multi-word names are written as words ("pale golden rod"), as in the
# prompts of the original fill50k ("pale golden rod circle with old lace background").
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "dark orange": (255, 140, 0),
    "gold": (255, 215, 0),
    "pale golden rod": (238, 232, 170),
    "lime green": (50, 205, 50),
    "forest green": (34, 139, 34),
    "teal": (0, 128, 128),
    "turquoise": (64, 224, 208),
    "deep sky blue": (0, 191, 255),
    "royal blue": (65, 105, 225),
    "navy": (0, 0, 128),
    "medium purple": (147, 112, 219),
    "dark magenta": (139, 0, 139),
    "hot pink": (255, 105, 180),
    "light coral": (240, 128, 128),
    "saddle brown": (139, 69, 19),
    "slate gray": (112, 128, 144),
    "old lace": (253, 245, 230),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# Circle/background pairs must differ this much (RGB distance) so the circle is visible.
MIN_PAIR_DISTANCE = 120.0


def color_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def color_pairs(colors: dict[str, tuple[int, int, int]] = COLORS,
                min_distance: float = MIN_PAIR_DISTANCE) -> list[tuple[str, str]]:
    """All (circle, background) name pairs whose colours are at least ``min_distance`` apart."""
    names = list(colors)
    return [(a, b) for a in names for b in names
            if a != b and color_distance(colors[a], colors[b]) >= min_distance]


def fill50k_prompt(circle: str, background: str) -> str:
    return f"{circle} circle with {background} background"


def parse_fill50k_prompt(prompt: str, colors: dict[str, tuple[int, int, int]] = COLORS) -> tuple[str, str]:
    """(circle, background) colour names of a fill50k prompt; ValueError if it is not one."""
    text = prompt.strip().lower()
    if " circle with " not in text or not text.endswith(" background"):
        raise ValueError(f"not a fill50k prompt: {prompt!r}")
    circle, rest = text.split(" circle with ", 1)
    background = rest[: -len(" background")]
    for name in (circle, background):
        if name not in colors:
            raise ValueError(f"unknown colour {name!r} in prompt {prompt!r}")
    return circle, background
