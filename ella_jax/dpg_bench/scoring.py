"""DPG-Bench's arithmetic, from answers to scores: pure functions, no images and no model.

A prompt is scored on `pic_num` crops of its 2x2 grid. Per crop, each question's raw score is 1.0
when the answer is exactly "yes"; then, walking the questions in CSV order and updating in place
(so zeros cascade down chains), a question with a parent scored 0 is set to 0. The crop scores
the mean of those; the prompt, the mean over its crops; the benchmark, 100 x the mean over
prompts. Categories pool per-(prompt, question) values: L2 by the `tuple`'s name, L1 its head.

- fixed: a question's category value is its raw score averaged over the crops (`l1`, `l2`),
  and beside it the dependency-adjusted one (`l1_adjusted`, `l2_adjusted`).
- official: the official script's values: the raw scores of the last crop only (its issue #60).
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ella_jax.dpg_bench.questions import Prompt, l1_of


@dataclass(frozen=True)
class PromptScore:
    """One prompt's (one image's) scores: `crops[c]` the mean adjusted score of crop c,
    `raw[c]` and `adjusted[c]` per proposition id."""

    crops: tuple[float, ...]
    raw: tuple[dict[int, float], ...]
    adjusted: tuple[dict[int, float], ...]

    @property
    def score(self) -> float:
        return sum(self.crops) / len(self.crops)


def dependency_adjusted(prompt: Prompt, raw: Mapping[int, float]) -> dict[int, float]:
    """`raw` with every question whose parent scores 0 set to 0, in CSV order and in place, the
    first parent scored 0 ending the look (so a later, missing parent is never looked up). A
    parent that is not among `raw` raises KeyError, as in the official script."""
    scores = dict(raw)
    for question in prompt.questions:
        for parent in question.parents:
            if parent != 0 and scores[parent] == 0:
                scores[question.proposition_id] = 0.0
                break
    return scores


def score_prompt(prompt: Prompt, answers: Sequence[Mapping[int, str]]) -> PromptScore:
    """The scores of `prompt` from `answers[c][proposition_id]`, the VQA's answer on crop c."""
    raw = tuple(
        {q.proposition_id: float(crop[q.proposition_id] == "yes") for q in prompt.questions}
        for crop in answers
    )
    adjusted = tuple(dependency_adjusted(prompt, scores) for scores in raw)
    crops = tuple(sum(scores.values()) / len(scores) for scores in adjusted)
    return PromptScore(crops, raw, adjusted)


def category_scores(values: Iterable[tuple[str, float]]) -> tuple[dict, dict]:
    """(L1, L2): 100 x the mean of the (L2 category, value) pairs of each, names sorted."""
    pooled: dict[str, list[float]] = {}
    for category, value in values:
        pooled.setdefault(category, []).append(value)
    l1: dict[str, list[float]] = {}
    for category, scores in sorted(pooled.items()):
        l1.setdefault(l1_of(category), []).extend(scores)

    def percent(groups: dict[str, list[float]]) -> dict[str, float]:
        return {name: float(np.mean(v)) * 100 for name, v in sorted(groups.items())}

    return percent(l1), percent(pooled)


def benchmark_scores(
    scored: Mapping[str, tuple[Prompt, PromptScore]], mode: str
) -> dict[str, float | dict | None]:
    """score, l1, l2, l1_adjusted, l2_adjusted (None in official mode) and per_prompt ({key:
    {score, crops}}, 0-100) of the scored prompts, `scored[key] = (prompt, its scores)`."""
    if not scored:
        raise ValueError("no prompt was scored")
    raw: list[tuple[str, float]] = []
    adjusted: list[tuple[str, float]] = []
    for prompt, result in scored.values():
        for q in prompt.questions:
            pid = q.proposition_id
            if mode == "official":
                raw.append((q.category, result.raw[-1][pid]))
            else:
                raw.append((q.category, float(np.mean([c[pid] for c in result.raw]))))
                adjusted.append((q.category, float(np.mean([c[pid] for c in result.adjusted]))))
    l1, l2 = category_scores(raw)
    l1_adjusted, l2_adjusted = category_scores(adjusted) if mode == "fixed" else (None, None)
    return {
        "score": float(np.mean([result.score for _, result in scored.values()])) * 100,
        "l1": l1,
        "l2": l2,
        "l1_adjusted": l1_adjusted,
        "l2_adjusted": l2_adjusted,
        "per_prompt": {
            key: {"score": result.score * 100, "crops": [c * 100 for c in result.crops]}
            for key, (_, result) in scored.items()
        },
    }
