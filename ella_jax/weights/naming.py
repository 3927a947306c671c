"""The one rule that maps PyTorch state-dict names and layouts to Flax parameter trees and back.

Flax modules here are named as the PyTorch modules are, list items included
(`perceiver_blocks.0`), so a parameter path maps to a PyTorch name by joining with dots and
renaming the leaf: `kernel`, `scale` and `embedding` are PyTorch's `weight`. Dense kernels are
stored transposed ((in, out) against PyTorch's (out, in)) and convolution kernels as HWIO against
OIHW; every other parameter keeps its PyTorch name and layout.
"""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ella_jax.weights.tensors import CheckpointError

Path = tuple[str, ...]
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_name(path: Path) -> str:
    """('connector', 'perceiver_blocks.0', 'mlp.c_fc', 'kernel') ->
    'connector.perceiver_blocks.0.mlp.c_fc.weight'."""
    *modules, leaf = path
    return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(path: Path, array: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax parameter at `path`."""
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return array


def to_torch_layout(path: Path, array: np.ndarray) -> np.ndarray:
    """The Flax parameter at `path` in PyTorch's layout (inverse of `to_flax_layout`)."""
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return array


def _torch_shape(path: Path, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_layout(path, np.empty(flax_shape, dtype=np.uint8)).shape


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Raises a CheckpointError naming the tensors that are missing, unexpected (and not
    ignored) or of another shape than `expected_shapes` says."""
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {_listing(missing)}")
    unexpected = sorted(n for n in set(tensors) - set(expected_shapes) if not ignore(n))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {_listing(unexpected)}")
    for name, want in expected_shapes.items():
        found = tuple(tensors[name].shape)
        if found != tuple(want):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {found}, the model expects {tuple(want)}"
            )


def params_from_torch(
    tensors: Mapping[str, np.ndarray],
    expected: Any,
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> dict:
    """Maps a PyTorch state dict onto the Flax tree `expected` (arrays or ShapeDtypeStructs).

    Every parameter must be present with its shape and every tensor used, but those for which
    `ignore(name)` holds (see `check_tensors`). dtypes are kept.
    """
    leaves = traverse_util.flatten_dict(expected)
    paths = {torch_name(path): path for path in leaves}
    shapes = {name: _torch_shape(path, leaves[path].shape) for name, path in paths.items()}
    check_tensors(tensors, shapes, source, ignore)
    flat = {path: to_flax_layout(path, tensors[name]) for name, path in paths.items()}
    return traverse_util.unflatten_dict(flat)


def params_to_torch(params: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree as a PyTorch state dict (names and layouts of the checkpoint)."""
    return {
        torch_name(path): to_torch_layout(path, np.asarray(leaf))
        for path, leaf in traverse_util.flatten_dict(params).items()
    }
