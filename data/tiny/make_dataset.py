"""Writes the tiny image-caption set of configs/tiny.py (deterministic; run from the repository
root: `.venv/bin/python data/tiny/make_dataset.py`). 32 images of 16x16 pixels: a coloured square
in one of four places on a coloured background, captioned accordingly."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
PLACES = {"top left": (0, 0), "top right": (0, 8), "bottom left": (8, 0), "bottom right": (8, 8)}


def main() -> None:
    folder = Path(__file__).parent
    rng = np.random.default_rng(0)
    lines = []
    for i in range(32):
        square, background = rng.choice(list(COLOURS), 2, replace=False)
        place = rng.choice(list(PLACES))
        image = np.empty((16, 16, 3), np.uint8)
        image[:] = COLOURS[background]
        top, left = PLACES[place]
        image[top + 1 : top + 7, left + 1 : left + 7] = COLOURS[square]
        name = f"{i:02d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        caption = f"a {square} square in the {place} on a {background} background"
        lines.append(json.dumps({"image": f"images/{name}", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
