"""The built-in synthetic image-text set: coloured shapes on a plain background, captioned in a fixed grammar.

Offline and deterministic: sample i of a split is drawn from numpy's generator seeded by
(seed, split, i) alone, so the same seed gives the same pixels and captions on every machine and
any sample can be drawn without the others; the two splits use different seeds, so no held-out
image is a training image (the 5 x 6 x 9 = 270 single-object attribute triples all occur in both,
each drawn with its own jitter of place, size, tint and background).

Caption grammar (what caption() writes and caption_attributes() reads, nothing else):
    one object:   "a {colour} {shape} at the {position}"        "a red circle at the top left"
    two objects:  "a {colour} {shape} {relation} a {colour2} {shape2}"   "a red circle left of a blue square"
    colour   red | green | blue | yellow | purple | white
    shape    circle | square | triangle | diamond | cross
    position top left | top | top right | left | centre | right | bottom left | bottom | bottom right
             (the 3 x 3 grid, row by row)
    relation left of | right of | above | below (left/right when the columns differ, else above/below)
A greedy-decoding benchmark prompts with the image span and then CAPTION_PROMPT ("a"): the model
completes " red circle at the top left" and <|endoftext|>.

Pixels are drawn without Pillow: each shape is an exact inequality on a grid 4x finer than the
image, averaged down (anti-aliased edges), so the pixels do not depend on a library's rasteriser.
Shapes: S image side in pixels; images are (3, S, S) uint8, channels first.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np

COLOURS = {  # name -> RGB; hues far apart so that a tint jitter of +-20 keeps them apart
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
    "yellow": (230, 210, 50), "purple": (150, 60, 200), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
CAPTION_PROMPT = "a"
SPLIT_IDS = {"train": 0, "val": 1}
GENERATOR_VERSION = 1  # bump when the pixels or captions of a seed change (it is in the data fingerprint)
SUPERSAMPLE = 4
TINT_JITTER = 20
BACKGROUND_MAX = 50  # background grey level drawn in [0, 50]: dark, below every shape colour's brightest channel


# ----------------------------------------------------------------------------- captions

def caption(attrs: dict) -> str:
    """The caption of a sample's attributes (the dict draw_sample returns)."""
    if "relation" in attrs:
        return f"a {attrs['colour']} {attrs['shape']} {attrs['relation']} a {attrs['colour2']} {attrs['shape2']}"
    return f"a {attrs['colour']} {attrs['shape']} at the {attrs['position']}"


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "top left"


_ONE = re.compile(rf"a ({_alternation(COLOURS)}) ({_alternation(SHAPES)}) at the ({_alternation(POSITIONS)})")
_TWO = re.compile(rf"a ({_alternation(COLOURS)}) ({_alternation(SHAPES)}) ({_alternation(RELATIONS)}) "
                  rf"a ({_alternation(COLOURS)}) ({_alternation(SHAPES)})")


def caption_attributes(text: str) -> dict:
    """The attributes a caption names: {"colour", "shape", "position"} for one object, {"colour",
    "shape", "relation", "colour2", "shape2"} for two; {} when `text` (stripped) is not a caption of
    the grammar, so that a benchmark counts it as a miss."""
    text = text.strip()
    m = _ONE.fullmatch(text)
    if m:
        return {"colour": m[1], "shape": m[2], "position": m[3]}
    m = _TWO.fullmatch(text)
    if m:
        return {"colour": m[1], "shape": m[2], "relation": m[3], "colour2": m[4], "shape2": m[5]}
    return {}


# ----------------------------------------------------------------------------- drawing

def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` of radius r centred at dx = dy = 0 (y grows downwards)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r  # about the circle's area
    if shape == "diamond":
        return ax + ay <= 1.15 * r
    if shape == "cross":
        arm = 0.35 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "triangle":  # apex up at -r, base at +0.8r spanning [-r, r]
        return (dy <= 0.8 * r) & (dy >= -r) & (ax <= (dy + r) / 1.8)
    raise ValueError(f"shape={shape!r} is unknown: expected one of {', '.join(SHAPES)}")


def _place(rng: np.random.Generator, image_size: int, cell: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius in pixels of an object in grid cell `cell` (row-major 3 x 3)."""
    c = image_size / 3
    row, col = divmod(cell, 3)
    cx = (col + 0.5 + rng.uniform(-0.12, 0.12)) * c
    cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) * c
    return cx, cy, rng.uniform(0.28, 0.38) * c


def _paint(image: np.ndarray, shape: str, rgb: np.ndarray, cx: float, cy: float, r: float) -> None:
    """Blend a shape into `image` (S, S, 3) float, in place, by its coverage of each pixel."""
    S, k = image.shape[0], SUPERSAMPLE
    grid = (np.arange(S * k) + 0.5) / k  # sub-pixel centres, in pixels
    mask = _coverage(shape, grid[None, :] - cx, grid[:, None] - cy, r)  # (S*k, S*k)
    cover = mask.reshape(S, k, S, k).mean(axis=(1, 3))[..., None]  # (S, S, 1) in [0, 1]
    image *= 1 - cover
    image += cover * rgb


def draw_sample(rng: np.random.Generator, image_size: int, two_objects: bool = False) -> tuple[np.ndarray, dict]:
    """One image (3, S, S) uint8 and its attributes: colour, shape, position (the grid cell's name),
    and for two objects also colour2, shape2, position2 and the relation of the first to the second."""
    colours = list(COLOURS)
    bg = rng.uniform(0, BACKGROUND_MAX)
    image = np.full((image_size, image_size, 3), bg, dtype=np.float64)
    cells = rng.choice(9, size=2 if two_objects else 1, replace=False)
    attrs: dict = {}
    for j, cell in enumerate(cells):
        colour = colours[rng.integers(len(colours))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        tint = np.clip(np.array(COLOURS[colour]) + rng.integers(-TINT_JITTER, TINT_JITTER + 1, size=3), 0, 255)
        _paint(image, shape, tint, *_place(rng, image_size, int(cell)))
        suffix = "2" if j else ""
        attrs.update({f"colour{suffix}": colour, f"shape{suffix}": shape, f"position{suffix}": POSITIONS[cell]})
    if two_objects:
        (r1, c1), (r2, c2) = divmod(int(cells[0]), 3), divmod(int(cells[1]), 3)
        attrs["relation"] = ("left of" if c1 < c2 else "right of") if c1 != c2 else ("above" if r1 < r2 else "below")
    pixels = np.rint(image).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), attrs  # (3, S, S)


def synthetic_sample(seed: int, split: str, index: int, image_size: int,
                     two_object_fraction: float = 0.0) -> tuple[np.ndarray, str, dict]:
    """Sample `index` of `split` ("train" or "val"): (image (3, S, S) uint8, caption, attributes)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLIT_IDS)}")
    rng = np.random.default_rng([GENERATOR_VERSION, seed, SPLIT_IDS[split], index])
    two = bool(rng.random() < two_object_fraction)
    image, attrs = draw_sample(rng, image_size, two)
    return image, caption(attrs), attrs


def synthetic_split(seed: int, split: str, num_samples: int, image_size: int,
                    two_object_fraction: float = 0.0) -> Iterator[tuple[np.ndarray, str, dict]]:
    """Samples 0 .. num_samples - 1 of `split`, in order."""
    for i in range(num_samples):
        yield synthetic_sample(seed, split, i, image_size, two_object_fraction)
