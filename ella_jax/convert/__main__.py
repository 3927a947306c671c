"""python -m convert: move ELLA and SUR-adapter checkpoints between the official PyTorch layouts
and JAX."""

import argparse
import sys
import time

import numpy as np
from flax import traverse_util

from ella_jax import storage
from ella_jax.cli import error_exit
from ella_jax.models.ella import ELLA
from ella_jax.storage import atomic_path
from ella_jax.weights import sur
from ella_jax.weights.ella import (
    abstract_params,
    check_config,
    load_ella,
    read_ella,
    write_converted,
    write_official,
)
from ella_jax.weights.naming import check_tensors, params_from_torch
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.trained_run import (
    RUN_CONFIG_FILE,
    checkpoint_in,
    export_metadata,
    run_config,
    trained_with,
)

DESCRIPTION = """\
Convert ELLA connector and SUR-adapter checkpoints between the official PyTorch layouts and
ella-jax.

  to-jax    official .safetensors (e.g. ella-sd1.5-tsc-t5xl.safetensors, float16 or float32)
            -> a directory with config.json and params.safetensors, read by
            ella_jax.load_ella(DIR). Dtypes are kept.
  to-torch  a converted directory -> the official layout: the same tensor names, shapes and
            dtypes, so to-jax then to-torch gives back the original tensors bit for bit.
  export    a training run's checkpoint (WORKDIR from `python -m train.main`) -> the official
            layout, like the ella.safetensors (or, for a SUR-adapter run, the
            sur_adapter.safetensors + sur_config.json) the run writes at its end.
  info      print a checkpoint's config and parameter count and run one forward pass on it.

SUR-adapter (its official state dict as .safetensors, with sur_config.json beside it: the
official constructor's arguments depth, adapter_weight, sd_text_size):
  sur-to-jax    official .safetensors -> a directory read by ella_jax.load_sur_adapter(DIR).
  sur-to-torch  a converted directory -> the official .safetensors + sur_config.json (+ the
                learned eta head's eta_head.safetensors), bit for bit what sur-to-jax read.
  sur-from-pt   the official .pt state dict (torch.save) -> .safetensors + sur_config.json;
                needs torch (pip install torch), used for reading the pickle only.

Paths may be local, gs:// or s3:// URIs. Outputs are written whole or not at all. Errors print
one line and exit with status 2.
"""


HEADS_HELP = (
    "attention heads, for an official file that stores none (this project's exports carry them "
    "in their metadata and beside them in ella_config.json; 8 for the released shapes); one "
    "that contradicts the stored value is an error"
)


def _run_metadata(checkpoint) -> dict[str, str] | None:
    """The settings of the run that trained `checkpoint`, to be carried into its conversion."""
    trained = trained_with(checkpoint)
    return None if trained is None else trained.metadata()


def _to_jax(args: argparse.Namespace) -> str:
    source = checkpoint_in(args.src)
    config, params = read_ella(source, heads=args.heads)
    with atomic_path(args.dst, overwrite=args.overwrite) as staging:
        write_converted(staging, config, params, _run_metadata(source))
    return f"wrote {args.dst} ({config})"


def _to_torch(args: argparse.Namespace) -> str:
    source = checkpoint_in(args.src)
    config, params = read_ella(source)
    write_official(args.dst, params, None, args.overwrite, config, _run_metadata(source))
    return f"wrote {args.dst} ({config})"


def _trained_params(args: argparse.Namespace, workdir, abstract) -> dict:
    """The run's saved params (args.step, args.weights), checked against `abstract(params)`,
    the model's tree of ShapeDtypeStructs."""
    from ella_jax.train.checkpoint import read_trained_params

    params = read_trained_params(workdir / "checkpoints", args.step, ema=args.weights == "ema")
    expected = traverse_util.flatten_dict(abstract(params), sep="/")
    found = traverse_util.flatten_dict(params, sep="/")
    check_tensors(found, {k: v.shape for k, v in expected.items()}, str(workdir / "checkpoints"))
    return params


def _export(args: argparse.Namespace) -> str:
    workdir = storage.reachable(args.workdir)
    if run_config(workdir) is None:
        raise CheckpointError(
            f"{workdir}: not the work directory of a training run (it holds no run's "
            f"{RUN_CONFIG_FILE}): give the --workdir of `python -m train.main`"
        )
    if (workdir / sur.CONFIG_FILE).is_file():  # a SUR-adapter run (config.method="sur")
        return _export_sur(args, workdir)
    config = read_json(workdir / "ella_config.json")
    check_config(config, str(workdir / "ella_config.json"))
    params = _trained_params(args, workdir, lambda _: abstract_params(ELLA(**config)))
    metadata = export_metadata(run_config(workdir))
    write_official(args.dst, params, args.dtype, args.overwrite, config, metadata)
    return f"wrote {args.dst} ({args.weights} weights, {config})"


