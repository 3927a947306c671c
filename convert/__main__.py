"""python -m convert: move ELLA checkpoints between the official PyTorch layout and JAX."""

import argparse
import sys
import time

import numpy as np
from flax import traverse_util

from ella_jax import storage
from ella_jax.models.ella import ELLA
from ella_jax.storage import atomic_path
from ella_jax.weights.ella import (
    abstract_params,
    check_config,
    load_ella,
    read_ella,
    write_converted,
    write_official,
)
from ella_jax.weights.naming import check_tensors
from ella_jax.weights.tensors import CheckpointError, read_json

DESCRIPTION = """\
Convert ELLA connector checkpoints between the official PyTorch layout and ella-jax.

  to-jax    official .safetensors (e.g. ella-sd1.5-tsc-t5xl.safetensors, float16 or float32)
            -> a directory with config.json and params.safetensors, read by
            ella_jax.load_ella(DIR). Dtypes are kept.
  to-torch  a converted directory -> the official layout: the same tensor names, shapes and
            dtypes, so to-jax then to-torch gives back the original tensors bit for bit.
  export    a training run's checkpoint (WORKDIR from `python -m train.main`) -> the official
            layout, like the ella.safetensors the run writes at its end.
  info      print a checkpoint's config and parameter count and run one forward pass on it.

Paths may be local, gs:// or s3:// URIs. Outputs are written whole or not at all. Errors print
one line and exit with status 2.
"""


HEADS_HELP = (
    "attention heads, for an official file that stores none (this project's exports carry them "
    "in their metadata and beside them in ella_config.json; 8 for the released shapes); one "
    "that contradicts the stored value is an error"
)


def _to_jax(args: argparse.Namespace) -> str:
    config, params = read_ella(args.src, heads=args.heads)
    with atomic_path(args.dst, overwrite=args.overwrite) as staging:
        write_converted(staging, config, params)
    return f"wrote {args.dst} ({config})"


def _to_torch(args: argparse.Namespace) -> str:
    config, params = read_ella(args.src)
    write_official(args.dst, params, overwrite=args.overwrite, config=config)
    return f"wrote {args.dst} ({config})"


def _export(args: argparse.Namespace) -> str:
    from train.checkpoint import read_trained_params

    workdir = storage.reachable(args.workdir)
    config = read_json(workdir / "ella_config.json")
    check_config(config, str(workdir / "ella_config.json"))
    params = read_trained_params(workdir / "checkpoints", args.step, ema=args.weights == "ema")
    expected = traverse_util.flatten_dict(abstract_params(ELLA(**config)), sep="/")
    found = traverse_util.flatten_dict(params, sep="/")
    check_tensors(found, {k: v.shape for k, v in expected.items()}, str(workdir / "checkpoints"))
    write_official(args.dst, params, args.dtype, overwrite=args.overwrite, config=config)
    return f"wrote {args.dst} ({args.weights} weights, {config})"


def _info(args: argparse.Namespace) -> str:
    import jax
    import jax.numpy as jnp

    model, params = load_ella(args.path, heads=args.heads)
    leaves = jax.tree.leaves(params)
    features = jnp.zeros((args.batch, args.tokens, model.input_dim), jnp.float32)
    forward = jax.jit(model.apply)
    start = time.perf_counter()
    out = forward({"params": params}, features, 999.0).block_until_ready()
    return (
        f"{args.path}: ELLA time_channel={model.time_channel} time_embed_dim="
        f"{model.time_embed_dim} width={model.width} layers={model.layers} heads={model.heads} "
        f"num_latents={model.num_latents} input_dim={model.input_dim}\n"
        f"{sum(p.size for p in leaves):,} parameters in {len(leaves)} tensors of "
        f"{sorted({str(p.dtype) for p in leaves})}\n"
        f"forward: features {features.shape} at timestep 999 -> {out.shape} {out.dtype}, "
        f"finite={bool(np.isfinite(np.asarray(out)).all())}, "
        f"{time.perf_counter() - start:.2f} s with compilation"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    to_jax = commands.add_parser("to-jax", help="official .safetensors -> ella-jax directory")
    to_jax.add_argument("src", help="official-layout ELLA .safetensors file")
    to_jax.add_argument("dst", help="directory to create")
    to_jax.add_argument("--heads", type=int, default=None, help=HEADS_HELP)
    to_jax.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    to_jax.set_defaults(run=_to_jax)

    to_torch = commands.add_parser("to-torch", help="ella-jax directory -> official .safetensors")
    to_torch.add_argument("src", help="directory written by to-jax")
    to_torch.add_argument("dst", help=".safetensors file to create")
    to_torch.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    to_torch.set_defaults(run=_to_torch)

    export = commands.add_parser("export", help="training checkpoint -> official .safetensors")
    export.add_argument("workdir", help="the --workdir of a training run")
    export.add_argument("dst", help=".safetensors file to create")
    export.add_argument("--step", type=int, default=None, help="saved step (default: newest)")
    export.add_argument(
        "--weights", choices=["ema", "params"], default="ema", help="EMA or raw weights"
    )
    export.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="tensor dtype (default: float32, as trained; the released file is float16)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    export.set_defaults(run=_export)

    info = commands.add_parser("info", help="describe a checkpoint and run it once")
    info.add_argument("path", help="official .safetensors file or converted directory")
    info.add_argument("--heads", type=int, default=None, help=HEADS_HELP)
    info.add_argument("--batch", type=int, default=2, help="batch of the test forward pass")
    info.add_argument("--tokens", type=int, default=128, help="T5 tokens of the test forward")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.run(args))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
