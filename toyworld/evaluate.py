"""Scores what the frozen toy UNet draws for held-out captions, three ways:

    python -m toyworld.evaluate --workdir out/toy [--models models/toy] [--count 192] [--seed 1]
        [--dpg-count 64] [--overwrite]

- "toy SD": the toy Stable Diffusion with its own CLIP text encoder (the ceiling);
- "untrained ELLA": the connector of WORKDIR/ella_config.json at its random initialisation;
- "trained ELLA": WORKDIR/ella.safetensors, as train.main exported it.

The connectors read the run's text model (WORKDIR/config.json's text_encoder: the toy T5 unless
it names another, such as models/toy/llm).

The captions are those of `--count` scenes drawn with `--seed` (the training data uses other
seeds), scored in splits: all of them; where the run's config has a `hold_out` (configs/toy.py),
the captions stating only combinations its training scenes had ("trained combinations": most of
them occur verbatim among the training captions, whose template space is small) and those
stating a combination no training scene contains ("held-out combinations": new to the
connector, not to the toy SD, which saw every combination). The connector reads the T5 tokens
as it was trained to (WORKDIR/config.json): each caption's own tokens when it masked the
padding, else the run's fixed token length.

Each way also takes the toy DPG-Bench (`toyworld.dpg_bench`) on the first `--dpg-count` of those
captions: `python -m ella_jax.generate --dpg-bench` draws its 2x2 grids (seeds 0-3), and
`python -m ella_jax.dpg_bench score` scores them with the toy VQA, in this process.

Writes WORKDIR/eval/{scores.json, scores.md, samples.png (a row of the first `--grid` captions
per way, top to bottom as listed), captions.txt, dpg_bench/} (dpg_bench/: the CSV, and per way
its grids and scores as those commands write them), whole or not at all; an existing eval/ is
kept unless --overwrite. About 4 minutes on 2 CPU cores. Errors print one line and exit 2.
"""

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ella_jax import dpg_bench, generate, storage
from ella_jax.cli import error_exit, finite_float, natural_int, positive_int
from ella_jax.images import grid, save_png, to_uint8
from ella_jax.pipeline import ELLAPipeline
from ella_jax.storage import atomic_path
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.trained_run import RUN_CONFIG_FILE
from toyworld import dpg_bench as toy_dpg_bench
from toyworld.scenes import HoldOut, parse_caption
from toyworld.scenes import generate as generate_scenes
from toyworld.score import ATTRIBUTES, score, score_many

REPOSITORY_MODELS = Path(__file__).resolve().parents[1] / "models" / "toy"
TRAINED, HELD_OUT = "trained combinations", "held-out combinations"  # the splits of a hold-out


def draw(
    pipeline: ELLAPipeline,
    captions: list[str],
    mode: str,
    steps: int,
    guidance: float,
    seed: int,
    token_length: Literal["fixed", "flexible"],
    batch: int = 64,
    description: str = "drawing",
) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images for `captions`, in batches of `batch` (one compiled shape;
    fewer captions: one batch of them)."""
    from tqdm import tqdm

    batch = min(batch, len(captions))
    images = []
    for start in tqdm(range(0, len(captions), batch), desc=description, unit="batch"):
        part = captions[start : start + batch]
        padded = part + [""] * (batch - len(part))
        drawn = pipeline(
            padded,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=32,
            width=32,
            seed=seed + start,
            output_type="np",
            mode=mode,
            token_length=token_length,
        )
        images.append(np.asarray(drawn)[: len(part)])
    return to_uint8(np.concatenate(images))


def untrained(pipeline: ELLAPipeline, seed: int) -> ELLAPipeline:
    """The same pipeline with the connector's params at a fresh initialisation."""
    ella = pipeline.modules["ella"]
    params = ella.init(jax.random.key(seed), jnp.zeros((1, 1, ella.input_dim)), jnp.zeros((1,)))[
        "params"
    ]
    params = {**pipeline.params, "ella": params}
    return ELLAPipeline(
        pipeline.modules, params, pipeline.tokenizers, pipeline.scheduler, trained=pipeline.trained
    )


