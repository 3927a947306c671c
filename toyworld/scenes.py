"""Procedural scenes of filled coloured shapes on black, their captions, and the caption parser.

A scene is one of four layouts: "object" (a red square), "position" (a red square in the top
left: a cell of the 3x3 grid), "count" (two blue circles, 1 to 3 alike objects) or "relation" (a
red square to the left of a green circle; also right of, above, below). Shapes are drawn hard-edged
(a pixel is in a shape when its centre is), at size/4 to size/3 pixels, 1/32 of the image clear of
the border and 1/16 clear of each other, so a small UNet can learn them at 32x32 and
`toyworld.score` can read them back exactly. `parse_caption` turns any caption of the templates
back into the `Spec` it states, which is what the scorer checks an image against.

With `--paraphrase` each scene also gets a paraphrase in words the toy text encoders never saw
("a pair of crimson boxes", "an azure disc east of a golden wedge"): the record's "caption" is
the paraphrase (SUR-adapter's simple prompt) and its "complex" the template caption.

    python -m toyworld.scenes --out DIR --count N --seed S [--size 32] [--array-record]
        [--paraphrase] [--hold-out configs/toy.py]

`--hold-out CONFIG` leaves out every scene that states a combination of the config's
`hold_out` (`HoldOut`): ELLA's training scenes, so that captions stating one are new to it.
"""

import argparse
import io
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ella_jax.cli import error_exit
from ella_jax.storage import atomic_path

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
ARRAY_RECORD_FILE = "toyworld.array_record"  # --array-record's shard in --out
SHAPES = ("square", "circle", "triangle")
# Row-major over the 3x3 grid: CELLS[3 * row + column].
CELLS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
RELATIONS = ("left", "right", "above", "below")
LAYOUTS = ("object", "position", "count", "relation")
NUMBERS = ("one", "two", "three")

