"""Building a Flax module's parameters from a PyTorch state dict, without running the module."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

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
    ShapeDtypeStructs), so nothing is computed; a mismatch is a CheckpointError naming `source`."""
    expected = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]
    params = params_from_torch(tensors, expected, source, ignore)
    return jax.tree.map(lambda p: jnp.asarray(p, dtype=param_dtype), params)