def evaluate(
    models: epath.Path,
    workdir: epath.Path,
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    grid_count: int,
    token_length: Literal["fixed", "flexible"] | None = None,
    dpg_count: int = 64,
    overwrite: bool = False,
) -> dict[str, dict[str, float]]:
    """{row: {attribute: accuracy}}, a row per way and split ("trained ELLA: held-out
    combinations (40)"; see the module docstring); writes WORKDIR/eval.
    token_length: the pipeline's T5 token mode; None: the run's ("flexible" where it trained
    with mask_padding, WORKDIR/config.json). dpg_count: toy DPG-Bench prompts (0: none).
    overwrite: replace an existing WORKDIR/eval (else a FileExistsError, before any work)."""
    checkpoint = workdir / "ella.safetensors"
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: not found (train first: see configs/toy.py)")
    if (workdir / "eval").exists() and not overwrite:
        raise FileExistsError(
            f"{workdir / 'eval'}: already exists (pass --overwrite to replace it)"
        )
    # The run's text model when it named one (config.text_encoder), else the toy T5; the
    # pipeline reads the run's heads, text layer and token length beside its export.
    run = workdir / RUN_CONFIG_FILE
    saved = read_json(run) if run.is_file() else {}
    text = saved.get("text_encoder") or {}
    hold_out = HoldOut.from_config(saved.get("hold_out"))
    print(f"loading the models of {models} and {checkpoint} ...", flush=True)
    trained = ELLAPipeline.from_pretrained(
        models / "sd", text.get("path") or models / "t5", checkpoint
    )
    token_length = token_length or trained.token_length
    pipelines = {
        "toy SD": (trained, "clip"),
        "untrained ELLA": (untrained(trained, seed), "ella"),
        "trained ELLA": (trained, "ella"),
    }
    captions = [text for _, text in generate_scenes(seed, count)]
    splits = caption_splits(captions, hold_out)
    scores, rows, dpg = {}, [], {}
    with tempfile.TemporaryDirectory() as dpg_dir:
        dpg_dir = Path(dpg_dir)
        csv = dpg_dir / "toy_dpg_bench.csv"
        items = toy_dpg_bench.write_csv(csv, seed, dpg_count) if dpg_count else []
        for way, (pipeline, mode) in pipelines.items():
            images = draw(
                pipeline, captions, mode, steps, guidance, seed, token_length, description=way
            )
            rows.extend(images[:grid_count])
            for split, chosen in splits.items():
                row = f"{way}: {split} ({len(chosen)})"
                scores[row] = score_many([images[i] for i in chosen], [captions[i] for i in chosen])
                print(f"{row}: " + ", ".join(f"{k} {_accuracy(v)}" for k, v in scores[row].items()))
            all_row = f"{way}: all ({len(captions)})"
            if items:
                flags = ["--mode", mode, "--steps", str(steps), "--guidance", str(guidance),
                         "--token-length", token_length, "--sd", str(models / "sd")]  # fmt: skip
                out = dpg_dir / generate.slugify(way)
                dpg[all_row] = take_dpg_bench(pipeline, csv, items, out, flags)
                print(f"{way}: toy DPG-Bench {dpg[all_row]['score']:.1f}")

        settings = dict(
            count=count,
            seed=seed,
            steps=steps,
            guidance=guidance,
            token_length=token_length,
            hold_out=dataclasses.asdict(hold_out),
            splits={split: len(chosen) for split, chosen in splits.items()},
        )
        report(workdir / "eval", scores, captions, rows, grid_count, settings, dpg, dpg_dir)
    return scores


def caption_splits(captions: list[str], hold_out: HoldOut) -> dict[str, list[int]]:
    """{split: indices of `captions`}: "all", and with a hold-out, "trained combinations"
    (captions stating only combinations the training scenes had) and "held-out combinations"
    (captions stating one the training scenes never contain)."""
    held = [bool(hold_out.stated(parse_caption(text))) for text in captions]
    splits = {"all": list(range(len(captions)))}
    if any(hold_out.colour_shape + hold_out.shape_position + hold_out.relation):
        splits[TRAINED] = [i for i, h in enumerate(held) if not h]
        splits[HELD_OUT] = [i for i, h in enumerate(held) if h]
    return splits


def _accuracy(value: float) -> str:
    """An accuracy to 3 places; "-" where no caption states the attribute (NaN)."""
    return "-" if np.isnan(value) else f"{value:.3f}"


def take_dpg_bench(
    pipeline: ELLAPipeline, csv: Path, items: list[tuple[str, str]], out: Path, flags: list[str]
) -> dict:
    """The toy DPG-Bench's scores.json for `pipeline`: OUT/grids/ as `python -m ella_jax.generate
    --dpg-bench CSV --size 32 --batch-size 64 FLAGS` draws them, OUT/ as `python -m
    ella_jax.dpg_bench score --resolution 32 --vqa toyworld.dpg_bench:answer` scores them."""
    grids = out / "grids"
    argv = ["--dpg-bench", str(csv), "--out", str(grids), "--size", "32", "--batch-size", "64"]
    args = generate.build_parser().parse_args([*argv, *flags])
    grids.mkdir(parents=True)
    generate.render_dpg_bench(generate.Renderer(pipeline, args, None), items, args)
    vqa = "toyworld.dpg_bench:answer"
    return dpg_bench.evaluate(
        csv, grids, out, 32, vqa=toy_dpg_bench.answer, vqa_name=vqa, progress=False
    )


