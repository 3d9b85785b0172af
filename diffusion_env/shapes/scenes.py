"""Procedural "coloured shapes on a background" scenes and an analytic parser.

This module is the data side of the project: it generates, on the fly and
without any downloaded files, small RGB images (32x32 by default) described by
a fixed, tiny grammar of captions such as::

    "a small red circle on a blue background"
    "two large yellow squares on a black background"
    "three small green triangles on an orange background"

and it reads images back into the same attributes (plus the size word) with
:func:`parse_scene`, so that what a text-to-image diffusion model draws can be
scored against the prompt it was given (see :func:`attribute_agreement`).

Vocabulary
----------
* ``PALETTE``: eight named colours whose RGB values are at least 127 apart
  (Euclidean distance in 0..255 RGB space), so that snapping a noisy pixel to
  the nearest palette colour is unambiguous.
* ``SHAPES``: ``"circle"``, ``"square"``, ``"triangle"`` (axis-aligned square,
  upright isosceles triangle whose height equals its base).
* ``SIZES``: ``"small"`` (6-8 px across on a 32 px canvas) and ``"large"``
  (12-13 px across; capped at 13 so three large shapes still fit without
  touching).
* ``COUNTS``: 1, 2, 3, written ``"a"``, ``"two"``, ``"three"``. All shapes of
  one scene share colour, kind and size, and never overlap or touch.

Prompt splits
-------------
Every combination of (background, colour, shape, count, size) with colour !=
background is a prompt (``all_prompts``; 8*7*3*3*2 = 1008 prompts).  A fixed
20% of the 168 (colour, shape, background) triples is held out for evaluating
compositional generalisation (``heldout_prompts``); the rest is the RL training
split (``train_prompts``).  Pre-training data (``sample_training_batch``) draws
from *all* combinations.

Geometry is stored in units of a 32 px reference canvas divided by 32 (i.e. in
[0, 1] image coordinates), so :func:`render_scene` can rasterise one scene at
any resolution; the separation guarantees (1 px margin to the border, 2 px gap
between shapes) hold in pixels at the 32 px reference size.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ATTRIBUTE_KEYS",
    "COUNTS",
    "COUNT_WORDS",
    "HELDOUT_FRACTION",
    "HELDOUT_SALT",
    "PALETTE",
    "COLOR_NAMES",
    "REFERENCE_SIZE",
    "SHAPES",
    "SIZES",
    "SIZE_RANGES_PX",
    "VOCABULARY",
    "ParsedScene",
    "Scene",
    "all_prompts",
    "attribute_agreement",
    "attribute_matches",
    "caption",
    "describe",
    "heldout_prompts",
    "heldout_triples",
    "parse_scene",
    "parse_scenes",
    "render_scene",
    "sample_scene",
    "sample_training_batch",
    "train_prompts",
]

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

#: Named colours. Values are hand-picked saturated colours whose smallest
#: pairwise distance (orange/yellow) is 127, about 16 standard deviations of
#: the sigma=8 noise the parser is tested against.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 170, 0),
    "blue": (0, 64, 255),
    "purple": (150, 0, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

#: Side length (bounding-box width = height) in pixels of the 32 px reference
#: canvas, sampled uniformly per scene.  "large" stops at 13 px because three
#: 13 px shapes with 2 px gaps and 1 px margins are the most a 32 px canvas
#: holds with room left for random placement.  These are nominal boxes: the
#: apex of a triangle or the rim of a circle can miss every pixel centre, so
#: those rasterise up to one pixel narrower.
SIZE_RANGES_PX: dict[str, tuple[float, float]] = {
    "small": (6.0, 8.0),
    "large": (12.0, 13.0),
}
REFERENCE_SIZE: int = 32
#: Minimum distance (reference px) from a shape to the image border: keeps the
#: outermost pixel ring pure background, which the parser relies on.
_MARGIN_PX: float = 1.0
#: Minimum gap (reference px) between bounding boxes of two shapes: at least
#: one background pixel separates them, so 8-connected components stay apart.
_GAP_PX: float = 2.0
#: Placement grid step (reference px) for shape centres.
_GRID_STEP_PX: float = 0.25
_MAX_PLACEMENT_RESTARTS: int = 100

#: Every word that can occur in a caption, sorted (e.g. for a word-level
#: tokenizer of a small text encoder).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COUNT_WORDS.values())
        | set(SIZES)
        | set(COLOR_NAMES)
        | set(SHAPES)
        | {s + "s" for s in SHAPES}
        | {"on", "an", "background"}
    )
)

#: Metadata keys of a prompt (and of ``Scene.metadata``).
ATTRIBUTE_KEYS: tuple[str, ...] = ("background", "color", "shape", "count", "size")

#: Fraction of (colour, shape, background) triples held out from RL training.
HELDOUT_FRACTION: float = 0.2
#: Salt of the hash that orders triples for the held-out split.  A hash (not a
#: numpy RNG) is used so the split is identical on every numpy version.
HELDOUT_SALT: str = "diffusion_env.scenes/heldout/v1"


# --------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------


def _check_attributes(
    background: str, color: str, shape: str, count: int, size: str
) -> None:
    """Raise ValueError if any attribute is outside the vocabulary."""
    if background not in PALETTE:
        raise ValueError(
            f"unknown background colour {background!r}; allowed: {list(COLOR_NAMES)}"
        )
    if color not in PALETTE:
        raise ValueError(f"unknown shape colour {color!r}; allowed: {list(COLOR_NAMES)}")
    if color == background:
        raise ValueError(
            f"shape colour and background colour must differ, both are {color!r}"
        )
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")
    # bool is an int subclass; True would otherwise silently mean one shape.
    if isinstance(count, bool) or count not in COUNTS:
        raise ValueError(f"unknown count {count!r}; allowed: {list(COUNTS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed: {list(SIZES)}")


@dataclass(frozen=True)
class Scene:
    """One procedural scene: attributes plus the geometry needed to render it.

    Attributes:
        background: Background colour name (a key of ``PALETTE``).
        color: Shape colour name; never equal to ``background``.
        shape: One of ``SHAPES``; all shapes of a scene share it.
        count: Number of shapes, one of ``COUNTS``.
        size: One of ``SIZES``.
        centers: ``count`` shape centres ``(x, y)`` in [0, 1] image
            coordinates (x to the right, y downwards).
        half_extent: Half of the side length of every shape's bounding box,
            in [0, 1] image units (circle radius, half square side, half
            triangle base = half its height).
    """

    background: str
    color: str
    shape: str
    count: int
    size: str
    centers: tuple[tuple[float, float], ...]
    half_extent: float

    def __post_init__(self) -> None:
        """Validate attributes and geometry so a Scene is always renderable."""
        _check_attributes(self.background, self.color, self.shape, self.count, self.size)
        if len(self.centers) != self.count:
            raise ValueError(
                f"scene has count={self.count} but {len(self.centers)} centres; "
                "they must be equal"
            )
        if not 0.0 < self.half_extent < 0.5:
            raise ValueError(
                f"half_extent must be in (0, 0.5) image units, got {self.half_extent}"
            )

    @property
    def metadata(self) -> dict[str, Any]:
        """The prompt attributes of this scene, keyed by ``ATTRIBUTE_KEYS``."""
        return {
            "background": self.background,
            "color": self.color,
            "shape": self.shape,
            "count": self.count,
            "size": self.size,
        }


def _place_centers(
    rng: np.random.Generator, count: int, side_px: float
) -> tuple[tuple[float, float], ...]:
    """Sample ``count`` non-touching square boxes of ``side_px`` on the canvas.

    Shapes are placed one after another, each uniformly among the grid
    positions that keep the required gap to the boxes already placed.  This
    finds crowded layouts (three large shapes) that plain rejection sampling
    of all centres at once would almost never hit.  If an early choice leaves
    no room for a later shape, placement restarts.
    """
    lo = _MARGIN_PX + side_px / 2.0
    hi = REFERENCE_SIZE - _MARGIN_PX - side_px / 2.0
    axis = np.arange(lo, hi + 1e-9, _GRID_STEP_PX)
    grid_x, grid_y = (g.ravel() for g in np.meshgrid(axis, axis))
    min_sep = side_px + _GAP_PX
    for _ in range(_MAX_PLACEMENT_RESTARTS):
        feasible = np.ones(grid_x.shape, dtype=bool)
        chosen: list[tuple[float, float]] = []
        for _ in range(count):
            candidates = np.flatnonzero(feasible)
            if candidates.size == 0:
                break
            k = candidates[rng.integers(candidates.size)]
            cx, cy = float(grid_x[k]), float(grid_y[k])
            chosen.append((cx, cy))
            # Boxes are disjoint with the gap iff they are separated along
            # at least one axis.
            feasible &= (np.abs(grid_x - cx) >= min_sep - 1e-9) | (
                np.abs(grid_y - cy) >= min_sep - 1e-9
            )
        if len(chosen) == count:
            return tuple((x / REFERENCE_SIZE, y / REFERENCE_SIZE) for x, y in chosen)
    raise RuntimeError(
        f"could not place {count} shapes of side {side_px:.2f} px after "
        f"{_MAX_PLACEMENT_RESTARTS} restarts"
    )


def sample_scene(
    rng: np.random.Generator,
    *,
    background: str | None = None,
    color: str | None = None,
    shape: str | None = None,
    count: int | None = None,
    size: str | None = None,
) -> Scene:
    """Sample a random scene, optionally with some attributes fixed.

    Unfixed attributes are drawn uniformly; the shape colour is drawn among
    the colours other than the background (and vice versa), so the keyword
    arguments accept a prompt's metadata directly:
    ``sample_scene(rng, **metadata)``.

    Args:
        rng: Source of randomness; the same generator state gives the same
            scene.
        background, color, shape, count, size: Attribute values to fix, or
            None to sample them.

    Returns:
        A valid :class:`Scene`.

    Raises:
        ValueError: If a fixed attribute is not in the vocabulary, or colour
            equals background.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(0)), "
            f"got {type(rng).__name__}"
        )
    if background is None:
        bg_choices = [c for c in COLOR_NAMES if c != color]
        background = bg_choices[rng.integers(len(bg_choices))]
    if color is None:
        color_choices = [c for c in COLOR_NAMES if c != background]
        color = color_choices[rng.integers(len(color_choices))]
    if shape is None:
        shape = SHAPES[rng.integers(len(SHAPES))]
    if count is None:
        count = int(COUNTS[rng.integers(len(COUNTS))])
    if size is None:
        size = SIZES[rng.integers(len(SIZES))]
    # Validate before using count/size for geometry, so errors name the
    # offending attribute instead of failing inside placement.
    _check_attributes(background, color, shape, count, size)
    side_px = float(rng.uniform(*SIZE_RANGES_PX[size]))
    centers = _place_centers(rng, count, side_px)
    return Scene(
        background=background,
        color=color,
        shape=shape,
        count=count,
        size=size,
        centers=centers,
        half_extent=side_px / 2.0 / REFERENCE_SIZE,
    )


