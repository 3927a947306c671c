"""The accelerator suite: ELLA's train step, sampler and connector at SD 1.5 / 512 px (or
ELLA-SDXL at 1024 px) on one device, beside PyTorch + diffusers doing the same work on the same
device.

    python -m bench.device_suite --out suite.json           # one H100 / H200: about 8 minutes
    python -m bench.device_suite --model sdxl --out sdxl.json       # SDXL's 2.6B UNet, 1024 px
    python -m bench.device_suite --small --out small.json   # the same code, tiny shapes, a CPU

Random weights of the real shapes (`bench.model_configs`: SD 1.5's UNet and the released ELLA;
SDXL's UNet and ELLA at width 2048 as configs/ella_sdxl_t5xl.py trains it, the UNet's added
conditions a random pooled embedding and 1024 px time ids), bfloat16 compute. Four processes:
one for each train row (a fresh peak-memory counter each; an out-of-memory error at a batch size
tries the next smaller one), one for the inference rows, and one for the PyTorch rows (which never
share the GPU with JAX's preallocated memory). The rows, under their keys in the JSON:

  train_step        `train.step.make_train_step` on precomputed inputs (VAE latent moments
  train_step_remat  (B, 64, 64, 4) bfloat16, flan-t5-xl features (B, 128, 2048) float16), ELLA's
                    float32 master weights, AdamW, EMA; remat "none", then "blocks" (the UNet's
                    ResNets and transformers recomputed in the backward). The largest of batch
                    8/16/32/64 (SDXL: 4/8/16/32) that fits
                    (predicted from the compiled batch 8, then compiled and run). samples_per_s,
                    step_seconds (--steps steps after two warm-up ones), flops (model FLOPs per
                    step, `ella_jax.flops`), mfu (against the chip's dense bfloat16 peak; on a
                    CPU a measured matmul rate), peak_bytes (`device.memory_stats()` where the
                    backend has it, else the compiled step's `memory_analysis()`).
  sampler           `ella_jax.sampling.sample_latents`: 50 DPM-Solver++ steps with CFG, ELLA and
  sampler_batched   the UNet at every step, batch 1 and 8 (SDXL: 1 and 4): seconds_per_image (T5,
                    CLIP and the VAE decode left out, on both sides).
  connector         ELLA's forward at batch 2, 128 tokens: seconds.

Each row's "torch" holds PyTorch + diffusers doing the same (`bench.device_suite_torch`: SDPA
attention, bfloat16 autocast; gradient checkpointing for "blocks"; the batch JAX chose), when
torch and diffusers import and, where JAX ran on a GPU, torch has CUDA (else "skipped"); "error"
replaces the figures of a row that failed.
Prints a markdown table and writes --out. --small runs the same code on `SUITE_SMALL`'s shapes
with the same keys. Needs jax, flax, optax, safetensors, numpy (torch and diffusers for the
comparison): nothing of the trainer's data or logging stack, for a bare GPU image.
"""

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from argparse import SUPPRESS
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.model_configs import SUITES, pooled_width
from bench.timing import median_seconds

RESULT = "RESULT "  # a part's last line of output: RESULT {json}
TRAIN_ROWS = {"train_step": "none", "train_step_remat": "blocks"}  # row: remat
SAMPLER_ROWS = ("sampler", "sampler_batched")  # at shapes["sample_batches"]
ROWS = (*TRAIN_ROWS, *SAMPLER_ROWS, "connector")


# ----------------------------------------------------------------------------------------------
# The JAX parts (each runs in its own process).


def _jax_setup():
    import jax

    # The repository's persistent compilation cache: a rerun compiles nothing again.
    jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parents[1] / ".jax_cache"))
    return jax


def _normal(shape: tuple[int, ...], dtype: Any, seed: int) -> Any:
    """A device array of normal(0, 1) values made on the host (no random kernels to compile)."""
    import jax
    import numpy as np

    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jax.device_put(values.astype(dtype))


