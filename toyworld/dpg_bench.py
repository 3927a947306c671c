"""A toy DPG-Bench: held-out toy captions as DPG-Bench questions, and a VQA that answers them from
the toy scorer's reading of a tile.

Per caption (its `Spec`), in the official CSV's columns, a question per:
- entity (`entity - whole (square)`): "is there a square?", one per shape named;
- colour (`attribute - color (square, red)`): "is the square red?", depending on its entity;
- count (`other - count (circle, ==2)`): "are there exactly two blue circles?", on its entity;
- position (`relation - spatial (red square, image, top left)`): "is the red square in the top
  left of the image?", on its entity;
- relation (`relation - spatial (square, circle, left of)`): "is the red square to the left of
  the green circle?", on both entities;
- global (`global - (black background)`): "is the background black?", on nothing.

`answer` reads a tile with `toyworld.score` (palette colours, connected components, shapes by
fill) and says "yes" or "no"; on rendered scenes it is right on every question (tested).

    python -m toyworld.dpg_bench --out FILE.csv [--count 64] [--seed 1]
"""

import argparse
import csv
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ella_jax.dpg_bench.questions import COLUMNS
from ella_jax.storage import atomic_path
from toyworld.scenes import (
    CELLS,
    COLOURS,
    NUMBERS,
    SHAPES,
    Required,
    Spec,
    cell_of,
    generate,
    parse_caption,
)
from toyworld.score import classify, find_objects, match_object, related

RELATION_PHRASES = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
# The background is black when at least this share of a tile reads as background.
BLACK_BACKGROUND = 0.5


def questions_of(spec: Spec) -> list[dict[str, str]]:
    """The CSV rows (less item_id and text) of the questions on a caption's `spec`."""
    rows: list[dict[str, str]] = []

    def add(broad, detailed, parts, question, parents=()) -> int:
        rows.append(
            {
                "keywords": ", ".join(parts[:1]),
                "proposition_id": str(len(rows) + 1),
                "dependency": ",".join(map(str, parents)) or "0",
                "category_broad": broad,
                "category_detailed": detailed,
                "tuple": f"{f'{broad} - {detailed}'.strip()} ({', '.join(parts)})",
                "question_natural_language": question,
            }
        )
        return len(rows)

    entity = {}
    for obj in spec.objects:
        if obj.shape not in entity:
            entity[obj.shape] = add("entity", "whole", [obj.shape], f"is there a {obj.shape}?")
    for obj in spec.objects:
        plural = obj.count is not None and obj.count > 1
        subject = f"are the {obj.shape}s" if plural else f"is the {obj.shape}"
        add(
            "attribute",
            "color",
            [obj.shape, obj.colour],
            f"{subject} {obj.colour}?",
            [entity[obj.shape]],
        )
        if obj.count is not None:
            things = f"{obj.colour} {obj.shape}" + ("s" if plural else "")
            verb = "are" if plural else "is"
            add(
                "other",
                "count",
                [obj.shape, f"=={obj.count}"],
                f"{verb} there exactly {NUMBERS[obj.count - 1]} {things}?",
                [entity[obj.shape]],
            )
        if obj.position is not None:
            thing = f"{obj.colour} {obj.shape}"
            add(
                "relation",
                "spatial",
                [thing, "image", obj.position],
                f"is the {thing} in the {obj.position} of the image?",
                [entity[obj.shape]],
            )
    if spec.relation is not None:
        first, second = spec.objects
        words = RELATION_PHRASES[spec.relation]
        add(
            "relation",
            "spatial",
            [first.shape, second.shape, words],
            f"is the {first.colour} {first.shape} {words} the {second.colour} {second.shape}?",
            sorted({entity[first.shape], entity[second.shape]}),
        )
    add("global", "", ["black background"], "is the background black?")
    return rows