def _is_int(value: Any) -> bool:
    """True for Python and numpy integers, but not for bools (an int subclass)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shape_mask(
    shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Hard-edged mask of one shape evaluated at pixel centres ``(x, y)``."""
    dx = x - cx
    dy = y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Upright triangle: apex at (cx, cy - r), base from cx - r to cx + r at
    # cy + r; its half-width grows linearly from 0 at the apex to r.
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)


def render_scene(scene: Scene, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Rasterise a scene with hard (not anti-aliased) edges.

    A pixel belongs to a shape when its centre does, which keeps the image to
    exactly two palette colours and the parser's job well defined.

    Args:
        scene: The scene to draw.
        size: Output width and height in pixels (>= 16; the separation
            guarantees are exact at 32 and scale with ``size``).

    Returns:
        ``uint8`` array of shape ``(size, size, 3)``.
    """
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    if not _is_int(size) or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    mask = np.zeros((size, size), dtype=bool)
    for cx, cy in scene.centers:
        mask |= _shape_mask(scene.shape, cx, cy, scene.half_extent, x, y)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = PALETTE[scene.background]
    image[mask] = PALETTE[scene.color]
    return image


def describe(background: str, color: str, shape: str, count: int, size: str) -> str:
    """Caption for the given attributes, e.g. "two large red squares on a blue background".

    Raises:
        ValueError: If an attribute is outside the vocabulary.
    """
    _check_attributes(background, color, shape, count, size)
    noun = shape if count == 1 else shape + "s"
    # "an orange background"; the count word always precedes a size word
    # (consonant), so "a" needs no such rule.
    article = "an" if background[0] in "aeiou" else "a"
    return f"{COUNT_WORDS[count]} {size} {color} {noun} on {article} {background} background"


def caption(scene: Scene) -> str:
    """Caption of a scene, e.g. "a small red circle on a blue background"."""
    return describe(**scene.metadata)


def sample_training_batch(
    rng: np.random.Generator, batch_size: int, size: int = REFERENCE_SIZE
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Draw a pre-training batch from *all* attribute combinations.

    Pre-training deliberately sees held-out triples too: the held-out split
    only restricts which prompts RL fine-tuning optimises.

    Args:
        rng: Source of randomness.
        batch_size: Number of scenes (>= 1).
        size: Image width and height in pixels.

    Returns:
        ``(images, captions, scenes)`` with images ``uint8`` of shape
        ``(batch_size, size, size, 3)``.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    images = np.stack([render_scene(s, size) for s in scenes])
    return images, [caption(s) for s in scenes], scenes


# --------------------------------------------------------------------------
# Prompts and splits
# --------------------------------------------------------------------------


def all_prompts() -> list[tuple[str, dict[str, Any]]]:
    """Every prompt of the grammar with its attributes, in a fixed order.

    Returns:
        ``(caption, metadata)`` pairs; metadata has keys ``ATTRIBUTE_KEYS``.
    """
    prompts = []
    for background, color, shape, count, size in itertools.product(
        COLOR_NAMES, COLOR_NAMES, SHAPES, COUNTS, SIZES
    ):
        if color == background:
            continue
        meta = {
            "background": background,
            "color": color,
            "shape": shape,
            "count": count,
            "size": size,
        }
        prompts.append((describe(**meta), meta))
    return prompts


def heldout_triples() -> frozenset[tuple[str, str, str]]:
    """The held-out ``(color, shape, background)`` triples.

    Triples are ordered by the SHA-256 of ``HELDOUT_SALT`` plus the triple and
    the first ``round(HELDOUT_FRACTION * n)`` are held out (34 of 168).  This
    is a fixed pseudo-random choice that does not depend on library versions.
    """
    triples = [
        (color, shape, background)
        for color, shape, background in itertools.product(COLOR_NAMES, SHAPES, COLOR_NAMES)
        if color != background
    ]
    ranked = sorted(
        triples,
        key=lambda t: hashlib.sha256(f"{HELDOUT_SALT}|{'|'.join(t)}".encode()).hexdigest(),
    )
    return frozenset(ranked[: round(HELDOUT_FRACTION * len(triples))])


def _split(heldout: bool) -> list[tuple[str, dict[str, Any]]]:
    """Prompts whose triple is (``heldout=True``) or is not in the held-out set."""
    held = heldout_triples()
    return [
        (text, meta)
        for text, meta in all_prompts()
        if ((meta["color"], meta["shape"], meta["background"]) in held) == heldout
    ]


def train_prompts() -> list[tuple[str, dict[str, Any]]]:
    """Prompts for RL training: those whose (color, shape, background) is not held out."""
    return _split(heldout=False)


def heldout_prompts() -> list[tuple[str, dict[str, Any]]]:
    """Prompts for evaluation only: those whose (color, shape, background) is held out."""
    return _split(heldout=True)


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------

_PALETTE_ARRAY: np.ndarray = np.array([PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)
#: RGB distance from the background beyond which a pixel counts as
#: foreground: half the smallest distance between palette colours, i.e. the
#: point where a pixel would snap to another palette colour than the
#: background's.
_FOREGROUND_THRESHOLD: float = 0.5 * min(
    float(np.linalg.norm(a - b)) for a, b in itertools.combinations(_PALETTE_ARRAY, 2)
)
#: Components smaller than this fraction of the image are specks (noise,
#: stray pixels of a diffusion sample).  0.008 * 32 * 32 = 8 px, well below
#: the ~18 px of the smallest rendered triangle.
_MIN_COMPONENT_FRACTION: float = 0.008
#: Bounding-box side (reference px) separating "small" (rasterised 5-8 px)
#: from "large" (11-13 px).
_SIZE_THRESHOLD_PX: float = 10.0
_MIN_PARSE_SIZE: int = 8


@dataclass(frozen=True)
class ParsedScene:
    """Attributes read back from an image by :func:`parse_scene`.

    Attributes:
        background: Palette name of the dominant border colour.
        color: Palette name of the shapes' colour; None when no shape found.
        shape: Majority shape kind of the components; None when no shape found.
        count: Number of foreground components above the minimum area (may
            exceed ``max(COUNTS)`` for a cluttered image).
        size: Majority size word of the components; None when no shape found.
    """

    background: str
    color: str | None
    shape: str | None
    count: int
    size: str | None


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into ``COLOR_NAMES`` of the nearest palette colour of each pixel."""
    d = ((pixels[:, None, :] - _PALETTE_ARRAY[None, :, :]) ** 2).sum(axis=-1)
    return d.argmin(axis=1)


def _label_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of flat indices.

    Each foreground pixel starts with its own index as label and repeatedly
    takes the minimum label of its 3x3 neighbourhood; at convergence every
    component carries the index of its first pixel.  This is pure numpy (no
    scipy dependency) and fast enough for 32x32 images.
    """
    h, w = mask.shape
    sentinel = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    while True:
        padded = np.pad(labels, 1, constant_values=sentinel)
        new = labels
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
        new = np.where(mask, new, sentinel)
        if np.array_equal(new, labels):
            break
        labels = new
    flat = labels.ravel()
    fg = np.flatnonzero(flat != sentinel)
    roots, inverse = np.unique(flat[fg], return_inverse=True)
    return [fg[inverse == k] for k in range(roots.size)]


def _component_features(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """Scale-free geometry of one component: (fill, top, corner).

    * fill: area / bounding-box area (square 1, circle pi/4, triangle 1/2).
    * top: share of the area in the upper half of the box (square and circle
      1/2, upright triangle 1/4).
    * corner: share of the box's corner regions ``|u| + |v| > 1.5`` (in box
      coordinates u, v in [-1, 1]) that is filled (square 1, circle 0 since
      the circle never leaves ``|u| + |v| <= sqrt(2)``, triangle about 0.45
      from its two base corners once rasterised).  It separates small
      circles from squares, whose fill ratios are close at a few pixels.
    """
    y0, x0 = ys.min(), xs.min()
    h = ys.max() - y0 + 1
    w = xs.max() - x0 + 1
    fill = ys.size / float(h * w)
    # Pixel centres in box coordinates in (-1, 1).
    v = (ys - y0 + 0.5) / h * 2.0 - 1.0
    # The middle row of an odd-height box counts half to each half.
    top = (np.count_nonzero(v < -1e-9) + 0.5 * np.count_nonzero(np.abs(v) <= 1e-9)) / ys.size
    gy, gx = np.mgrid[0:h, 0:w]
    gu = (gx + 0.5) / w * 2.0 - 1.0
    gv = (gy + 0.5) / h * 2.0 - 1.0
    corner_region = np.abs(gu) + np.abs(gv) > 1.5
    box = np.zeros((h, w), dtype=bool)
    box[ys - y0, xs - x0] = True
    n_corner = np.count_nonzero(corner_region)
    # A box one pixel thin has no pixel centre in the corner regions; the
    # fill ratio is then the only evidence of how "boxy" it is.
    corner = np.count_nonzero(box & corner_region) / n_corner if n_corner else fill
    return fill, top, corner


#: Ideal (fill, top, corner) of each shape kind; components are classified by
#: the nearest prototype.
_SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 0.5, 1.0),
    "circle": (np.pi / 4.0, 0.5, 0.0),
    "triangle": (0.5, 0.25, 0.45),
}
#: Per-feature scale of the prototype distance.  "top" gets the most weight
#: because it survives blurring best (a soft triangle still carries most of
#: its mass low); "corner" the least because it rests on a few pixels.
_FEATURE_WEIGHTS: np.ndarray = np.array([1.0, 2.0, 0.5])


def _classify_shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """Shape kind of one component: nearest prototype in feature space."""
    feats = np.array(_component_features(ys, xs))
    return min(
        _SHAPE_PROTOTYPES,
        key=lambda k: float(
            np.sum((_FEATURE_WEIGHTS * (feats - np.array(_SHAPE_PROTOTYPES[k]))) ** 2)
        ),
    )


def _majority(values: Sequence[str], weights: Sequence[int]) -> str:
    """Most frequent value; ties go to the value with the largest total weight."""
    counts = Counter(values)
    totals: Counter[str] = Counter()
    for value, weight in zip(values, weights):
        totals[value] += weight
    return max(counts, key=lambda v: (counts[v], totals[v]))


def _check_image(image: Any) -> None:
    """Raise ValueError unless ``image`` is a uint8 (H, W, 3) array, H, W >= 8."""
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"image must be a numpy.ndarray of dtype uint8 and shape (H, W, 3), "
            f"got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"image dtype must be uint8 (values 0..255), got {image.dtype}; "
            "convert e.g. with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image shape must be (H, W, 3) RGB, got {image.shape}")
    if min(image.shape[:2]) < _MIN_PARSE_SIZE:
        raise ValueError(
            f"image height and width must be >= {_MIN_PARSE_SIZE}, got {image.shape[:2]}"
        )


def parse_scene(image: np.ndarray) -> ParsedScene:
    """Read an image back into scene attributes.

    Steps, each chosen to tolerate noisy diffusion samples:

    1. Background: every pixel of the outermost ring is snapped to its
       nearest palette colour and the most frequent one wins (a shape touching
       the border cannot outvote the rest of the ring).
    2. Detection: pixels farther than half the smallest palette distance
       from the median *observed* colour of those border pixels (so a
       slightly-off background tint is not foreground), grouped into
       8-connected components of at least 0.8% of the image (smaller ones
       are specks).
    3. Colour: nearest palette colour of the per-channel median of the
       quarter of detected pixels farthest from the background.
    4. Segmentation and count: pixels past the midpoint between observed
       background and shape colour, components filtered as in step 2.
    5. Shape and size: per component from its bounding box (see
       ``_component_features``), majority vote over components (ties go to
       the larger total area).

    Args:
        image: ``uint8`` RGB array of shape ``(H, W, 3)``, H, W >= 8.

    Returns:
        A :class:`ParsedScene`; colour, shape and size are None when count
        is 0.

    Raises:
        ValueError: If ``image`` is not a uint8 ``(H, W, 3)`` array.
    """
    _check_image(image)
    h, w, _ = image.shape
    pixels = image.astype(np.float32)
    border = np.concatenate(
        [pixels[0, :], pixels[-1, :], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0
    )
    border_idx = _nearest_palette(border)
    bg_index = int(np.bincount(border_idx, minlength=len(COLOR_NAMES)).argmax())
    bg_observed = np.median(border[border_idx == bg_index], axis=0)

    distance = np.sqrt(((pixels - bg_observed) ** 2).sum(axis=-1))
    min_area = max(3, int(round(_MIN_COMPONENT_FRACTION * h * w)))
    detected = [
        c for c in _label_components(distance > _FOREGROUND_THRESHOLD) if c.size >= min_area
    ]
    background = COLOR_NAMES[bg_index]
    if not detected:
        return ParsedScene(background=background, color=None, shape=None, count=0, size=None)

    # Shape colour from the quarter of detected pixels farthest from the
    # background: soft (blurred) edges mix in background and would drag a
    # plain median towards another palette colour.
    flat_pixels = pixels.reshape(-1, 3)
    det_flat = np.concatenate(detected)
    det_dist = distance.ravel()[det_flat]
    core = det_flat[det_dist >= np.percentile(det_dist, 75)]
    fg_observed = np.median(flat_pixels[core], axis=0)
    color = COLOR_NAMES[int(_nearest_palette(fg_observed[None, :])[0])]

    # Re-segment at the midpoint between background and shape colour: the
    # fixed detection threshold would grow a blurred shape by a pixel when the
    # two colours are far apart (e.g. white on black), distorting its outline.
    axis = fg_observed - bg_observed
    t = ((pixels - bg_observed) @ axis) / max(float(axis @ axis), 1e-6)
    components = [c for c in _label_components(t > 0.5) if c.size >= min_area]
    if not components:
        return ParsedScene(background=background, color=None, shape=None, count=0, size=None)

    shapes: list[str] = []
    sizes: list[str] = []
    for comp in components:
        ys, xs = np.divmod(comp, w)
        shapes.append(_classify_shape(ys, xs))
        # Bounding-box side on the 32 px reference scale.
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * REFERENCE_SIZE / w
        sizes.append("small" if side <= _SIZE_THRESHOLD_PX else "large")
    areas = [c.size for c in components]
    return ParsedScene(
        background=background,
        color=color,
        shape=_majority(shapes, areas),
        count=len(components),
        size=_majority(sizes, areas),
    )


def parse_scenes(images: np.ndarray) -> list[ParsedScene]:
    """Parse a batch of ``uint8`` images of shape ``(B, H, W, 3)``."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise ValueError(
            f"images must be a numpy.ndarray of shape (B, H, W, 3), got "
            f"{type(images).__name__} with shape {shape}"
        )
    return [parse_scene(image) for image in images]


