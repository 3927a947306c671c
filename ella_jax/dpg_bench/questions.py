"""The benchmark file: DPG-Bench's CSV read into prompts and their questions.

The official `dpg_bench.csv` has the columns of COLUMNS, one row per question, the rows of one
prompt consecutive. `dependency` lists the parent `proposition_id`s of a question ("0": none,
"1,2": two), `tuple` names its category (`entity - whole (cat)`: L2 "entity - whole", L1
"entity").
"""

import collections
import csv
import os
import re
from dataclasses import dataclass
from typing import Literal

from ella_jax import storage

COLUMNS = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)
NEEDED = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")

Mode = Literal["fixed", "official"]


class BenchmarkError(ValueError):
    """A benchmark file, an image or an answer that cannot be scored; the message names it."""


@dataclass(frozen=True)
class Question:
    """One row: `parents` as the CSV lists them (0: none), `category` the L2 name."""

    proposition_id: int
    parents: tuple[int, ...]
    category: str
    text: str

    @property
    def l1(self) -> str:
        return l1_of(self.category)


@dataclass(frozen=True)
class Prompt:
    """A prompt's id (its image is `<item_id>.<ext>`), its text and questions in CSV order."""

    item_id: str
    text: str
    questions: tuple[Question, ...]


def check_item_id(key: str, where: str) -> None:
    """Refuses (a BenchmarkError at `where`) an id that cannot be a file name of its own: images
    are named after ids (`<id>.png`), so "../x" would be read or written outside their folder."""
    if not re.fullmatch(r"[\w.-]+", key) or key.startswith("."):
        raise BenchmarkError(f"{where}: id {key!r} cannot be a file name")


def l2_of(tuple_text: str) -> str:
    """The L2 category of a `tuple` cell, as the official script forms it: "entity - whole"."""
    return tuple_text.split("(")[0].strip()


def l1_of(l2: str) -> str:
    """The L1 category of an L2 name: "entity" of "entity - whole", "global" of "global -"."""
    return l2.split("-")[0].strip()


def _rows(path: os.PathLike) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) per data row of the CSV at `path`."""
    file = storage.reachable(path)
    if not file.is_file():
        raise BenchmarkError(f"{path}: no such DPG-Bench CSV")
    lines = storage.read_text(file, encoding="utf-8-sig").splitlines()
    reader = csv.DictReader(lines)
    missing = [c for c in NEEDED if c not in (reader.fieldnames or ())]
    if missing:
        raise BenchmarkError(
            f"{path}: no column {', '.join(missing)} (DPG-Bench's columns: {', '.join(COLUMNS)})"
        )
    rows = []
    for row in reader:
        number = reader.line_num
        empty = [c for c in NEEDED if not (row.get(c) or "").strip()]
        if empty:
            raise BenchmarkError(f"{path}:{number}: empty {', '.join(empty)}")
        rows.append((number, row))
    if not rows:
        raise BenchmarkError(f"{path}: no questions")
    return rows


def _question(path: os.PathLike, number: int, row: dict[str, str]) -> Question:
    where = f"{path}:{number}: item {row['item_id']}"
    try:
        proposition_id = int(row["proposition_id"])
    except ValueError:
        raise BenchmarkError(f"{where}: proposition_id {row['proposition_id']!r}") from None
    try:
        parents = tuple(int(p.strip()) for p in row["dependency"].split(","))
    except ValueError:
        raise BenchmarkError(
            f"{where}: dependency {row['dependency']!r} is not a list of proposition ids"
        ) from None
    return Question(proposition_id, parents, l2_of(row["tuple"]), row["question_natural_language"])


def read_benchmark(path: str | os.PathLike, mode: Mode = "fixed") -> list[Prompt]:
    """The prompts of a DPG-Bench CSV, in file order.

    fixed: every row; a prompt's rows must be consecutive, its proposition ids unique, and every
    parent one of its own questions (else a BenchmarkError naming the item).
    official: as the official script builds its questions: the first data row dropped (its
    issue #61), a prompt's later rows replacing earlier ones of the same proposition id or the
    whole prompt when its rows are not consecutive; parents are not checked (a missing one
    fails that image while it is scored). Item ids are text in both modes, each a file name
    (`check_item_id`).
    """
    rows = _rows(path)
    if mode == "official":
        rows = rows[1:]
    texts: dict[str, str] = {}
    grouped: dict[str, dict[int, Question]] = {}
    previous = None
    for number, row in rows:
        item_id = row["item_id"].strip()
        check_item_id(item_id, f"{path}:{number}")
        question = _question(path, number, row)
        if item_id != previous:
            if item_id in grouped and mode == "fixed":
                raise BenchmarkError(
                    f"{path}:{number}: item {item_id}: its rows are not consecutive"
                )
            grouped[item_id] = {}
            texts[item_id] = (row.get("text") or "").strip()
        questions = grouped[item_id]
        if question.proposition_id in questions and mode == "fixed":
            raise BenchmarkError(
                f"{path}:{number}: item {item_id}: proposition {question.proposition_id} twice"
            )
        questions[question.proposition_id] = question
        previous = item_id
    if mode == "fixed":
        for item_id, questions in grouped.items():
            for question in questions.values():
                unknown = [p for p in question.parents if p != 0 and p not in questions]
                if unknown:
                    raise BenchmarkError(
                        f"{path}: item {item_id}: proposition {question.proposition_id} depends "
                        f"on {', '.join(map(str, unknown))}, which item {item_id} does not have"
                    )
    return [
        Prompt(item_id, texts[item_id], tuple(questions.values()))
        for item_id, questions in grouped.items()
    ]


def read_prompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(item_id, text) per prompt of a DPG-Bench CSV, for rendering its images."""
    prompts = read_benchmark(path)
    empty = [p.item_id for p in prompts if not p.text]
    if empty:
        raise BenchmarkError(f"{path}: item {empty[0]} has no text")
    return [(p.item_id, p.text) for p in prompts]


def category_counts(prompts: list[Prompt]) -> dict[str, int]:
    """Questions per L2 category, sorted by name."""
    counts = collections.Counter(q.category for p in prompts for q in p.questions)
    return dict(sorted(counts.items()))