def _sur_to_jax(args: argparse.Namespace) -> str:
    config, params = sur.read_sur_adapter(checkpoint_in(args.src, "sur"))
    with atomic_path(args.dst, overwrite=args.overwrite) as staging:
        sur.write_converted(staging, config, params)
    return f"wrote {args.dst} ({config})"


def _sur_to_torch(args: argparse.Namespace) -> str:
    config, params = sur.read_sur_adapter(args.src)
    sur.write_official(args.dst, params, config, overwrite=args.overwrite)
    return f"wrote {args.dst} and {storage.path(args.dst).parent / sur.CONFIG_FILE} ({config})"


def _sur_from_pt(args: argparse.Namespace) -> str:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{args.src}: reading a .pt file needs torch, which is not installed (pip install "
            "torch; ella-jax itself never needs it)"
        ) from None
    try:
        state = torch.load(args.src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot unpickle
        raise CheckpointError(f"{args.src}: not a readable torch state dict ({e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise CheckpointError(f"{args.src}: not a state dict (a dict of tensors)")
    tensors = {name: t.detach().cpu().numpy() for name, t in state.items()}
    config = {**sur.sizes_from_tensors(tensors, args.src), "adapter_weight": args.adapter_weight}
    sur.check_config(config, args.src)
    expected = sur.abstract_params(sur.model_for(config))
    params = params_from_torch(tensors, expected, args.src)  # every official name, its shape
    sur.write_official(args.dst, params, config, overwrite=args.overwrite)
    return f"wrote {args.dst} and {storage.path(args.dst).parent / sur.CONFIG_FILE} ({config})"


def _export_sur(args: argparse.Namespace, workdir) -> str:
    config = read_json(workdir / sur.CONFIG_FILE)
    sur.check_config(config, str(workdir / sur.CONFIG_FILE))
    attend = run_config(workdir).get("sur", {}).get("attend")  # what the encoder attended over
    config = {**config, **({"attend": attend} if attend else {})}
    params = _trained_params(
        args,
        workdir,
        lambda found: sur.abstract_params(sur.model_for(config, learned_eta=sur.ETA_HEAD in found)),
    )
    sur.write_official(args.dst, params, config, args.dtype, overwrite=args.overwrite)
    return f"wrote {args.dst} ({args.weights} weights of a SUR-adapter, {config})"


def _info(args: argparse.Namespace) -> str:
    import jax
    import jax.numpy as jnp

    model, params = load_ella(checkpoint_in(args.path), heads=args.heads)
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
    to_jax.add_argument(
        "src", help="official-layout ELLA .safetensors file, or a training run's --workdir"
    )
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

    sur_to_jax = commands.add_parser(
        "sur-to-jax", help="official SUR-adapter .safetensors -> ella-jax directory"
    )
    sur_to_jax.add_argument(
        "src",
        help="official SUR-adapter .safetensors (sur_config.json beside), or a SUR run's --workdir",
    )
    sur_to_jax.add_argument("dst", help="directory to create")
    sur_to_jax.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    sur_to_jax.set_defaults(run=_sur_to_jax)

    sur_to_torch = commands.add_parser(
        "sur-to-torch", help="ella-jax SUR-adapter directory -> official .safetensors"
    )
    sur_to_torch.add_argument("src", help="directory written by sur-to-jax")
    sur_to_torch.add_argument("dst", help=".safetensors file to create (sur_config.json beside)")
    sur_to_torch.add_argument("--overwrite", action="store_true", help="replace what exists")
    sur_to_torch.set_defaults(run=_sur_to_torch)

    sur_from_pt = commands.add_parser(
        "sur-from-pt", help="official SUR-adapter .pt state dict -> .safetensors (needs torch)"
    )
    sur_from_pt.add_argument("src", help="the .pt file the official training saved")
    sur_from_pt.add_argument("dst", help=".safetensors file to create (sur_config.json beside)")
    sur_from_pt.add_argument(
        "--adapter-weight",
        type=float,
        default=0.1,
        help="eta, which the official code keeps in the checkpoint's path, not in the file "
        "(default 0.1, run.sh's)",
    )
    sur_from_pt.add_argument("--overwrite", action="store_true", help="replace what exists")
    sur_from_pt.set_defaults(run=_sur_from_pt)

    info = commands.add_parser("info", help="describe a checkpoint and run it once")
    info.add_argument(
        "path",
        help="official .safetensors file, converted directory, or a training run's --workdir",
    )
    info.add_argument("--heads", type=int, default=None, help=HEADS_HELP)
    info.add_argument("--batch", type=int, default=2, help="batch of the test forward pass")
    info.add_argument("--tokens", type=int, default=128, help="T5 tokens of the test forward")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.run(args))
    except (CheckpointError, OSError) as e:
        return error_exit(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