WRAPPERS = ("{}", "{} on a black background", "an image of {}")
PLACE_WORDS = {
    "top left": ("in the top left", "in the top left corner"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right", "in the top right corner"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
RELATION_WORDS = {
    "left": ("to the left of", "on the left of"),
    "right": ("to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}

# Paraphrases: words of none of the templates above (SUR-adapter's "simple" prompts).
PARAPHRASE_COLOURS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
    "magenta": ("fuchsia", "violet"),
    "cyan": ("turquoise", "teal"),
}
PARAPHRASE_SHAPES = {  # (singular, plural)
    "square": (("box", "boxes"), ("block", "blocks")),
    "circle": (("disc", "discs"), ("dot", "dots")),
    "triangle": (("wedge", "wedges"), ("pyramid", "pyramids")),
}
PARAPHRASE_COUNTS = {1: ("a single", "a lone"), 2: ("a pair of", "a couple of"), 3: ("a trio of",)}
PARAPHRASE_PLACES = {
    "top left": "northwest",
    "top": "north",
    "top right": "northeast",
    "left": "west",
    "center": "centre",
    "right": "east",
    "bottom left": "southwest",
    "bottom": "south",
    "bottom right": "southeast",
}
PARAPHRASE_RELATIONS = {
    "left": ("west of",),
    "right": ("east of",),
    "above": ("north of", "atop"),
    "below": ("south of", "beneath"),
}
PARAPHRASE_WRAPPERS = ("{}", "a picture of {}", "{} on a dark canvas")


@dataclass(frozen=True)
class Obj:
    """A filled shape: its bounding square is `size` pixels wide, centred on (cx, cy) in pixels
    (x to the right, y down, the image spanning [0, image size])."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: int


@dataclass(frozen=True)
class Scene:
    """The objects of an image and its layout; `cell` (position layout) and `relation` (relation
    layout: objects[0] `relation` objects[1]) are what the caption states."""

    objects: tuple[Obj, ...]
    layout: str
    cell: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Required:
    """An object a caption asks for: `count` None for "a", `position` one of CELLS or None."""

    colour: str
    shape: str
    count: int | None = None
    position: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a caption states: the objects, and `relation` (objects[0] `relation` objects[1])."""

    objects: tuple[Required, ...]
    relation: str | None = None


@dataclass(frozen=True)
class HoldOut:
    """Combinations ELLA's training scenes never contain (configs/toy.py's `hold_out`), so that
    captions stating them measure generalisation: "colour shape" (an object of that colour and
    shape: "red triangle"), "shape cell" (that shape placed in that cell: "circle top left"),
    "shape relation shape" ("square above circle": the first shape `relation` the second)."""

    colour_shape: tuple[str, ...] = ()
    shape_position: tuple[str, ...] = ()
    relation: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> "HoldOut":
        """From a config's `hold_out` block (a mapping; None or empty: nothing held out); a
        combination of unknown words is a ValueError naming it."""
        config = dict(config or {})
        unknown = sorted(set(config) - {"colour_shape", "shape_position", "relation"})
        if unknown:
            raise ValueError(f"hold_out: unknown keys {unknown}")
        hold_out = cls(**{key: tuple(value) for key, value in config.items()})
        valid = {
            "colour_shape": {f"{c} {s}" for c in COLOURS for s in SHAPES},
            "shape_position": {f"{s} {cell}" for s in SHAPES for cell in CELLS},
            "relation": {f"{a} {r} {b}" for a in SHAPES for r in RELATIONS for b in SHAPES},
        }
        for key, allowed in valid.items():
            for combination in getattr(hold_out, key):
                if combination not in allowed:
                    raise ValueError(f"hold_out.{key}: {combination!r} is no combination of the "
                                     "toy world's words")  # fmt: skip
        return hold_out

    def stated(self, spec: Spec) -> list[str]:
        """The held-out combinations `spec` (what a caption states) contains."""
        found = []
        for obj in spec.objects:
            if f"{obj.colour} {obj.shape}" in self.colour_shape:
                found.append(f"{obj.colour} {obj.shape}")
            if obj.position and f"{obj.shape} {obj.position}" in self.shape_position:
                found.append(f"{obj.shape} {obj.position}")
        if spec.relation:
            first, second = spec.objects
            pair = f"{first.shape} {spec.relation} {second.shape}"
            if pair in self.relation:
                found.append(pair)
        return found


def object_mask(obj: Obj, size: int) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie in the shape."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy, half = xs - obj.cx, ys - obj.cy, obj.size / 2
    box = (np.abs(dx) < half) & (np.abs(dy) < half)
    if obj.shape == "square":
        return box
    if obj.shape == "circle":
        return dx**2 + dy**2 <= half**2
    if obj.shape == "triangle":  # apex up, base on the bottom edge
        return box & (dy + half >= 2 * np.abs(dx))
    raise ValueError(f"unknown shape {obj.shape!r}")


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) mean of the pixel centres of a (H, W) bool mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def cell_of(x: float, y: float, size: int) -> str:
    """The 3x3 grid cell (one of CELLS) holding point (x, y) of a size x size image."""
    column = min(max(int(3 * x // size), 0), 2)
    row = min(max(int(3 * y // size), 0), 2)
    return CELLS[3 * row + column]


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: the scene's objects on black."""
    image = np.zeros((size, size, 3), np.uint8)
    for obj in scene.objects:
        image[object_mask(obj, size)] = COLOURS[obj.colour]
    return image


def _gap(size: int) -> int:
    return max(2, size // 16)


def _random_object(rng: np.random.Generator, size: int, shape: str, colour: str) -> Obj:
    width = int(rng.integers(size // 4, size // 3 + 1))
    border = max(1, size // 32)
    x0, y0 = rng.integers(border, size - border - width + 1, size=2)
    return Obj(shape, colour, float(x0 + width / 2), float(y0 + width / 2), width)


def _apart(a: Obj, b: Obj, size: int) -> bool:
    reach = (a.size + b.size) / 2 + _gap(size)
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _in_cell(obj: Obj, cell: str, size: int) -> bool:
    """The object's centroid is in `cell`, at least size/16 from the cell's inner edges."""
    x, y = centroid(object_mask(obj, size))
    if cell_of(x, y, size) != cell:
        return False
    margin = size / 16
    for value in (x, y):
        band = int(3 * value // size)
        low, high = band * size / 3, (band + 1) * size / 3
        if (band > 0 and value - low < margin) or (band < 2 and high - value < margin):
            return False
    return True


def _related(a: Obj, b: Obj, relation: str, size: int) -> bool:
    """`a` `relation` `b` with the boxes apart along the relation's axis, and that axis
    dominant."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {
        "left": (dx, dy),
        "right": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along >= (a.size + b.size) / 2 + _gap(size) and along > abs(across)


def _place(
    rng: np.random.Generator,
    size: int,
    kinds: list[tuple[str, str]],
    accept: Callable[[list[Obj]], bool],
) -> tuple[Obj, ...]:
    """Objects of the (shape, colour) `kinds`, pairwise apart and accepted, by rejection."""
    for _ in range(10_000):
        objects = [_random_object(rng, size, shape, colour) for shape, colour in kinds]
        pairs_apart = all(
            _apart(a, b, size) for i, a in enumerate(objects) for b in objects[i + 1 :]
        )
        if pairs_apart and accept(objects):
            return tuple(objects)
    raise RuntimeError(f"could not place {kinds} in a {size}x{size} image")


def sample_scene(rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene of a random layout for a size x size image."""
    layout = LAYOUTS[rng.integers(len(LAYOUTS))]
    names = list(COLOURS)
    first, second = (names[i] for i in rng.choice(len(names), 2, replace=False))
    shape, other_shape = (SHAPES[i] for i in rng.integers(len(SHAPES), size=2))
    if layout == "object":
        return Scene(_place(rng, size, [(shape, first)], lambda _: True), layout)
    if layout == "position":
        cell = CELLS[rng.integers(len(CELLS))]
        objects = _place(rng, size, [(shape, first)], lambda o: _in_cell(o[0], cell, size))
        return Scene(objects, layout, cell=cell)
    if layout == "count":
        count = int(rng.integers(1, 4))
        return Scene(_place(rng, size, [(shape, first)] * count, lambda _: True), layout)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    objects = _place(
        rng,
        size,
        [(shape, first), (other_shape, second)],
        lambda o: _related(o[0], o[1], relation, size),
    )
    return Scene(objects, layout, relation=relation)


def scene_spec(scene: Scene) -> Spec:
    """What the scene's caption states (any phrasing)."""
    head = scene.objects[0]
    if scene.layout == "relation":
        other = scene.objects[1]
        return Spec(
            (Required(head.colour, head.shape), Required(other.colour, other.shape)),
            scene.relation,
        )
    count = len(scene.objects) if scene.layout == "count" else None
    return Spec((Required(head.colour, head.shape, count, scene.cell),))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene, its phrasing drawn from `rng`."""

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    head = scene.objects[0]
    if scene.layout == "count":
        count = len(scene.objects)
        plural = "s" if count > 1 else ""
        text = f"{NUMBERS[count - 1]} {head.colour} {head.shape}{plural}"
    else:
        text = f"a {head.colour} {head.shape}"
    if scene.layout == "position":
        text += f" {pick(PLACE_WORDS[scene.cell])}"
    elif scene.layout == "relation":
        other = scene.objects[1]
        text += f" {pick(RELATION_WORDS[scene.relation])} a {other.colour} {other.shape}"
    return pick(WRAPPERS).format(text)


def paraphrase(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption in the paraphrase words (none of them in a template caption)."""

    def pick(options: tuple) -> Any:
        return options[rng.integers(len(options))]

    def thing(obj: Obj, count: int | None = None) -> str:
        singular, plural = pick(PARAPHRASE_SHAPES[obj.shape])
        colour = pick(PARAPHRASE_COLOURS[obj.colour])
        if count is None:
            return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {singular}"
        return f"{pick(PARAPHRASE_COUNTS[count])} {colour} {plural if count > 1 else singular}"

    head = scene.objects[0]
    text = thing(head, len(scene.objects)) if scene.layout == "count" else thing(head)
    if scene.layout == "position":
        text += f" toward the {PARAPHRASE_PLACES[scene.cell]}"
    elif scene.layout == "relation":
        text += f" {pick(PARAPHRASE_RELATIONS[scene.relation])} {thing(scene.objects[1])}"
    return pick(PARAPHRASE_WRAPPERS).format(text)


def _alternatives(words: Iterable[str]) -> str:
    # Longest first, so that "top left" is tried before "top".
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


def _phrase(name: str) -> str:
    return (
        rf"(?P<{name}_det>a|{_alternatives(NUMBERS)}) (?P<{name}_colour>{_alternatives(COLOURS)}) "
        rf"(?P<{name}_shape>{_alternatives(SHAPES)})(?P<{name}_plural>s?)"
    )


_CELL_OF = {words: cell for cell, options in PLACE_WORDS.items() for words in options}
_RELATION_OF = {words: kind for kind, options in RELATION_WORDS.items() for words in options}
_CAPTION = re.compile(
    rf"(?:an image of )?{_phrase('head')}"
    rf"(?: (?P<place>{_alternatives(_CELL_OF)}))?"
    rf"(?: (?P<relation>{_alternatives(_RELATION_OF)}) {_phrase('other')})?"
    r"(?: on a black background)?"
)


def parse_caption(text: str) -> Spec:
    """The Spec a caption of the templates states; ValueError for any other text."""
    normal = " ".join(text.lower().replace(".", " ").split())
    match = _CAPTION.fullmatch(normal)
    if match is None or (match["place"] and match["relation"]):
        raise ValueError(f"not a toy-world caption: {text!r}")

    def required(name: str, position: str | None = None) -> Required:
        det, plural = match[f"{name}_det"], match[f"{name}_plural"]
        count = None if det == "a" else NUMBERS.index(det) + 1
        if bool(plural) != (count is not None and count > 1):
            raise ValueError(f"number and plural disagree in {text!r}")
        return Required(match[f"{name}_colour"], match[f"{name}_shape"], count, position)

    if match["relation"]:
        if match["head_det"] != "a" or match["other_det"] != "a":
            raise ValueError(f"a relation is between single objects ('a'): {text!r}")
        return Spec((required("head"), required("other")), _RELATION_OF[match["relation"]])
    return Spec((required("head", _CELL_OF.get(match["place"])),))


def _scenes(
    rng: np.random.Generator, count: int, size: int, hold_out: HoldOut | None
) -> Iterable[Scene]:
    """`count` scenes from `rng`, those stating a held-out combination skipped (and not
    counted)."""
    made = 0
    while made < count:
        scene = sample_scene(rng, size)
        if hold_out is None or not hold_out.stated(scene_spec(scene)):
            made += 1
            yield scene


def generate(
    seed: int, count: int, size: int = 32, hold_out: HoldOut | None = None
) -> list[tuple[np.ndarray, str]]:
    """`count` (image (size, size, 3) uint8, caption) pairs, all drawn from one generator seeded
    with `seed`; with `hold_out`, none of its combinations in any scene."""
    rng = np.random.default_rng(seed)
    return [
        (render(scene, size), caption(scene, rng)) for scene in _scenes(rng, count, size, hold_out)
    ]


def generate_paraphrased(
    seed: int, count: int, size: int = 32, hold_out: HoldOut | None = None
) -> list[tuple[np.ndarray, str, str]]:
    """`count` (image, template caption, paraphrase) triples from one generator seeded with
    `seed`; `hold_out` as in `generate`."""
    rng = np.random.default_rng(seed)
    return [
        (render(scene, size), caption(scene, rng), paraphrase(scene, rng))
        for scene in _scenes(rng, count, size, hold_out)
    ]


def _records(
    seed: int, count: int, size: int, paraphrased: bool, hold_out: HoldOut | None = None
) -> list[dict[str, Any]]:
    """{"image" (uint8 array), "caption"} per scene; paraphrased: the paraphrase is the
    "caption" and the template caption the "complex"."""
    if not paraphrased:
        pairs = generate(seed, count, size, hold_out)
        return [{"image": image, "caption": text} for image, text in pairs]
    return [
        {"image": image, "caption": simple, "complex": template}
        for image, template, simple in generate_paraphrased(seed, count, size, hold_out)
    ]


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(
    path: str | Path,
    seed: int,
    count: int,
    size: int = 32,
    paraphrased: bool = False,
    hold_out: HoldOut | None = None,
) -> Path:
    """Writes `path`/images/00000.png ... and `path`/captions.jsonl (the manifest that
    `train.data.read_manifest` reads); returns the manifest's path."""
    path = Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(_records(seed, count, size, paraphrased, hold_out)):
        name = f"images/{i:05d}.png"
        (path / name).write_bytes(png_bytes(record.pop("image")))
        lines.append(json.dumps({"image": name, **record}))
    manifest = path / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_array_record(
    path: str | Path,
    seed: int,
    count: int,
    size: int = 32,
    paraphrased: bool = False,
    hold_out: HoldOut | None = None,
) -> None:
    """Writes one ArrayRecord shard `path` of {"image": PNG bytes, "caption"} records (and
    "complex", paraphrased)."""
    from ella_jax.train.data import write_array_record as write_records

    records = _records(seed, count, size, paraphrased, hold_out)
    write_records([{**r, "image": png_bytes(r["image"])} for r in records], path)


def hold_out_of(config_file: str | Path) -> HoldOut:
    """The `hold_out` of a config file's get_config() (configs/*.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hold_out_config", config_file)
    if spec is None or not Path(config_file).is_file():
        raise FileNotFoundError(f"{config_file}: no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return HoldOut.from_config(module.get_config().get("hold_out"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.scenes",
        description="Writes toy-world images of coloured shapes with captions: DIR/images/*.png "
        "and DIR/captions.jsonl, or DIR/toyworld.array_record with --array-record.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--count", required=True, type=int, help="number of images")
    parser.add_argument("--seed", required=True, type=int, help="seed of the generator")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels (default 32)")
    parser.add_argument(
        "--array-record", action="store_true", help="write one ArrayRecord shard instead"
    )
    parser.add_argument(
        "--paraphrase",
        action="store_true",
        help="captions are paraphrases in unseen words; the template caption goes in 'complex' "
        "(SUR-adapter's simple and complex prompts)",
    )
    parser.add_argument(
        "--hold-out",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="leave out every scene stating a combination of the config's hold_out (e.g. "
        "configs/toy.py: ELLA's training scenes)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (else an error)"
    )
    args = parser.parse_args(argv)
    try:
        hold_out = None if args.hold_out is None else hold_out_of(args.hold_out)
    except (OSError, ValueError) as e:
        return error_exit(e)
    # One rule for every command's output: an existing one is kept unless --overwrite, and a
    # new one appears whole or not at all.
    target = args.out / ARRAY_RECORD_FILE if args.array_record else args.out
    exists = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if exists and not args.overwrite:
        return error_exit(FileExistsError(f"{target}: already exists (pass --overwrite)"))
    with atomic_path(target, overwrite=True) as staging:
        if args.array_record:
            write_array_record(staging, args.seed, args.count, args.size, args.paraphrase, hold_out)
        else:
            write_folder(staging, args.seed, args.count, args.size, args.paraphrase, hold_out)
    print(f"wrote {args.count} images of {args.size}x{args.size} pixels: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
