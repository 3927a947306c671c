"""Scores SUR-adapter's premise in the toy world: what the frozen toy UNet draws for held-out
paraphrases (words its text encoder never saw), against what their template captions state.

    python -m toyworld.evaluate_sur --out out/sur-eval \
        --sur "SUR as released=out/sur-released" --sur "SUR, gradient fixed=out/sur-toy" \
        --ella "ELLA on the paraphrases=out/ella-para" [--count 192] [--seed 1]

Rows: the toy SD on the template captions (the ceiling) and on the paraphrases (the floor), then
each run, drawing from the paraphrases: a SUR-adapter run (WORKDIR/sur_adapter.safetensors;
attending over the batch as released when the run did, one prompt at a time as the official
pipeline runs it, else over tokens in batches of 64) or an ELLA run (WORKDIR/ella.safetensors,
the run's token mode). Every image is scored against its template caption. Writes OUT/{scores.json,
scores.md, samples.png (a row of the first `--grid` captions per way), captions.txt}.
"""

import argparse

from etils import epath

from ella_jax import storage
from ella_jax.pipeline import ELLAPipeline
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.trained_run import RUN_CONFIG_FILE
from toyworld.evaluate import draw, report
from toyworld.scenes import generate_paraphrased
from toyworld.score import score_many


def _labelled(value: str) -> tuple[str, epath.Path]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: use LABEL=WORKDIR")
    return label, storage.path(path)


def _run_config(workdir: epath.Path, export: str) -> dict:
    if not (workdir / export).is_file():
        raise CheckpointError(f"{workdir / export}: not found (train the run first)")
    return read_json(workdir / RUN_CONFIG_FILE)


def evaluate(
    models: epath.Path,
    out: epath.Path,
    sur_runs: list[tuple[str, epath.Path]],
    ella_runs: list[tuple[str, epath.Path]],
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    grid_count: int,
) -> dict[str, dict[str, float]]:
    """{way: {attribute: accuracy}} (see the module docstring); writes `out`."""
    triples = generate_paraphrased(seed, count)
    templates = [template for _, template, _ in triples]
    paraphrases = [simple for _, _, simple in triples]
    sd = ELLAPipeline.from_pretrained(models / "sd")
    ways = [
        ("toy SD, template captions (ceiling)", sd, "clip", templates, 64, "fixed"),
        ("toy SD, paraphrases (floor)", sd, "clip", paraphrases, 64, "fixed"),
    ]
    for label, workdir in sur_runs:
        _run_config(workdir, "sur_adapter.safetensors")
        pipeline = ELLAPipeline.from_pretrained(  # attending as the run did (stored with it)
            models / "sd", sur=workdir / "sur_adapter.safetensors"
        )
        official = pipeline.modules["sur"].attend == "batch"
        ways.append((label, pipeline, "sur", paraphrases, 1 if official else 64, "fixed"))
    for label, workdir in ella_runs:
        run = _run_config(workdir, "ella.safetensors")
        heads = read_json(workdir / "ella_config.json")["heads"]
        pipeline = ELLAPipeline.from_pretrained(
            models / "sd", models / "t5", workdir / "ella.safetensors", heads
        )
        token_length = "flexible" if run.get("mask_padding") else "fixed"
        ways.append((label, pipeline, "ella", paraphrases, 64, token_length))

    scores, rows = {}, []
    for way, pipeline, mode, captions, batch, token_length in ways:
        images = draw(pipeline, captions, mode, steps, guidance, seed, token_length, batch)
        scores[way] = score_many(list(images), templates)
        rows.extend(images[:grid_count])
        print(f"{way}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[way].items()))
    settings = dict(count=count, seed=seed, steps=steps, guidance=guidance)
    shown = {"shown_paraphrases": paraphrases[:grid_count]}  # captions.txt: their templates
    report(out, scores, templates, rows, grid_count, {**settings, **shown})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.evaluate_sur", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", type=storage.path, default="models/toy", help="pretrain --out")
    parser.add_argument("--out", type=storage.path, required=True, help="folder to (re)write")
    parser.add_argument(
        "--sur",
        type=_labelled,
        action="append",
        default=[],
        metavar="LABEL=WORKDIR",
        help="a SUR-adapter run (train.main --config configs/sur_toy.py); repeatable",
    )
    parser.add_argument(
        "--ella",
        type=_labelled,
        action="append",
        default=[],
        metavar="LABEL=WORKDIR",
        help="an ELLA run trained on the paraphrases; repeatable",
    )
    parser.add_argument("--count", type=int, default=192, help="held-out captions")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out scenes")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance")
    parser.add_argument("--grid", type=int, default=12, help="captions shown in samples.png")
    args = parser.parse_args()
    try:
        evaluate(
            args.models,
            args.out,
            args.sur,
            args.ella,
            args.count,
            args.seed,
            args.steps,
            args.guidance,
            args.grid,
        )
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