def _random_params(module, *example, seed: int, scale: float = 0.02, **keywords):
    """The module's parameters in their declared shapes and dtypes (`jax.eval_shape`: nothing
    of the model is computed), normal(0, scale) values cut from one pool of host random numbers:
    fast at any size, and no random-number kernels to compile (35 s for SD 1.5's on a CPU)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = scale * rng.standard_normal(2**22, dtype=np.float32)

    def draw(shape: jax.ShapeDtypeStruct) -> jax.Array:
        values = np.resize(pool[rng.integers(pool.size) :], shape.shape)
        return jax.device_put(values.astype(shape.dtype))

    init = functools.partial(module.init, **keywords)
    return jax.tree.map(draw, jax.eval_shape(init, jax.random.key(0), *example)["params"])


def _added_conditions(shapes: dict, batch: int) -> dict:
    """The UNet's added conditions for `batch` images, as keyword arguments: SDXL's pooled
    embedding (random) and the time ids of an uncropped image at the suite's size; {} for SD."""
    import jax.numpy as jnp

    from ella_jax.sampling import sdxl_time_ids

    width = pooled_width(shapes["unet"])
    if width is None:
        return {}
    size = shapes["resolution"]
    return dict(
        added_text_embeds=_normal((batch, width), jnp.bfloat16, seed=8),
        added_time_ids=jnp.asarray(sdxl_time_ids(size, size, batch)),
    )


def _models(shapes: dict, remat: bool = False):
    import jax.numpy as jnp

    from ella_jax.models.ella import ELLA
    from ella_jax.models.unet import UNet2DConditionModel, UNetConfig

    unet = UNet2DConditionModel(
        UNetConfig.from_dict(shapes["unet"]), remat=remat, dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )  # fmt: skip
    ella = ELLA(**shapes["ella"], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    latent = shapes["resolution"] // 8
    unet_params = _random_params(
        unet,
        jnp.zeros((1, latent, latent, 4)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, ella.width)),
        **_added_conditions(shapes, 1),
        seed=1,
    )
    ella_params = _random_params(ella, jnp.zeros((1, 1, ella.input_dim)), jnp.zeros((1,)), seed=2)
    return unet, ella, unet_params, ella_params


def _device_info(jax) -> dict:
    from ella_jax.flops import peak_flops_per_second

    device = jax.devices()[0]
    peak = peak_flops_per_second(device, "bfloat16")
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "jax": jax.__version__,
        "peak_tflops": None if peak is None else peak / 1e12,
    }