def report(
    out: epath.Path,
    scores: dict[str, dict[str, float]],
    captions: list[str],
    rows: list[np.ndarray],
    grid_count: int,
    settings: dict,
    dpg: dict[str, dict] | None = None,
    dpg_dir: Path | None = None,
) -> None:
    """Writes `out` (replaced whole): scores.json, scores.md (a row per way), captions.txt (the
    first `grid_count` captions) and samples.png (`rows`: `grid_count` images per way); with
    `dpg` ({way: its toy DPG-Bench scores.json}), a DPG column and a table of its L1
    categories, and `dpg_dir` copied to dpg_bench/."""
    # Whether a caption states an attribute does not depend on the image.
    blank = [score(np.zeros((32, 32, 3), np.uint8), text) for text in captions]
    stated = {a: sum(r[a] is not None for r in blank) for a in ATTRIBUTES}
    dpg = dpg or {}
    dpg_column = " toy DPG-Bench |" if dpg else ""
    table = [
        "| captions stating it | "
        + " | ".join(f"{a} ({stated[a]})" for a in ATTRIBUTES)
        + f" |{dpg_column}",
        "|" + " --- |" * (len(ATTRIBUTES) + 1 + bool(dpg)),
    ]
    for way, accuracy in scores.items():
        cells = ("-" if np.isnan(accuracy[a]) else f"{accuracy[a]:.2f}" for a in ATTRIBUTES)
        extra = f" {dpg[way]['score']:.1f} |" if way in dpg else " - |" if dpg else ""
        table.append(f"| {way} | " + " | ".join(cells) + f" |{extra}")
    if dpg:
        categories = list(next(iter(dpg.values()))["l1"])
        table += ["", "| toy DPG-Bench, L1 | " + " | ".join(categories) + " | score |"]
        table.append("|" + " --- |" * (len(categories) + 2))
        for way, summary in dpg.items():
            cells = " | ".join(f"{summary['l1'][c]:.1f}" for c in categories)
            table.append(f"| {way} | {cells} | {summary['score']:.1f} |")
    with atomic_path(out, overwrite=True) as staging:
        staging.mkdir()
        readable = {
            way: {a: None if np.isnan(v) else v for a, v in accuracy.items()}
            for way, accuracy in scores.items()
        }
        summary = {**settings, "captions_stating": stated, "scores": readable}
        if dpg:
            summary["dpg_bench"] = {
                way: {k: v[k] for k in ("score", "l1", "l2", "l1_adjusted", "l2_adjusted")}
                for way, v in dpg.items()
            }
        if dpg_dir is not None and dpg:
            shutil.copytree(dpg_dir, staging / "dpg_bench")
        (staging / "scores.json").write_text(json.dumps(summary, indent=2))
        (staging / "scores.md").write_text("\n".join(table) + "\n")
        (staging / "captions.txt").write_text("\n".join(captions[:grid_count]) + "\n")
        upscaled = np.repeat(np.repeat(np.stack(rows), 2, axis=1), 2, axis=2)
        framed = np.pad(upscaled, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=96)
        save_png(grid(framed, columns=grid_count), staging / "samples.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        type=storage.path_argument,
        default=REPOSITORY_MODELS,
        help="toyworld.pretrain's --out (default: this repository's models/toy, wherever the "
        "command runs)",
    )
    parser.add_argument(
        "--workdir",
        type=storage.path_argument,
        required=True,
        help="train.main --workdir (or a URI)",
    )
    parser.add_argument(
        "--count", type=positive_int, default=192, help="held-out captions (%(default)s)"
    )
    parser.add_argument(
        "--seed", type=natural_int, default=1, help="seed of the held-out scenes (%(default)s)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=20, help="DPM-Solver++ steps (%(default)s)"
    )
    parser.add_argument(
        "--guidance", type=finite_float, default=3.0, help="classifier-free guidance (%(default)s)"
    )
    parser.add_argument(
        "--grid", type=positive_int, default=12, help="captions shown in samples.png (%(default)s)"
    )
    parser.add_argument(
        "--dpg-count",
        type=natural_int,
        default=64,
        help="toy DPG-Bench prompts (0: none; %(default)s)",
    )
    parser.add_argument(
        "--token-length",
        choices=("fixed", "flexible"),
        help="T5 tokens the connector sees: the run's fixed length unmasked, or each caption's "
        "own (default: flexible when WORKDIR/config.json trained with mask_padding, else fixed)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing WORKDIR/eval")
    args = parser.parse_args(argv)
    try:
        evaluate(
            args.models,
            args.workdir,
            args.count,
            args.seed,
            args.steps,
            args.guidance,
            args.grid,
            args.token_length,
            args.dpg_count,
            args.overwrite,
        )
    except (CheckpointError, OSError, ValueError) as e:
        return error_exit(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
