"""A converted directory: `config.json` (the model's constructor arguments) and
`params.safetensors` (the Flax parameter tree, paths joined by '/', in the source's dtypes)."""

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import traverse_util

from ella_jax import storage
from ella_jax.weights.naming import check_tensors
from ella_jax.weights.tensors import read_json, read_safetensors, write_safetensors

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def write_converted(
    directory: str | os.PathLike,
    config: dict[str, Any],
    params: Any,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a converted directory (into an existing empty or new folder); `metadata`: the
    params file's safetensors metadata."""
    directory = storage.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    tensors = {k: np.asarray(v) for k, v in flat.items()}
    write_safetensors(tensors, directory / PARAMS_FILE, metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_converted(
    directory: str | os.PathLike,
    check_config: Callable[[dict, str], None],
    abstract_params: Callable[[dict, dict], Any],
) -> tuple[dict, dict]:
    """(config, params) from a converted directory: `check_config(config, source)` raises on a
    config the model cannot be built with; `abstract_params(config, flat tensors)` is the tree
    the tensors must match (names and shapes), else a CheckpointError."""
    directory = storage.path(directory)
    config = read_json(directory / CONFIG_FILE)
    check_config(config, str(directory / CONFIG_FILE))
    flat = read_safetensors(directory / PARAMS_FILE)
    expected = traverse_util.flatten_dict(abstract_params(config, flat), sep="/")
    shapes = {name: leaf.shape for name, leaf in expected.items()}
    check_tensors(flat, shapes, str(directory / PARAMS_FILE))
    return config, traverse_util.unflatten_dict(flat, sep="/")