def write_csv(path: str | Path, seed: int, count: int) -> list[tuple[str, str]]:
    """Writes the toy DPG-Bench of the captions of `count` scenes drawn with `seed` to `path` (the
    official columns; item ids toy-0000, ...); returns the (item_id, caption) pairs."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    prompts = []
    for i, (_, caption) in enumerate(generate(seed, count)):
        item_id = f"toy-{i:04d}"
        for row in questions_of(parse_caption(caption)):
            writer.writerow({"item_id": item_id, "text": caption, **row})
        prompts.append((item_id, caption))
    with atomic_path(path, overwrite=True) as staging:
        staging.write_text(buffer.getvalue(), encoding="utf-8")
    return prompts


_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_THING = rf"(?P<{{0}}_colour>{_COLOUR}) (?P<{{0}}_shape>{_SHAPE})"
_PATTERNS = {
    "entity": rf"is there a (?P<shape>{_SHAPE})\?",
    "colour": rf"(?:is|are) the (?P<shape>{_SHAPE})s? (?P<colour>{_COLOUR})\?",
    "count": rf"(?:is|are) there exactly (?P<number>{'|'.join(NUMBERS)}) "
    rf"{_THING.format('a')}s?\?",
    "position": rf"is the {_THING.format('a')} in the (?P<cell>{'|'.join(CELLS)}) of the image\?",
    "relation": rf"is the {_THING.format('a')} (?P<relation>{'|'.join(RELATION_PHRASES.values())}) "
    rf"the {_THING.format('b')}\?",
    "global": r"is the background black\?",
}
_PATTERNS = {kind: re.compile(pattern) for kind, pattern in _PATTERNS.items()}
_RELATION_OF = {words: kind for kind, words in RELATION_PHRASES.items()}


def answer_one(tile: np.ndarray, question: str) -> str:
    """ "yes" or "no": what `toyworld.score` reads in the (H, W, 3) uint8 `tile` says of a toy
    DPG-Bench `question`; ValueError for any other question."""
    kind, match = next(
        ((k, m) for k, p in _PATTERNS.items() if (m := p.fullmatch(question))), (None, None)
    )
    if match is None:
        raise ValueError(f"not a toy DPG-Bench question: {question!r}")
    if kind == "global":
        return "yes" if (classify(tile) == 0).mean() >= BLACK_BACKGROUND else "no"
    found = find_objects(tile)
    groups = match.groupdict()
    if kind == "entity":
        ok = any(o.shape == groups["shape"] for o in found)
    elif kind == "colour":
        ok = any(o.shape == groups["shape"] and o.colour == groups["colour"] for o in found)
    elif kind == "count":
        number = NUMBERS.index(groups["number"]) + 1
        ok = sum(o.colour == groups["a_colour"] and o.shape == groups["a_shape"] for o in found)
        ok = ok == number
    else:
        a = match_object(found, Required(groups["a_colour"], groups["a_shape"]))
        if kind == "position":
            height, width = tile.shape[:2]
            ok = a is not None and cell_of(a.cx * 3 / width, a.cy * 3 / height, 3) == groups["cell"]
        else:
            b = match_object(found, Required(groups["b_colour"], groups["b_shape"]))
            ok = related(a, b, _RELATION_OF[groups["relation"]])
    return "yes" if ok else "no"


def answer(images: list[Image.Image], questions: list[str]) -> list[str]:
    """The toy VQA (`python -m ella_jax.dpg_bench score --vqa toyworld.dpg_bench:answer`)."""
    return [
        answer_one(np.asarray(image.convert("RGB")), question)
        for image, question in zip(images, questions, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.dpg_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--count", type=int, default=64, help="prompts (default: 64)")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the held-out scenes (default: 1)"
    )
    args = parser.parse_args(argv)
    prompts = write_csv(args.out, args.seed, args.count)
    print(f"wrote {len(prompts)} toy DPG-Bench prompts to {args.out}")


if __name__ == "__main__":
    main()
