"""Scoring a folder of 2x2 grids: find each prompt's image, ask the VQA what no earlier run
answered, score, and write OUT/scores.json and OUT/scores.md.

fixed: the prompts of the CSV, each needing its image `<item_id>.<ext>` of 2R x 2R pixels.
official: as the official script: every file of the folder, its key the name up to the first
dot; a file that is not an image, whose key has no questions, or whose scoring fails (a parent
the dropped first row held) is skipped and listed, and a prompt without an image is not counted.
"""

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ella_jax.dpg_bench.answers import AnswerLog, Box, Key, answers_path, read_answers
from ella_jax.dpg_bench.questions import BenchmarkError, Mode, Prompt, read_benchmark
from ella_jax.dpg_bench.scoring import PromptScore, benchmark_scores, score_prompt
from ella_jax.storage import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VQA = Callable[[list[Image.Image], list[str]], list[str]]


@dataclass(frozen=True)
class Task:
    """A prompt and the file name of its grid in the images folder."""

    image: str
    prompt: Prompt


def crop_boxes(resolution: int, pic_num: int) -> list[Box]:
    """The PIL boxes of the first `pic_num` tiles of a 2x2 grid of side `resolution`, in the
    official order: top left, top right, bottom left, bottom right."""
    r = resolution
    return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)][:pic_num]


def _unreadable(path: Path, resolution: int | None) -> str | None:
    """Why the image at `path` cannot be scored (None: it can); `resolution`: its size must be
    2x2 tiles of it."""
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
    except (OSError, ValueError) as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if resolution is not None and size != (2 * resolution, 2 * resolution):
        return (
            f"is {size[0]}x{size[1]}, not 2x2 tiles of --resolution {resolution} "
            f"({2 * resolution}x{2 * resolution})"
        )
    return None


def fixed_tasks(
    prompts: list[Prompt], images: Path, resolution: int, skip_missing: bool
) -> tuple[list[Task], list[dict]]:
    """(a task per prompt with a readable grid, [{item, reason}] of those without one). Without
    `skip_missing`, any prompt without one is an error naming it."""
    tasks, skipped = [], []
    for prompt in prompts:
        found = [
            prompt.item_id + s for s in IMAGE_SUFFIXES if (images / (prompt.item_id + s)).exists()
        ]
        if len(found) > 1:
            raise BenchmarkError(f"{images}: item {prompt.item_id} has several images: {found}")
        reason = "no image" if not found else _unreadable(images / found[0], resolution)
        if reason is None:
            tasks.append(Task(found[0], prompt))
        else:
            name = found[0] if found else f"{prompt.item_id}.png"
            skipped.append({"item": prompt.item_id, "image": name, "reason": reason})
    if skipped and not skip_missing:
        first = skipped[0]
        raise BenchmarkError(
            f"{images / first['image']}: item {first['item']}: {first['reason']}"
            + (f" (and {len(skipped) - 1} more items)" if len(skipped) > 1 else "")
            + "; render it, or pass --skip-missing to score without it"
        )
    return tasks, skipped


def official_tasks(prompts: list[Prompt], images: Path) -> tuple[list[Task], list[dict]]:
    """(a task per readable file of `images` whose key has questions, [{image, reason}] of the
    other files), as the official script walks the folder."""
    by_id = {p.item_id: p for p in prompts}
    tasks, skipped = [], []
    for path in sorted(images.iterdir()):
        key = path.name.split(".")[0]
        reason = _unreadable(path, None) if path.is_file() else "not a file"
        if reason is None and key not in by_id:
            reason = f"no questions for key {key!r}"
        if reason is None:
            tasks.append(Task(path.name, by_id[key]))
        else:
            skipped.append({"image": path.name, "reason": reason})
    return tasks, skipped