def _footprint(compiled) -> int:
    """Bytes the compiled function holds at its peak, by XLA's buffer assignment."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _memory(jax) -> tuple[int | None, int | None]:
    """(bytes limit, peak bytes in use) of the device, None where the backend keeps no stats."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def jax_train_step(shapes: dict, remat: str, steps: int, compile_only: bool = False) -> dict:
    jax = _jax_setup()
    import jax.numpy as jnp

    from ella_jax.flops import model_flops, peak_flops_per_second, utilisation
    from ella_jax.schedulers import SchedulerConfig, alphas_cumprod
    from ella_jax.train.step import (
        Models,
        StepConfig,
        ella_conditioner,
        init_state,
        make_optimizer,
        make_train_step,
    )

    unet, ella, unet_params, ella_params = _models(shapes, remat == "blocks")
    optimizer, _ = make_optimizer(1e-4, 0, 10**6, "constant", 0.01, 1.0)
    acp = jnp.asarray(alphas_cumprod(SchedulerConfig.from_dict(shapes["scheduler"])))
    step_config = StepConfig("epsilon", shapes["scaling_factor"], 0.0, 0.9999, 0.0, False)
    models = Models(None, None, unet, ella)
    sdxl = pooled_width(shapes["unet"]) is not None
    conditioner = ella_conditioner(models, step_config.mask_padding, sdxl)
    train_step = make_train_step(models, optimizer, acp, step_config, conditioner)

    @jax.jit
    def new_state(params):  # buffers of its own: the step donates them, a retry needs params
        return jax.tree.map(jnp.copy, init_state(params, optimizer, 0))

    state = jax.eval_shape(new_state, ella_params)
    frozen = {"unet": unet_params}
    latent, tokens = shapes["resolution"] // 8, shapes["tokens"]

    def batch(size: int, abstract: bool = False) -> dict:
        shapes_dtypes = {
            "latent_mean": ((size, latent, latent, 4), jnp.bfloat16),
            "latent_logvar": ((size, latent, latent, 4), jnp.bfloat16),
            "t5_features": ((size, tokens, ella.input_dim), jnp.float16),
            "token_mask": ((size, tokens), jnp.bool_),
            "valid": ((size,), jnp.bool_),
        }
        if sdxl:  # precomputed, as train.precompute writes them
            pooled = pooled_width(shapes["unet"])
            shapes_dtypes.update(
                pooled=((size, pooled), jnp.float16), time_ids=((size, 6), jnp.float32)
            )
        if abstract:
            return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes_dtypes.items()}
        made = {k: _normal(s, d, seed=3) for k, (s, d) in shapes_dtypes.items()}
        made.update(token_mask=jnp.ones((size, tokens), bool), valid=jnp.ones((size,), bool))
        if sdxl:
            made["time_ids"] = _added_conditions(shapes, size)["added_time_ids"]
        return made

    step = jax.jit(train_step, donate_argnums=0)

    def compile_for(size: int):
        return step.lower(state, frozen, batch(size, abstract=True)).compile()

    candidates = sorted(shapes["train_batches"])
    if compile_only:  # XLA's buffer assignment for each batch: memory without a device
        footprints = {size: _footprint(compile_for(size)) for size in candidates}
        first, last = candidates[0], candidates[-1]
        return {
            "remat": remat,
            "compiled_bytes": footprints,
            "bytes_per_sample": (footprints[last] - footprints[first]) / max(last - first, 1),
            "device": _device_info(jax),
        }

    def timed(size: int) -> tuple[float, Any, dict]:
        """(seconds a step after two warm-up steps, the compiled step, the last metrics)."""
        compiled, state, inputs = compile_for(size), new_state(ella_params), batch(size)
        for _ in range(2):
            state, metrics = compiled(state, frozen, inputs)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, frozen, inputs)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps, compiled, metrics

    # The largest batch that fits: predicted from the smallest one's buffers, then checked.
    limit, _ = _memory(jax)
    if limit is None:
        fitting = candidates
    else:
        probe = compile_for(candidates[0])
        per_sample = probe.memory_analysis().temp_size_in_bytes / candidates[0]
        fixed = _footprint(probe) - per_sample * candidates[0]
        fitting = [b for b in candidates if fixed + per_sample * b <= 0.92 * limit]
        fitting = fitting or candidates[:1]
    size, (seconds, compiled, metrics) = _largest_that_runs(fitting, timed)
    plain = Models(None, None, unet.clone(remat=False), ella)
    modelled = make_train_step(plain, optimizer, acp, step_config,
                               ella_conditioner(plain, step_config.mask_padding, sdxl))  # fmt: skip
    flops = model_flops(modelled, state, frozen, batch(size, abstract=True))
    peak = peak_flops_per_second(jax.devices()[0], "bfloat16")
    _, peak_in_use = _memory(jax)
    return {
        "batch": size,
        "remat": remat,
        "samples_per_s": size / seconds,
        "step_seconds": seconds,
        "flops": flops,
        "mfu": utilisation(flops, seconds, 1, peak)["mfu"],
        "peak_bytes": peak_in_use if peak_in_use is not None else _footprint(compiled),
        "compiled_bytes": _footprint(compiled),
        "loss": float(metrics["loss"]),
        "device": _device_info(jax),
    }


def _largest_that_runs(sizes: list[int], run: Callable[[int], Any]) -> tuple[int, Any]:
    """(size, run(size)) for the largest of `sizes` whose run does not run out of memory."""
    for size in sorted(sizes, reverse=True):
        try:
            return size, run(size)
        except Exception as e:
            if not _out_of_memory(e) or size == min(sizes):
                raise
            print(f"batch {size} does not fit: {str(e).splitlines()[0]}", file=sys.stderr)
    raise ValueError("no batch size to try")


def _median_seconds(function: Callable[..., Any], *args: Any, repeats: int) -> float:
    import jax

    return median_seconds(lambda: jax.block_until_ready(function(*args)), repeats)


