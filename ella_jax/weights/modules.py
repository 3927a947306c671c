"""Building a Flax module's parameters from a PyTorch state dict, without running the module."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.typing import DTypeLike

from ella_jax.weights import shapes_only
from ella_jax.weights.naming import params_from_torch


def params_for(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    tensors: dict[str, np.ndarray],
    source: str,
    param_dtype: DTypeLike,
    ignore: Callable[[str], bool] = lambda name: False,
) -> dict:
    """The module's parameter tree filled from `tensors` (PyTorch names and layouts), cast to
    `param_dtype`. Shapes come from `jax.eval_shape` on `example_inputs` (arrays or
    ShapeDtypeStructs), so nothing is computed; a mismatch is a CheckpointError naming `source`.
    `tensors` is emptied: each tensor is let go once converted, so a large checkpoint and its
    parameters are never both held whole. Inside `shapes_only()`: the tree's shapes, in
    `param_dtype`."""
    expected = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]
    if shapes_only.active():
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, param_dtype), expected)
    flat = traverse_util.flatten_dict(params_from_torch(tensors, expected, source, ignore))
    tensors.clear()
    converted = {path: None for path in flat}
    for path in converted:
        converted[path] = jnp.asarray(flat.pop(path), dtype=param_dtype)
    return traverse_util.unflatten_dict(converted)