def _questions(tasks: Sequence[Task], boxes: list[Box], known: dict[Key, str]) -> list[tuple]:
    """(task, crop index, question) for each answer that `known` lacks, each key once."""
    wanted, seen = [], set()
    for task in tasks:
        for c, box in enumerate(boxes):
            for question in task.prompt.questions:
                key = (task.image, box, question.text)
                if key not in known and key not in seen:
                    seen.add(key)
                    wanted.append((task, c, question))
    return wanted


def _batches(wanted: list[tuple], images: Path, boxes: list[Box], size: int) -> Iterator[list]:
    """`wanted` in batches of `size`, each entry with its crop (RGB), each grid read once."""
    crops: dict[str, list[Image.Image]] = {}
    for start in range(0, len(wanted), size):
        batch = []
        for task, c, question in wanted[start : start + size]:
            if task.image not in crops:
                if len(crops) >= 2 * size:
                    crops.clear()
                with Image.open(images / task.image) as image:
                    image = image.convert("RGB")
                    crops[task.image] = [image.crop(box) for box in boxes]
            batch.append((task, c, question, crops[task.image][c]))
        yield batch


def ask(
    tasks: Sequence[Task],
    images: Path,
    boxes: list[Box],
    vqa: VQA,
    vqa_name: str,
    known: dict[Key, str],
    log: AnswerLog,
    batch_size: int,
    progress: bool = True,
) -> int:
    """Asks `vqa` every question of `tasks` on every crop that `known` has no answer for, in
    batches of `batch_size` (crop, question) pairs; appends the answers to `log` and `known`.
    Returns how many were asked."""
    from tqdm import tqdm

    wanted = _questions(tasks, boxes, known)
    with tqdm(total=len(wanted), unit="question", desc="asking", disable=not progress) as bar:
        for batch in _batches(wanted, images, boxes, batch_size):
            items = sorted({task.prompt.item_id for task, *_ in batch})
            try:
                answers = vqa([crop for *_, crop in batch], [q.text for _, _, q, _ in batch])
            except Exception as e:
                raise BenchmarkError(
                    f"--vqa {vqa_name} failed on items {', '.join(items)}: "
                    f"{type(e).__name__}: {e} (the answers so far are kept)"
                ) from e
            if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
                count = len(answers) if isinstance(answers, (list, tuple)) else type(answers)
                raise BenchmarkError(
                    f"--vqa {vqa_name} returned {count} answers for {len(batch)} questions "
                    f"(items {', '.join(items)})"
                )
            records = []
            for (task, c, question, _), answer in zip(batch, answers, strict=True):
                if not isinstance(answer, str):
                    raise BenchmarkError(
                        f"--vqa {vqa_name} answered {answer!r} ({type(answer).__name__}, not str) "
                        f"to item {task.prompt.item_id}, question {question.text!r}"
                    )
                records.append(
                    {
                        "image": task.image,
                        "crop": list(boxes[c]),
                        "item": task.prompt.item_id,
                        "proposition_id": question.proposition_id,
                        "question": question.text,
                        "answer": answer,
                        "vqa": vqa_name,
                    }
                )
            log.write(records)
            for (task, c, question, _), answer in zip(batch, answers, strict=True):
                known[(task.image, boxes[c], question.text)] = answer
            bar.update(len(batch))
    return len(wanted)


def _score(
    tasks: Sequence[Task], boxes: list[Box], known: dict[Key, str], mode: Mode
) -> tuple[dict[str, tuple[Prompt, PromptScore]], list[dict]]:
    """({key: (prompt, scores)}, [{image, reason}] of official images whose scoring failed);
    key: the item id (fixed) or the image's file name (official)."""
    scored, failed = {}, []
    for task in tasks:
        answers = []
        for c, box in enumerate(boxes):
            crop = {}
            for q in task.prompt.questions:
                key = (task.image, box, q.text)
                if key not in known:
                    raise BenchmarkError(
                        f"no answer for item {task.prompt.item_id} ({task.image}), crop {c}, "
                        f"question {q.text!r}: has every shard finished?"
                    )
                crop[q.proposition_id] = known[key]
            answers.append(crop)
        try:
            result = score_prompt(task.prompt, answers)
        except KeyError as e:  # only in official mode: fixed checked every parent
            reason = f"proposition {e.args[0]} is a parent but not a question (the dropped row)"
            failed.append({"image": task.image, "reason": reason})
            continue
        scored[task.image if mode == "official" else task.prompt.item_id] = (task.prompt, result)
    return scored, failed