def jax_inference(shapes: dict) -> dict:
    """The sampler at each of shapes["sample_batches"], then the connector: their rows."""
    jax = _jax_setup()
    import jax.numpy as jnp

    from ella_jax.sampling import TextConditioning, sample_latents
    from ella_jax.schedulers import SchedulerConfig, initial_latents, make_schedule

    unet, ella, unet_params, ella_params = _models(shapes)
    schedule = make_schedule(SchedulerConfig.from_dict(shapes["scheduler"]), shapes["sample_steps"])
    latent, tokens = shapes["resolution"] // 8, shapes["tokens"]
    params = {"unet": unet_params, "ella": ella_params}

    @jax.jit
    def sample(params, latents, cond, uncond):
        return sample_latents(unet, ella, params, schedule, "epsilon", latents, cond, uncond, 7.5)

    rows = {}
    for name, batch in zip(SAMPLER_ROWS, shapes["sample_batches"], strict=True):
        mask = jnp.ones((batch, tokens), bool)
        features = (batch, tokens, ella.input_dim)
        added = _added_conditions(shapes, batch)
        pooled, time_ids = added.get("added_text_embeds"), added.get("added_time_ids")
        cond, uncond = (
            TextConditioning(_normal(features, jnp.float16, seed), mask, None, pooled, time_ids)
            for seed in (4, 5)
        )
        latents = initial_latents(schedule, _normal((batch, latent, latent, 4), jnp.float32, 6))
        seconds = _median_seconds(sample, params, latents, cond, uncond, repeats=2)
        rows[name] = {
            "batch": batch,
            "steps": shapes["sample_steps"],
            "seconds_per_image": seconds / batch,
        }

    features = _normal((2, tokens, ella.input_dim), jnp.float16, seed=7)
    timesteps = jnp.array([999.0, 250.0])
    forward = jax.jit(lambda p, f, t: ella.apply({"params": p}, f, t))
    seconds = _median_seconds(forward, ella_params, features, timesteps, repeats=50)
    rows["connector"] = {"batch": 2, "tokens": tokens, "seconds": seconds}
    return {**rows, "device": _device_info(jax)}


def run_part(args: argparse.Namespace, shapes: dict) -> dict:
    """One process's part of the suite (--part)."""
    if args.part == "train_step":
        return jax_train_step(shapes, args.remat, args.steps, args.compile_only)
    if args.part == "inference":
        return jax_inference(shapes)
    from bench.device_suite_torch import torch_rows

    return torch_rows(shapes, json.loads(args.torch_batches), args.steps, args.jax_platform)


# ----------------------------------------------------------------------------------------------
# The suite: each part in a child process, then the table and the JSON.


def _child(args: argparse.Namespace, part: str, *extra: str) -> dict:
    """Runs one part in a fresh process: its result, or {"error": ...}."""
    command = [sys.executable, "-m", "bench.device_suite", "--part", part, *extra]
    command += ["--model", args.model, "--steps", str(args.steps)]
    command += ["--small"] * args.small + ["--compile-only"] * args.compile_only
    if args.batches:
        command += ["--batches", ",".join(map(str, args.batches))]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # JAX: most of the GPU, not 75%
    print(f"running {part} {' '.join(extra)} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=args.part_timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.part_timeout} s"}
    results = [line[len(RESULT) :] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not results:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  failed: {tail}", file=sys.stderr)
        return {"error": tail[-500:]}
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return json.loads(results[-1])


def _torch_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("torch", "diffusers"))


def run_suite(args: argparse.Namespace) -> dict:
    """The JAX processes (one per train row, one for the inference rows), then one PyTorch
    process for every row at the batches JAX chose."""
    size = "small" if args.small else f"{SUITES[args.model][0]['resolution']}px"
    results: dict[str, Any] = {"shapes": f"{args.model}-{size}"}
    devices = []
    for name, remat in TRAIN_ROWS.items():
        results[name] = _child(args, "train_step", "--remat", remat)
        devices.append(results[name].pop("device", None))
    if not args.compile_only:
        inference = _child(args, "inference")
        devices.append(inference.pop("device", None))
        for name in (*SAMPLER_ROWS, "connector"):
            results[name] = dict(inference.get(name, inference))
    results["device"] = next((device for device in devices if device), None)
    rows = [name for name in ROWS if name in results]
    if args.compile_only or args.no_torch or not _torch_available():
        for name in rows:
            results[name]["torch"] = {"skipped": "no PyTorch row (--no-torch, --compile-only, "
                                      "or torch / diffusers not importable)"}  # fmt: skip
        return results
    batches = {name: results[name].get("batch") for name in TRAIN_ROWS}
    platform = (results["device"] or {}).get("platform", "")
    torch_results = _child(
        args, "torch", "--torch-batches", json.dumps(batches), "--jax-platform", platform
    )
    results["torch_device"] = torch_results.pop("device", None)
    for name in rows:
        results[name]["torch"] = dict(torch_results.get(name, torch_results))
    return results


