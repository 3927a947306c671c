"""Scores what the frozen toy UNet draws for held-out captions, three ways:

    python -m toyworld.evaluate --models models/toy --workdir out/toy [--count 192] [--seed 1]

- "toy SD": the toy Stable Diffusion with its own CLIP text encoder (the ceiling);
- "untrained ELLA": the connector of WORKDIR/ella_config.json at its random initialisation;
- "trained ELLA": WORKDIR/ella.safetensors, as train.main exported it.

The captions are those of `--count` scenes drawn with `--seed` (the training data uses other
seeds). The connector reads the T5 tokens as it was trained to (WORKDIR/config.json): each
caption's own tokens when it masked the padding, else the reference's fixed 128. Writes
WORKDIR/eval/{scores.json, scores.md, samples.png (a row of the first `--grid` captions per way,
top to bottom as listed), captions.txt}.
"""

import argparse
import json
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ella_jax import storage
from ella_jax.images import grid, save_png, to_uint8
from ella_jax.pipeline import ELLAPipeline
from ella_jax.storage import atomic_path
from ella_jax.weights.tensors import CheckpointError, read_json
from toyworld.scenes import generate
from toyworld.score import ATTRIBUTES, score, score_many
from train.trainer import RUN_CONFIG_FILE


def draw(
    pipeline: ELLAPipeline,
    captions: list[str],
    mode: str,
    steps: int,
    guidance: float,
    seed: int,
    token_length: Literal["fixed", "flexible"],
    batch: int = 64,
) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images for `captions`, in batches of `batch` (one compiled shape)."""
    images = []
    for start in range(0, len(captions), batch):
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
    return ELLAPipeline(pipeline.modules, params, pipeline.tokenizers, pipeline.scheduler)


def evaluate(
    models: epath.Path,
    workdir: epath.Path,
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    grid_count: int,
    token_length: Literal["fixed", "flexible"] | None = None,
) -> dict[str, dict[str, float]]:
    """{way: {attribute: accuracy}} (see the module docstring); writes WORKDIR/eval.
    token_length: the pipeline's T5 token mode; None: "flexible" when the run trained with
    mask_padding (WORKDIR/config.json), else "fixed"."""
    checkpoint = workdir / "ella.safetensors"
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: not found (train first: see configs/toy.py)")
    # The official file does not hold the head count; train.main writes it beside, and the
    # run's config, whose mask_padding says how the connector read the T5 tokens.
    heads = read_json(workdir / "ella_config.json")["heads"]
    if token_length is None:
        run = workdir / RUN_CONFIG_FILE
        masked = run.is_file() and read_json(run).get("mask_padding", False)
        token_length = "flexible" if masked else "fixed"
    trained = ELLAPipeline.from_pretrained(models / "sd", models / "t5", checkpoint, heads)
    pipelines = {
        "toy SD": (trained, "clip"),
        "untrained ELLA": (untrained(trained, seed), "ella"),
        "trained ELLA": (trained, "ella"),
    }
    captions = [text for _, text in generate(seed, count)]
    scores, rows = {}, []
    for way, (pipeline, mode) in pipelines.items():
        images = draw(pipeline, captions, mode, steps, guidance, seed, token_length)
        scores[way] = score_many(list(images), captions)
        rows.extend(images[:grid_count])
        print(f"{way}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[way].items()))

    settings = dict(
        count=count, seed=seed, steps=steps, guidance=guidance, token_length=token_length
    )
    report(workdir / "eval", scores, captions, rows, grid_count, settings)
    return scores


def report(
    out: epath.Path,
    scores: dict[str, dict[str, float]],
    captions: list[str],
    rows: list[np.ndarray],
    grid_count: int,
    settings: dict,
) -> None:
    """Writes `out` (replaced whole): scores.json, scores.md (a row per way), captions.txt (the
    first `grid_count` captions) and samples.png (`rows`: `grid_count` images per way)."""
    # Whether a caption states an attribute does not depend on the image.
    blank = [score(np.zeros((32, 32, 3), np.uint8), text) for text in captions]
    stated = {a: sum(r[a] is not None for r in blank) for a in ATTRIBUTES}
    table = [
        "| captions stating it | " + " | ".join(f"{a} ({stated[a]})" for a in ATTRIBUTES) + " |",
        "|" + " --- |" * (len(ATTRIBUTES) + 1),
    ]
    for way, accuracy in scores.items():
        cells = ("-" if np.isnan(accuracy[a]) else f"{accuracy[a]:.2f}" for a in ATTRIBUTES)
        table.append(f"| {way} | " + " | ".join(cells) + " |")
    with atomic_path(out, overwrite=True) as staging:
        staging.mkdir()
        readable = {
            way: {a: None if np.isnan(v) else v for a, v in accuracy.items()}
            for way, accuracy in scores.items()
        }
        summary = {**settings, "captions_stating": stated, "scores": readable}
        (staging / "scores.json").write_text(json.dumps(summary, indent=2))
        (staging / "scores.md").write_text("\n".join(table) + "\n")
        (staging / "captions.txt").write_text("\n".join(captions[:grid_count]) + "\n")
        upscaled = np.repeat(np.repeat(np.stack(rows), 2, axis=1), 2, axis=2)
        framed = np.pad(upscaled, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=96)
        save_png(grid(framed, columns=grid_count), staging / "samples.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", type=storage.path, default="models/toy", help="pretrain --out")
    parser.add_argument(
        "--workdir", type=storage.path, required=True, help="train.main --workdir (or a URI)"
    )
    parser.add_argument("--count", type=int, default=192, help="held-out captions")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out scenes")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance")
    parser.add_argument("--grid", type=int, default=12, help="captions shown in samples.png")
    parser.add_argument(
        "--token-length",
        choices=("fixed", "flexible"),
        help="T5 tokens the connector sees: fixed 128 unmasked, or each caption's own (default: "
        "flexible when WORKDIR/config.json trained with mask_padding, else fixed)",
    )
    args = parser.parse_args()
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
        )
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
