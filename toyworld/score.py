"""Pixel-analysis scoring of toy-world images against their captions (the toy DPG-Bench).

Each pixel takes the nearest palette colour, or background when black is nearer or no colour is
within MAX_DISTANCE; 4-connected pixels of one colour form an object, and objects under
1/128 of the image (noise) are dropped. An object's shape is read from how much of its bounding
box it fills: about 1.0 for a square, 0.78 to 0.85 for a circle, 0.50 to 0.57 for a triangle
(measured on rendered shapes at 32 and 64 pixels). The objects are then checked against
`parse_caption(caption)` attribute by attribute.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toyworld.scenes import COLOURS, Required, cell_of, parse_caption

ATTRIBUTES = ("colour", "shape", "count", "position", "relation", "all")
# Palette colours are 255 apart (Euclidean, 0-255 RGB): a pixel further than this from all of
# them is too dark or too mixed to name.
MAX_DISTANCE = 110.0
SQUARE_FILL = 0.92
TRIANGLE_FILL = 0.68

_NAMES = list(COLOURS)
_PALETTE = np.array([(0, 0, 0), *COLOURS.values()], np.float32)  # index 0: the background


@dataclass(frozen=True)
class Found:
    """An object found in an image: centroid (cx, cy) and bounding box (x0, y0, x1, y1,
    exclusive ends) in pixels, `fill` = area / box area."""

    colour: str
    shape: str
    area: int
    cx: float
    cy: float
    box: tuple[int, int, int, int]
    fill: float


def classify(image: np.ndarray) -> np.ndarray:
    """(H, W) int: 0 for background, i + 1 for the i-th colour of COLOURS, per pixel of an
    (H, W, 3) uint8 image or float image in [0, 1]."""
    pixels = np.asarray(image, np.float32)
    if not np.issubdtype(np.asarray(image).dtype, np.integer):
        pixels = pixels * 255.0
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)
    nearest = distances.argmin(-1)
    return np.where(distances.min(-1) <= MAX_DISTANCE, nearest, 0)


def components(classes: np.ndarray) -> np.ndarray:
    """(H, W) int: a component number (0, 1, ...) per pixel of each 4-connected region of one
    nonzero class of (H, W) `classes`, -1 on class 0."""
    height, width = classes.shape
    count = height * width
    foreground = classes > 0
    # Each pixel holds the index of a pixel of its component; min-propagation between same-class
    # neighbours plus pointer jumping settles every component on its smallest index.
    labels = np.where(foreground, np.arange(count).reshape(height, width), count)
    down = foreground[1:] & (classes[1:] == classes[:-1])
    across = foreground[:, 1:] & (classes[:, 1:] == classes[:, :-1])
    while True:
        new = labels.copy()
        new[1:] = np.where(down, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:-1] = np.where(down, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[:, 1:] = np.where(across, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(across, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        flat = new.ravel()
        new = np.where(foreground, flat[np.minimum(new, count - 1)], count)
        if np.array_equal(new, labels):
            break
        labels = new
    _, numbers = np.unique(labels, return_inverse=True)
    return np.where(foreground, numbers.reshape(height, width), -1)


def shape_of(fill: float) -> str:
    """The shape that fills `fill` of its bounding box."""
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= TRIANGLE_FILL else "triangle"


def find_objects(image: np.ndarray) -> list[Found]:
    """The objects of an (H, W, 3) image (uint8, or float in [0, 1]), largest first."""
    classes = classify(image)
    labels = components(classes)
    min_area = max(4, classes.size // 128)
    found = []
    for number in range(labels.max() + 1):
        ys, xs = np.nonzero(labels == number)
        if len(xs) < min_area:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        fill = len(xs) / ((x1 - x0) * (y1 - y0))
        found.append(
            Found(
                colour=_NAMES[classes[ys[0], xs[0]] - 1],
                shape=shape_of(fill),
                area=len(xs),
                cx=float(xs.mean()) + 0.5,
                cy=float(ys.mean()) + 0.5,
                box=(x0, y0, x1, y1),
                fill=fill,
            )
        )
    return sorted(found, key=lambda f: -f.area)


def match_object(objects: list[Found], wanted: Required) -> Found | None:
    """The object read as a caption's `wanted` one: the largest of the wanted colour and shape,
    else of the wanted colour."""
    for candidates in (
        [o for o in objects if o.colour == wanted.colour and o.shape == wanted.shape],
        [o for o in objects if o.colour == wanted.colour],
    ):
        if candidates:
            return candidates[0]
    return None


def related(a: Found | None, b: Found | None, relation: str) -> bool:
    """Whether found object `a` is `relation` ("left", "right", "above", "below") of `b`."""
    if a is None or b is None:
        return False
    return {
        "left": a.cx < b.cx,
        "right": a.cx > b.cx,
        "above": a.cy < b.cy,
        "below": a.cy > b.cy,
    }[relation]


def score(image: np.ndarray, caption: str) -> dict[str, bool | None]:
    """Per attribute of ATTRIBUTES, whether the (H, W, 3) image (uint8, or float in [0, 1]) shows
    what the caption states; None where the caption states nothing of it (count: only "a";
    position, relation: none stated). "all": every stated attribute holds."""
    spec = parse_caption(caption)
    objects = find_objects(image)
    height, width = np.asarray(image).shape[:2]
    wanted = spec.objects
    result: dict[str, bool | None] = {
        "colour": all(any(o.colour == w.colour for o in objects) for w in wanted),
        "shape": all(
            any(o.colour == w.colour and o.shape == w.shape for o in objects) for w in wanted
        ),
        "count": None,
        "position": None,
        "relation": None,
    }
    counted = [w for w in wanted if w.count is not None]
    if counted:
        result["count"] = all(
            sum(o.colour == w.colour and o.shape == w.shape for o in objects) == w.count
            for w in counted
        )
    placed = [w for w in wanted if w.position is not None]
    if placed:
        matches = [(match_object(objects, w), w.position) for w in placed]
        result["position"] = all(
            o is not None and cell_of(o.cx * 3 / width, o.cy * 3 / height, 3) == cell
            for o, cell in matches
        )
    if spec.relation is not None:
        first, second = (match_object(objects, w) for w in wanted)
        result["relation"] = related(first, second, spec.relation)
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def score_many(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Per attribute of ATTRIBUTES, the fraction of the images (each (H, W, 3)) whose caption
    states it that show it; NaN for an attribute no caption states."""
    results = [score(image, text) for image, text in zip(images, captions, strict=True)]
    accuracy = {}
    for name in ATTRIBUTES:
        values = [r[name] for r in results if r[name] is not None]
        accuracy[name] = float(np.mean(values)) if values else float("nan")
    return accuracy
