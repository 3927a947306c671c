"""python -m ella_jax.dpg_bench score|merge: DPG-Bench scores of a folder of 2x2 grids."""

import argparse
import sys
from pathlib import Path

from ella_jax.cli import error_exit, positive_int
from ella_jax.dpg_bench.evaluate import VQA, evaluate
from ella_jax.dpg_bench.questions import BenchmarkError
from ella_jax.plugin import PluginError, load_function

DESCRIPTION = """\
Score DPG-Bench grids (python -m ella_jax.generate --dpg-bench ... writes them: OUT/<item_id>.png,
four samples of side R tiled 2x2) against the benchmark's CSV with a VQA model.

  score  asks the VQA every question on each of the first --pic-num tiles, then writes
         OUT/scores.json (score, l1, l2, l1_adjusted, l2_adjusted, per_prompt, skipped),
         OUT/scores.md and OUT/answers.jsonl (one line per answer). Resumable: answers already
         in OUT are not asked again. With --shard I/N it only answers every N-th image from the
         I-th (into OUT/answers-I-of-N.jsonl); run the N shards (processes or hosts sharing
         OUT), then merge.
  merge  scores from the answers in OUT alone (every needed answer must be there).

--mode fixed (default) counts every question, averages the category values over all tiles
(and reports the dependency-adjusted ones beside), and makes a prompt without its image an
error unless --skip-missing. --mode official reproduces the official script's numbers: the
first CSV row dropped, category values from the last tile's raw answers, every file of the
folder scored and those that fail skipped.

--vqa MODULE:FUNCTION names FUNCTION(images: list[PIL.Image], questions: list[str]) -> list[str]
(MODULE a module or a .py file), called with up to --batch-size pairs; a folder instead is a
Hugging Face VQA model (BLIP, ViLT: the `eval` extra). ella_jax.dpg_bench.mplug:answer is
modelscope's mPLUG-large, the paper's. An answer counts when it is exactly "yes".

Errors print one line and exit with status 2.
"""


SEE_ALSO = "python -m ella_jax.dpg_bench --help says more."


def _shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = None
    if not slash or shard is None or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N")
    return shard


def load_vqa(spec: str) -> tuple[VQA, str]:
    """The VQA function `spec` names and the name its answers are recorded under."""
    if Path(spec).is_dir():
        from ella_jax.dpg_bench.transformers_vqa import TransformersVQA

        folder = str(Path(spec).resolve())
        try:
            return TransformersVQA(folder), folder
        except ImportError as e:
            raise PluginError(f"--vqa {spec}: {e}") from None
    return load_function(spec, "--vqa"), spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ella_jax.dpg_bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summaries = {
        "score": "ask the VQA what is not answered yet, then score",
        "merge": "score from the answers in OUT (after sharded runs)",
    }
    for name, summary in summaries.items():
        sub = commands.add_parser(name, help=summary, description=f"{summary}. {SEE_ALSO}")
        sub.add_argument("--csv", type=Path, required=True, help="DPG-Bench's dpg_bench.csv")
        sub.add_argument(
            "--images", type=Path, required=True, metavar="DIR", help="folder of 2x2 grids"
        )
        sub.add_argument(
            "--resolution", type=positive_int, required=True, metavar="R", help="side of one tile"
        )
        sub.add_argument(
            "--pic-num",
            type=int,
            choices=(1, 2, 3, 4),
            default=4,
            help="tiles scored per grid (default: 4, as the paper)",
        )
        sub.add_argument(
            "--mode",
            choices=("fixed", "official"),
            default="fixed",
            help="fixed: DPG_SPEC's corrected scoring; official: the official script's numbers, "
            "bugs included (default: fixed)",
        )
        sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder")
        sub.add_argument(
            "--skip-missing",
            action="store_true",
            help="fixed mode: leave out (and list) prompts whose grid is missing or unreadable",
        )
        if name == "score":
            sub.add_argument(
                "--vqa",
                required=True,
                metavar="MODULE:FUNCTION|DIR",
                help="FUNCTION(images, questions) -> answers, or a Hugging Face VQA folder",
            )
            sub.add_argument(
                "--batch-size",
                type=positive_int,
                default=16,
                metavar="N",
                help="(tile, question) pairs per VQA call (default: 16)",
            )
            sub.add_argument("--shard", type=_shard, metavar="I/N", help="answer only shard I of N")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        vqa, vqa_name = load_vqa(args.vqa) if args.command == "score" else (None, None)
        summary = evaluate(
            args.csv,
            args.images,
            args.out,
            args.resolution,
            args.pic_num,
            args.mode,
            vqa,
            vqa_name,
            getattr(args, "batch_size", 1),
            getattr(args, "shard", None),
            args.skip_missing,
        )
    except (BenchmarkError, PluginError, OSError) as e:
        return error_exit(e)
    if summary is None:
        shard = f"{args.shard[0]}/{args.shard[1]}"
        print(f"shard {shard} answered; when every shard has: python -m ella_jax.dpg_bench merge")
    else:
        print(f"DPG-Bench score {summary['score']:.2f} ({args.mode}); wrote {args.out}/scores.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