def _speedup(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    if not ours or not theirs:
        return ""
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}x"


def table(results: dict) -> str:
    """The results as a markdown table: JAX, PyTorch + diffusers, and JAX's speed-up."""
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "?"  # noqa: E731

    def describe(row: dict, part: str) -> tuple[str, float | None, bool]:
        if "error" in row or "skipped" in row:
            return row.get("error") or row["skipped"], None, True
        if part == "train_step" and "samples_per_s" not in row:  # --compile-only
            sizes = ", ".join(f"batch {b}: {gib(v)}" for b, v in row["compiled_bytes"].items())
            return f"compiled {sizes}; {gib(row['bytes_per_sample'])} a sample", None, True
        if part == "train_step":
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
            peak = f", peak {gib(row.get('peak_bytes'))}" if row.get("peak_bytes") else ""
            text = f"{row['samples_per_s']:.2f} samples/s, {row['step_seconds']:.3f} s/step{mfu}"
            return text + peak, row["samples_per_s"], True
        if part == "sampler":
            return f"{row['seconds_per_image']:.3f} s/image", row["seconds_per_image"], False
        return f"{1e3 * row['seconds']:.2f} ms", row["seconds"], False

    device, torch_device = results.get("device") or {}, results.get("torch_device") or {}
    lines = [
        f"JAX on {device.get('kind', '?')} ({device.get('platform', '?')}, jax "
        f"{device.get('jax', '?')}); PyTorch on {torch_device.get('kind', '-')} (torch "
        f"{torch_device.get('torch', '-')}); shapes {results['shapes']}",
        "",
        "| row | JAX | PyTorch + diffusers | JAX speed-up |",
        "| --- | --- | --- | ---: |",
    ]
    for name in ROWS:
        row = results.get(name)
        if row is None:
            continue
        part = "train_step" if name.startswith("train") else name.split("_")[0]
        ours, our_value, higher = describe(row, part)
        theirs, their_value, _ = describe(row.get("torch", {"skipped": "-"}), part)
        setting = {
            "train_step": f"remat {row.get('remat', '?')}, batch {row.get('batch', '?')}",
            "sampler": f"{row.get('steps', '?')} steps, batch {row.get('batch', '?')}",
            "connector": f"batch {row.get('batch', '?')}, {row.get('tokens', '?')} tokens",
        }[part]
        speedup = _speedup(our_value, their_value, higher)
        lines.append(f"| {part} ({setting}) | {ours} | {theirs} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.device_suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument(
        "--model",
        choices=tuple(SUITES),
        default="sd15",
        help="SD 1.5 at 512 px with the released ELLA, or SDXL at 1024 px with ELLA at width "
        "2048 (default %(default)s)",
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU, a test)")
    parser.add_argument("--no-torch", action="store_true", help="leave out PyTorch + diffusers")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="train-step rows only, compiled at each batch size and not run: XLA's memory "
        "footprint per batch (any backend, no accelerator needed)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per row")
    parser.add_argument(
        "--batches",
        type=lambda text: tuple(int(b) for b in text.split(",")),
        default=None,
        help="train batch sizes to try, comma-separated (default 8,16,32,64; SDXL 4,8,16,32; "
        "--small 2,4)",
    )
    parser.add_argument(
        "--part-timeout", type=int, default=600, help="seconds before a part is stopped"
    )
    # One process's part of the suite (run_suite starts them).
    parser.add_argument("--part", choices=("train_step", "inference", "torch"), help=SUPPRESS)
    parser.add_argument("--remat", default="none", help=SUPPRESS)
    parser.add_argument("--torch-batches", default="{}", help=SUPPRESS)
    parser.add_argument("--jax-platform", default="", help=SUPPRESS)
    args = parser.parse_args(argv)
    shapes = dict(SUITES[args.model][args.small])
    shapes["train_batches"] = args.batches or shapes["train_batches"]
    args.steps = args.steps or shapes["train_steps"]

    if args.part:
        result = run_part(args, shapes)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    results = run_suite(args)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
