"""Named colours for the fill50k-style data set: the CSS/X11 colour vocabulary, names split into words.

The original fill50k prompts use the CSS named colours with multi-word names written as words
("pale golden rod circle with old lace background", "light sea green circle with ..."). Here that
vocabulary is the 140 CSS3/X11 names (the CSS Color Module Level 4 list without the duplicate
``*grey`` spellings and ``rebeccapurple``), each compound split into its words. Two names may share
a value (``aqua``/``cyan``, ``fuchsia``/``magenta``), as in CSS.

A circle and its background are drawn only when they are at least :data:`MIN_PAIR_DELTA_E` apart
in CIE Lab (CIE76 Delta E, D65 sRGB), so every circle is clearly visible; in RGB that is at least
51.7 apart (measured over the vocabulary).
"""

from __future__ import annotations

import hashlib

import numpy as np

# The 140 CSS/X11 names, compounds split into words, with their sRGB values.
COLORS: dict[str, tuple[int, int, int]] = {
    "alice blue": (240, 248, 255), "antique white": (250, 235, 215), "aqua": (0, 255, 255),
    "aqua marine": (127, 255, 212), "azure": (240, 255, 255), "beige": (245, 245, 220),
    "bisque": (255, 228, 196), "black": (0, 0, 0), "blanched almond": (255, 235, 205),
    "blue": (0, 0, 255), "blue violet": (138, 43, 226), "brown": (165, 42, 42),
    "burly wood": (222, 184, 135), "cadet blue": (95, 158, 160), "chartreuse": (127, 255, 0),
    "chocolate": (210, 105, 30), "coral": (255, 127, 80), "corn flower blue": (100, 149, 237),
    "corn silk": (255, 248, 220), "crimson": (220, 20, 60), "cyan": (0, 255, 255),
    "dark blue": (0, 0, 139), "dark cyan": (0, 139, 139), "dark golden rod": (184, 134, 11),
    "dark gray": (169, 169, 169), "dark green": (0, 100, 0), "dark khaki": (189, 183, 107),
    "dark magenta": (139, 0, 139), "dark olive green": (85, 107, 47), "dark orange": (255, 140, 0),
    "dark orchid": (153, 50, 204), "dark red": (139, 0, 0), "dark salmon": (233, 150, 122),
    "dark sea green": (143, 188, 143), "dark slate blue": (72, 61, 139), "dark slate gray": (47, 79, 79),
    "dark turquoise": (0, 206, 209), "dark violet": (148, 0, 211), "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255), "dim gray": (105, 105, 105), "dodger blue": (30, 144, 255),
    "fire brick": (178, 34, 34), "floral white": (255, 250, 240), "forest green": (34, 139, 34),
    "fuchsia": (255, 0, 255), "gainsboro": (220, 220, 220), "ghost white": (248, 248, 255),
    "gold": (255, 215, 0), "golden rod": (218, 165, 32), "gray": (128, 128, 128),
    "green": (0, 128, 0), "green yellow": (173, 255, 47), "honey dew": (240, 255, 240),
    "hot pink": (255, 105, 180), "indian red": (205, 92, 92), "indigo": (75, 0, 130),
    "ivory": (255, 255, 240), "khaki": (240, 230, 140), "lavender": (230, 230, 250),
    "lavender blush": (255, 240, 245), "lawn green": (124, 252, 0), "lemon chiffon": (255, 250, 205),
    "light blue": (173, 216, 230), "light coral": (240, 128, 128), "light cyan": (224, 255, 255),
    "light golden rod yellow": (250, 250, 210), "light gray": (211, 211, 211), "light green": (144, 238, 144),
    "light pink": (255, 182, 193), "light salmon": (255, 160, 122), "light sea green": (32, 178, 170),
    "light sky blue": (135, 206, 250), "light slate gray": (119, 136, 153), "light steel blue": (176, 196, 222),
    "light yellow": (255, 255, 224), "lime": (0, 255, 0), "lime green": (50, 205, 50),
    "linen": (250, 240, 230), "magenta": (255, 0, 255), "maroon": (128, 0, 0),
    "medium aqua marine": (102, 205, 170), "medium blue": (0, 0, 205), "medium orchid": (186, 85, 211),
    "medium purple": (147, 112, 219), "medium sea green": (60, 179, 113), "medium slate blue": (123, 104, 238),
    "medium spring green": (0, 250, 154), "medium turquoise": (72, 209, 204),
    "medium violet red": (199, 21, 133), "midnight blue": (25, 25, 112), "mint cream": (245, 255, 250),
    "misty rose": (255, 228, 225), "moccasin": (255, 228, 181), "navajo white": (255, 222, 173),
    "navy": (0, 0, 128), "old lace": (253, 245, 230), "olive": (128, 128, 0),
    "olive drab": (107, 142, 35), "orange": (255, 165, 0), "orange red": (255, 69, 0),
    "orchid": (218, 112, 214), "pale golden rod": (238, 232, 170), "pale green": (152, 251, 152),
    "pale turquoise": (175, 238, 238), "pale violet red": (219, 112, 147), "papaya whip": (255, 239, 213),
    "peach puff": (255, 218, 185), "peru": (205, 133, 63), "pink": (255, 192, 203),
    "plum": (221, 160, 221), "powder blue": (176, 224, 230), "purple": (128, 0, 128),
    "red": (255, 0, 0), "rosy brown": (188, 143, 143), "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19), "salmon": (250, 128, 114), "sandy brown": (244, 164, 96),
    "sea green": (46, 139, 87), "sea shell": (255, 245, 238), "sienna": (160, 82, 45),
    "silver": (192, 192, 192), "sky blue": (135, 206, 235), "slate blue": (106, 90, 205),
    "slate gray": (112, 128, 144), "snow": (255, 250, 250), "spring green": (0, 255, 127),
    "steel blue": (70, 130, 180), "tan": (210, 180, 140), "teal": (0, 128, 128),
    "thistle": (216, 191, 216), "tomato": (255, 99, 71), "turquoise": (64, 224, 208),
    "violet": (238, 130, 238), "wheat": (245, 222, 179), "white": (255, 255, 255),
    "white smoke": (245, 245, 245), "yellow": (255, 255, 0), "yellow green": (154, 205, 50),
}

