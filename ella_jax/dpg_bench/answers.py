"""The VQA's answers on disk: OUT/answers*.jsonl, one JSON object per (image, crop, question).

A record holds the image's file name, the crop box, the item and proposition ids, the question,
the answer and the VQA that gave it. The key of an answer is (image, crop box, question): the
same answers serve both modes, a rerun asks only what no record holds, and shards
(answers-I-of-N.jsonl) are merged by reading every file. Records are appended and flushed batch
by batch; a last line cut short (a killed run) is ignored, and cut off before the next append.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ella_jax.dpg_bench.questions import BenchmarkError

Box = tuple[int, int, int, int]
Key = tuple[str, Box, str]


def answers_path(out: Path, shard: tuple[int, int] | None = None) -> Path:
    """OUT/answers.jsonl, or OUT/answers-I-of-N.jsonl for shard (I, N)."""
    if shard is None:
        return out / "answers.jsonl"
    return out / f"answers-{shard[0]}-of-{shard[1]}.jsonl"


def key_of(record: dict) -> Key:
    return record["image"], tuple(record["crop"]), record["question"]


def read_answers(out: Path, vqa: str | None = None) -> tuple[dict[Key, str], str | None]:
    """({key: answer}, the VQA that gave them) from every OUT/answers*.jsonl. With `vqa`, answers
    of another VQA are an error (they would mix two models in one score)."""
    answers: dict[Key, str] = {}
    for file in sorted(out.glob("answers*.jsonl")):
        text = file.read_text(encoding="utf-8")
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            try:
                record = json.loads(line)
                key, answer, source = key_of(record), record["answer"], record["vqa"]
            except (ValueError, KeyError, TypeError):
                raise BenchmarkError(f"{file}:{number}: not an answer record") from None
            if vqa is None:
                vqa = source
            if source != vqa:
                raise BenchmarkError(
                    f"{file}:{number}: an answer of --vqa {source}, not {vqa}: score into "
                    "another --out, or delete the answers of the other model"
                )
            answers[key] = answer
    return answers, vqa


class AnswerLog:
    """Appends records to one answers file, each batch flushed to disk before the next."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            whole = data.rfind(b"\n") + 1
            if whole < len(data):
                os.truncate(path, whole)
        self.path = path

    def write(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
