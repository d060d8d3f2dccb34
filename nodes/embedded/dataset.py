"""A procedural, captioned image dataset for the embedded model, generated in code and deterministic from a seed.

Every scene is one coloured shape (circle, square, triangle, star, ring, cross or diamond), small or large, at
one of five positions (left, right, top, bottom, centre), on a plain, vertical-gradient, horizontally striped or
sky-and-ground horizon background. Every background varies along the rows only, so a row's median is an exact
background estimate wherever the shape covers less than half of the row; :func:`score_image` relies on it.

Captions come from a small grammar with varied wording ("a small red circle on the left over a blue background",
"a large green star at the top, on a striped yellow background"). The training split never draws the held-out
(shape, colour, position) combinations, so the captions of :func:`held_out_captions` never occur in training.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

IMAGE_SIZE = 64
# Eight well-separated colours (RGB 0..255); the nearest palette colour names a pixel's colour in the scorer.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (245, 220, 30),
    "purple": (140, 40, 190), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
SIZES = ("small", "large")
SIZE_RADIUS_PX = {"small": 8.0, "large": 13.0}  # half the shape's extent; a large shape stays under half a row
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_CENTRE_PX = {"left": (16.0, 32.0), "right": (48.0, 32.0), "top": (32.0, 16.0), "bottom": (32.0, 48.0),
                      "centre": (32.0, 32.0)}  # (x, y) of the shape's centre before jitter
JITTER_PX = 3.0  # random offset of the centre, so positions are regions rather than points
BACKGROUNDS = ("plain", "gradient", "striped", "horizon")
# Backgrounds keep their palette colour within this brightness range, so the scorer's nearest colour stays theirs.
SHADE_RANGE = (0.85, 1.0)
STRIPE_PX = 8
SUPERSAMPLE = 2  # render at 2× and average 2×2 blocks: anti-aliased edges
HELD_OUT_MODULUS = 7  # a (shape, colour, position) combination is held out when its index sum is 0 mod 7


@dataclasses.dataclass(frozen=True)
class Scene:
    """One scene's structured labels, its jitter and its caption."""

    shape: str
    colour: str
    size: str
    position: str
    background: str  # "plain", "gradient", "striped" or "horizon"
    background_colour: str  # the sky's colour for "horizon"
    ground_colour: str | None  # "horizon" only
    offset: tuple[float, float]  # (dx, dy) jitter in pixels
    caption: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.colour]


def is_held_out(shape: str, colour: str, position: str) -> bool:
    """Whether a (shape, colour, position) combination belongs to the held-out split (about one in seven)."""
    index = SHAPES.index(shape) + 2 * COLOURS.index(colour) + 3 * POSITIONS.index(position)
    return index % HELD_OUT_MODULUS == 0


_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "centre": ("in the centre", "in the middle", "at the center"),
}


def _caption(rng: np.random.Generator, shape: str, colour: str, size: str, position: str, background: str,
             background_colour: str, ground_colour: str | None) -> str:
    size_word = f"{size} " if rng.random() < 0.7 else ""
    noun_phrase = f"{size_word}{colour} {shape}"
    article = "one" if rng.random() < 0.2 else ("an" if noun_phrase[0] in "aeiou" else "a")
    subject = f"{article} {noun_phrase} {rng.choice(_POSITION_PHRASES[position])}"
    if background == "horizon":
        tail = rng.choice((f" above {ground_colour} ground under a {background_colour} sky",
                           f", {background_colour} sky and {ground_colour} ground",
                           f" in a landscape with a {background_colour} sky over {ground_colour} ground"))
    elif rng.random() < 0.15:
        tail = ""  # some captions leave the background out
    else:
        kind = {"plain": "", "gradient": "gradient ", "striped": "striped "}[background]
        tail = rng.choice((f" over a {kind}{background_colour} background", f", on a {kind}{background_colour} background",
                           f" on {kind}{background_colour}"))
    return subject + tail