def evaluate(
    csv: Path,
    images: Path,
    out: Path,
    resolution: int,
    pic_num: int = 4,
    mode: Mode = "fixed",
    vqa: VQA | None = None,
    vqa_name: str | None = None,
    batch_size: int = 16,
    shard: tuple[int, int] | None = None,
    skip_missing: bool = False,
    progress: bool = True,
) -> dict | None:
    """Scores the grids in `images` against the DPG-Bench CSV `csv` into `out` and returns what
    scores.json holds. With `vqa` (and its `vqa_name`, recorded with each answer), asks what is
    not yet answered first; without, every answer must be in OUT already (merge). With `shard`
    (I, N), only asks the I-th of every N images, into OUT/answers-I-of-N.jsonl, and returns
    None: `merge` then scores."""
    if not images.is_dir():
        raise BenchmarkError(f"{images}: no such images folder")
    prompts = read_benchmark(csv, mode)
    if mode == "official":
        tasks, skipped = official_tasks(prompts, images)
    else:
        tasks, skipped = fixed_tasks(prompts, images, resolution, skip_missing)
    boxes = crop_boxes(resolution, pic_num)
    known, known_vqa = read_answers(out, vqa_name)
    if vqa is not None:
        mine = tasks if shard is None else tasks[shard[0] :: shard[1]]
        log = AnswerLog(answers_path(out, shard))
        asked = ask(mine, images, boxes, vqa, vqa_name, known, log, batch_size, progress)
        if progress:
            print(f"asked {asked} questions ({len(known)} answers in {out})")
        if shard is not None:
            return None
        known_vqa = vqa_name
    scored, failed = _score(tasks, boxes, known, mode)
    skipped += failed
    if not scored:
        raise BenchmarkError(f"{images}: no image could be scored ({len(skipped)} skipped)")
    summary = {
        "mode": mode,
        **benchmark_scores(scored, mode),
        "prompts": len(prompts),
        "scored": len(scored),
        "skipped": skipped,
        "settings": {
            "csv": str(csv),
            "images": str(images),
            "resolution": resolution,
            "pic_num": pic_num,
            "vqa": known_vqa,
        },
    }
    write_report(out, summary)
    return summary


def write_report(out: Path, summary: dict) -> None:
    """OUT/scores.json (all of `summary`) and OUT/scores.md (its tables), each written whole."""
    lines = [
        f"DPG-Bench score: **{summary['score']:.2f}** ({summary['mode']} mode; "
        f"{summary['scored']} of {summary['prompts']} prompts scored, "
        f"{len(summary['skipped'])} skipped)",
        "",
    ]
    for level in ("l1", "l2"):
        adjusted = summary[f"{level}_adjusted"]
        lines += [f"| {level.upper()} category | score |" + (" adjusted |" if adjusted else "")]
        lines += ["| --- | ---: |" + (" ---: |" if adjusted else "")]
        for name, value in summary[level].items():
            extra = f" {adjusted[name]:.2f} |" if adjusted else ""
            lines.append(f"| {name} | {value:.2f} |{extra}")
        lines.append("")
    for name, text in (
        ("scores.json", json.dumps(summary, indent=2)),
        ("scores.md", "\n".join(lines)),
    ):
        with atomic_path(out / name, overwrite=True) as staging:
            staging.write_text(text + "\n", encoding="utf-8")
