"""Image grids and PNG files (written whole or not at all, with text metadata)."""

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from ella_jax import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (or uint8 already) -> uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(255 * np.clip(images, 0.0, 1.0)).astype(np.uint8)


def grid(
    images: np.ndarray | Sequence[np.ndarray | Image.Image], columns: int | None = None
) -> np.ndarray:
    """N images of one size ((N, H, W, C) floats in [0, 1] or uint8, or PIL images) -> one
    (rows * H, columns * W, C) uint8 image, near-square by default, row-major, empty cells black."""
    images = to_uint8(np.stack([np.asarray(image) for image in images]))
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
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