def random_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene of ``split`` ("train" skips the held-out combinations, "held_out" draws only them).

    Raises:
        ValueError: an unknown ``split``.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out'; got {split!r}")
    while True:
        shape, colour, position = rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(POSITIONS)
        if is_held_out(shape, colour, position) == (split == "held_out"):
            break
    size = rng.choice(SIZES)
    background = rng.choice(BACKGROUNDS)
    others = [name for name in COLOURS if name != colour]
    background_colour = str(rng.choice(others))
    ground_colour = None
    if background == "horizon":
        ground_colour = str(rng.choice([name for name in others if name != background_colour]))
    offset = (float(rng.uniform(-JITTER_PX, JITTER_PX)), float(rng.uniform(-JITTER_PX, JITTER_PX)))
    caption = _caption(rng, shape, colour, size, position, background, background_colour, ground_colour)
    return Scene(str(shape), str(colour), str(size), str(position), str(background), background_colour,
                 ground_colour, offset, caption)


def _polygon_mask(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every (x, y) against ``vertices`` (N, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def _regular(points: int, radii: tuple[float, ...], start: float = -np.pi / 2) -> np.ndarray:
    """Vertices of a star-like polygon: ``points`` × len(radii) vertices alternating over ``radii``."""
    count = points * len(radii)
    angles = start + np.arange(count) * 2 * np.pi / count
    r = np.array([radii[i % len(radii)] for i in range(count)])
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def shape_mask(shape: str, radius: float, centre: tuple[float, float], size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage of ``shape`` in 0..1 on a ``size`` × ``size`` grid, anti-aliased by 2× supersampling.

    Args:
        shape: one of :data:`SHAPES`.
        radius: half the shape's extent in pixels.
        centre: (x, y) in pixels.
    Returns:
        float32 array of shape (size, size).
    Raises:
        ValueError: an unknown ``shape``.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")
    fine = size * SUPERSAMPLE
    coords = (np.arange(fine, dtype=np.float64) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(coords - centre[1], coords - centre[0], indexing="ij")
    if shape == "circle":
        mask = x * x + y * y <= radius * radius
    elif shape == "ring":
        distance = np.sqrt(x * x + y * y)
        mask = (distance <= radius) & (distance >= 0.55 * radius)
    elif shape == "square":
        side = radius * 0.85
        mask = (np.abs(x) <= side) & (np.abs(y) <= side)
    elif shape == "cross":
        arm = radius * 0.35
        mask = ((np.abs(x) <= arm) & (np.abs(y) <= radius)) | ((np.abs(y) <= arm) & (np.abs(x) <= radius))
    elif shape == "diamond":
        mask = np.abs(x) + np.abs(y) <= radius
    elif shape == "triangle":
        mask = _polygon_mask(x, y, _regular(3, (radius,)) + np.array([0.0, radius * 0.2]))
    else:  # star
        mask = _polygon_mask(x, y, _regular(5, (radius, radius * 0.45)))
    coverage = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage.astype(np.float32)


def _colour(name: str) -> np.ndarray:
    return np.asarray(PALETTE[name], dtype=np.float32) / 255.0


def _background(scene: Scene, size: int) -> np.ndarray:
    """The background, (size, size, 3), a function of the row only."""
    base = _colour(scene.background_colour)
    rows = np.arange(size, dtype=np.float32)
    if scene.background == "plain":
        shade = np.ones(size, dtype=np.float32)
    elif scene.background == "gradient":
        low, high = SHADE_RANGE
        shade = high - (high - low) * rows / (size - 1)
    elif scene.background == "striped":
        shade = np.where((rows // STRIPE_PX) % 2 == 0, SHADE_RANGE[1], SHADE_RANGE[0]).astype(np.float32)
    else:  # horizon: sky over ground, the horizon a little below the middle
        ground = _colour(scene.ground_colour)
        per_row = np.where((rows < size * 0.55)[:, None], base[None], ground[None])
        return np.broadcast_to(per_row[:, None, :], (size, size, 3)).copy()
    per_row = shade[:, None] * base[None]
    return np.broadcast_to(per_row[:, None, :], (size, size, 3)).copy()


def coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The shape's coverage of ``scene``'s pixels in 0..1, float32 of shape (size, size)."""
    cx, cy = POSITION_CENTRE_PX[scene.position]
    scale = size / IMAGE_SIZE
    centre = ((cx + scene.offset[0]) * scale, (cy + scene.offset[1]) * scale)
    return shape_mask(scene.shape, SIZE_RADIUS_PX[scene.size] * scale, centre, size)


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render ``scene`` as a float32 image in 0..1 of shape (3, size, size)."""
    shape = coverage(scene, size)[..., None]
    image = _background(scene, size) * (1 - shape) + _colour(scene.colour)[None, None] * shape
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def make_batch(rng: np.random.Generator, batch_size: int, split: str = "train",
               size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Draw ``batch_size`` scenes of ``split`` and render them.

    Returns:
        Images (B, 3, size, size) in 0..1, their captions, and their scenes (the labels).
    Raises:
        ValueError: ``batch_size`` below 1, or an unknown ``split``.
    Example:
        >>> make_batch(np.random.default_rng(0), 2)[0].shape
        torch.Size([2, 3, 64, 64])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    scenes = [random_scene(rng, split) for _ in range(batch_size)]
    return torch.stack([render(scene, size) for scene in scenes]), [s.caption for s in scenes], scenes


def held_out_captions(n: int = 200, seed: int = 1234) -> list[Scene]:
    """The fixed evaluation set: ``n`` scenes of held-out (shape, colour, position) combinations.

    Each item's ``caption`` is the prompt and its other fields the labels to score against; :func:`render`
    draws its ground truth. The same ``n`` and ``seed`` always give the same list.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    rng = np.random.default_rng([seed, 0x4E1D])
    return [random_scene(rng, "held_out") for _ in range(n)]


# --- scoring ----------------------------------------------------------------------------------------------------------

FOREGROUND_FRACTION = 0.5  # a pixel is the shape's when it differs from the background by half the largest difference
MIN_FOREGROUND_DIFF = 0.15  # below this largest difference the image shows no shape at all


@dataclasses.dataclass(frozen=True)
class ImageScore:
    colour: str | None  # the shape's nearest palette colour; None when no shape was found
    position: str | None  # the nearest position anchor to the shape's centroid
    centroid: tuple[float, float] | None  # (x, y) in pixels of a 64-pixel image


def score_image(image: torch.Tensor) -> ImageScore:
    """Find the shape in ``image`` and name its colour and position.

    The background is estimated per row as the row's median (every background here varies along the rows only);
    the shape is the set of pixels that differ from it by at least half the largest difference. Its colour is the
    palette colour most of those pixels are nearest to, its position the anchor nearest to their centroid.

    Args:
        image: (3, H, W) in 0..1.
    Raises:
        ValueError: a wrong shape.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W); got {tuple(image.shape)}")
    pixels = image.detach().float().cpu().numpy().transpose(1, 2, 0)  # (H, W, 3)
    height, width = pixels.shape[:2]
    background = np.median(pixels, axis=1, keepdims=True)
    difference = np.abs(pixels - background).sum(axis=-1)
    peak = float(difference.max())
    if peak < MIN_FOREGROUND_DIFF:
        return ImageScore(None, None, None)
    foreground = difference >= FOREGROUND_FRACTION * peak
    palette = np.stack([_colour(name) for name in COLOURS])
    nearest = np.argmin(((pixels[foreground][:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    colour = COLOURS[int(np.bincount(nearest, minlength=len(COLOURS)).argmax())]
    ys, xs = np.nonzero(foreground)
    centroid = (float(xs.mean() + 0.5) * IMAGE_SIZE / width, float(ys.mean() + 0.5) * IMAGE_SIZE / height)
    position = min(POSITIONS, key=lambda name: (POSITION_CENTRE_PX[name][0] - centroid[0]) ** 2
                   + (POSITION_CENTRE_PX[name][1] - centroid[1]) ** 2)
    return ImageScore(colour, position, centroid)
