"""python -m convert: move ELLA checkpoints between the official PyTorch layout and JAX."""

import argparse
import sys
import time

import numpy as np

from ella_jax.weights.ella import load_ella, read_ella, write_converted
from ella_jax.weights.naming import params_to_torch
from ella_jax.weights.tensors import CheckpointError, atomic_path, write_safetensors

DESCRIPTION = """\
Convert ELLA connector checkpoints between the official PyTorch layout and ella-jax.

  to-jax    official .safetensors (e.g. ella-sd1.5-tsc-t5xl.safetensors, float16 or float32)
            -> a directory with config.json and params.safetensors, read by
            ella_jax.load_ella(DIR). Dtypes are kept.
  to-torch  a converted directory -> the official layout: the same tensor names, shapes and
            dtypes, so to-jax then to-torch gives back the original tensors bit for bit.
  info      print a checkpoint's config and parameter count and run one forward pass on it.

Outputs are written whole or not at all. Errors print one line and exit with status 2.
"""


def _to_jax(args: argparse.Namespace) -> str:
    config, params = read_ella(args.src, heads=args.heads)
    with atomic_path(args.dst, overwrite=args.overwrite) as staging:
        write_converted(staging, config, params)
    return f"wrote {args.dst} ({config})"


def _to_torch(args: argparse.Namespace) -> str:
    config, params = read_ella(args.src)
    with atomic_path(args.dst, overwrite=args.overwrite) as staging:
        write_safetensors(params_to_torch(params), staging)
    return f"wrote {args.dst} ({config})"


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
    to_jax.add_argument(
        "--heads",
        type=int,
        default=8,
        help="attention heads (not stored in the official file; 8 for the released model)",
    )
    to_jax.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    to_jax.set_defaults(run=_to_jax)

    to_torch = commands.add_parser("to-torch", help="ella-jax directory -> official .safetensors")
    to_torch.add_argument("src", help="directory written by to-jax")
    to_torch.add_argument("dst", help=".safetensors file to create")
    to_torch.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    to_torch.set_defaults(run=_to_torch)

    info = commands.add_parser("info", help="describe a checkpoint and run it once")
    info.add_argument("path", help="official .safetensors file or converted directory")
    info.add_argument("--heads", type=int, default=None, help="override the heads (default 8)")
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
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
