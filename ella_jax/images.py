"""Image grids and PNG files (written whole or not at all, with text metadata)."""

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from ella_jax import storage

GAP_GREY = 128  # the lines between a grid's cells, and its empty cells


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (or uint8 already) -> uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(255 * np.clip(images, 0.0, 1.0)).astype(np.uint8)


def grid(
    images: np.ndarray | Sequence[np.ndarray | Image.Image],
    columns: int | None = None,
    gap: int = 0,
) -> np.ndarray:
    """N images of one size ((N, H, W, C) floats in [0, 1] or uint8, or PIL images) -> one
    uint8 image of `columns` (default: near-square) per row, row-major. `gap` > 0: grey lines
    of that width around and between the cells, and empty cells grey, so that neither a black
    image nor an empty cell looks like the other; 0: the cells touch (DPG-Bench's 2x2 grids,
    which its evaluation cuts into equal quarters), empty cells black."""
    images = to_uint8(np.stack([np.asarray(image) for image in images]))
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    step_y, step_x = height + gap, width + gap
    shape = (rows * step_y + gap, columns * step_x + gap, channels)
    canvas = np.full(shape, GAP_GREY if gap else 0, np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        y, x = gap + row * step_y, gap + column * step_x
        canvas[y : y + height, x : x + width] = image
    return canvas


def save_png(
    image: np.ndarray | Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None
) -> None:
    """Writes a PNG (local or in a bucket) whole or not at all, with `text` as tEXt chunks."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(to_uint8(image))
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    with storage.atomic_path(path, overwrite=True) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