# The 20 colours the first embedded model was trained on (kept for its benchmark row and tests).
BASIC_20: tuple[str, ...] = (
    "red", "dark orange", "gold", "pale golden rod", "lime green", "forest green", "teal", "turquoise",
    "deep sky blue", "royal blue", "navy", "medium purple", "dark magenta", "hot pink", "light coral",
    "saddle brown", "slate gray", "old lace", "white", "black",
)

# Vocabularies by the name a model file records (metadata ``ctrlnet_defaults["vocabulary"]``).
VOCABULARIES: dict[str, dict[str, tuple[int, int, int]]] = {
    "css": COLORS,
    "basic20": {n: COLORS[n] for n in BASIC_20},
}

# Circle/background pairs must differ this much (CIE76 Delta E in Lab) to be clearly visible.
MIN_PAIR_DELTA_E = 40.0

# The share of (circle, background) pairs kept out of training, for the fidelity benchmark.
HELDOUT_PAIR_FRACTION = 0.05


def vocabulary(name: str) -> dict[str, tuple[int, int, int]]:
    """The colour dict of a vocabulary name ("css", "basic20"); KeyError naming the known ones."""
    try:
        return VOCABULARIES[name]
    except KeyError:
        raise KeyError(f"unknown colour vocabulary {name!r}; known: {', '.join(VOCABULARIES)}") from None


def lab(rgb) -> np.ndarray:
    """CIE Lab (D65, the OpenCV sRGB matrix) of RGB triples (..., 3) in 0..255 -> float64 (..., 3)."""
    from ctrlnet.colorize.lab import _lab_float

    a = np.asarray(rgb, np.float64)
    return _lab_float(np.round(a).clip(0, 255).astype(np.uint8).reshape(1, -1, 3))[0].reshape(a.shape)


def color_distance(a, b) -> float:
    """CIE76 Delta E (Euclidean distance in Lab) between two RGB triples."""
    la, lb = lab(np.stack([np.asarray(a, np.float64), np.asarray(b, np.float64)]))
    return float(np.linalg.norm(la - lb))


def color_pairs(colors: dict[str, tuple[int, int, int]] = COLORS,
                min_delta_e: float = MIN_PAIR_DELTA_E) -> list[tuple[str, str]]:
    """All (circle, background) name pairs whose colours are at least ``min_delta_e`` apart."""
    names = list(colors)
    L = lab(np.array([colors[n] for n in names]))  # (N, 3)
    d = np.linalg.norm(L[:, None] - L[None], axis=-1)
    return [(a, b) for i, a in enumerate(names) for j, b in enumerate(names) if i != j and d[i, j] >= min_delta_e]


def is_heldout_pair(circle: str, background: str, fraction: float = HELDOUT_PAIR_FRACTION) -> bool:
    """Whether a (circle, background) pair belongs to the held-out share: a hash of the two names,
    so the split does not depend on the vocabulary's order or on any random state."""
    h = hashlib.sha256(f"{circle}|{background}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split_pairs(pairs: list[tuple[str, str]], fraction: float = HELDOUT_PAIR_FRACTION
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) by :func:`is_heldout_pair`."""
    held = [p for p in pairs if is_heldout_pair(*p, fraction=fraction)]
    train = [p for p in pairs if not is_heldout_pair(*p, fraction=fraction)]
    return train, held


def basic20_pairs() -> list[tuple[str, str]]:
    """The pairs the first embedded model was trained and benchmarked on: the 20 :data:`BASIC_20`
    colours, RGB distance >= 120 (the rule then), in that order, so its benchmark row is reproduced."""
    rgb = {n: np.asarray(COLORS[n], np.float64) for n in BASIC_20}
    return [(a, b) for a in BASIC_20 for b in BASIC_20
            if a != b and np.linalg.norm(rgb[a] - rgb[b]) >= 120.0]


def fill50k_prompt(circle: str, background: str) -> str:
    return f"{circle} circle with {background} background"


def parse_fill50k_prompt(prompt: str, colors: dict[str, tuple[int, int, int]] = COLORS) -> tuple[str, str]:
    """(circle, background) colour names of a fill50k prompt; ValueError if it is not one."""
    text = " ".join(prompt.strip().lower().split())
    if " circle with " not in text or not text.endswith(" background"):
        raise ValueError(f"not a fill50k prompt: {prompt!r}")
    circle, rest = text.split(" circle with ", 1)
    background = rest[: -len(" background")]
    for name in (circle, background):
        if name not in colors:
            raise ValueError(f"unknown colour {name!r} in prompt {prompt!r}")
    return circle, background