def attribute_matches(
    parsed: Sequence[ParsedScene], metadata: Sequence[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """Per-sample agreement of parsed scenes with prompt metadata.

    Args:
        parsed: Parsed scenes, e.g. from :func:`parse_scenes`.
        metadata: One attribute mapping per parsed scene (prompt metadata or
            ``Scene.metadata``) with keys ``ATTRIBUTE_KEYS``.

    Returns:
        Boolean arrays of shape ``(B,)`` for "background", "color", "shape",
        "count", "size", and "all" (every attribute matches) — usable as a
        per-sample reward.
    """
    if len(parsed) != len(metadata):
        raise ValueError(
            f"parsed and metadata must have the same length, got {len(parsed)} "
            f"and {len(metadata)}"
        )
    for meta in metadata:
        missing = [k for k in ATTRIBUTE_KEYS if k not in meta]
        if missing:
            raise ValueError(
                f"metadata is missing keys {missing}; required keys: {list(ATTRIBUTE_KEYS)}"
            )
    matches = {
        key: np.array([getattr(p, key) == m[key] for p, m in zip(parsed, metadata)], dtype=bool)
        for key in ATTRIBUTE_KEYS
    }
    matches["all"] = np.logical_and.reduce([matches[k] for k in ATTRIBUTE_KEYS])
    return matches


def attribute_agreement(
    parsed: Sequence[ParsedScene], metadata: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Fraction of samples whose parsed attributes match the metadata.

    Returns:
        Fractions in [0, 1] keyed "background", "color", "shape", "count",
        "size", and "all" (all five attributes correct).

    Raises:
        ValueError: If the inputs are empty, of different lengths, or
            metadata lacks a key.
    """
    if len(parsed) == 0:
        raise ValueError("attribute_agreement needs at least one parsed scene, got 0")
    return {key: float(v.mean()) for key, v in attribute_matches(parsed, metadata).items()}
