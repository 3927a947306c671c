"""ELLA checkpoints: the official PyTorch layout and the converted JAX directory.

A converted directory holds `config.json` (the official constructor's arguments, heads included)
and `params.safetensors` (the Flax tree, paths joined by '/', in the source's dtypes).
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.typing import DTypeLike

from ella_jax.models.ella import ELLA
from ella_jax.weights.naming import check_tensors, params_from_torch, params_to_torch
from ella_jax.weights.tensors import (
    CheckpointError,
    atomic_path,
    read_json,
    read_safetensors,
    write_safetensors,
)

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
DEFAULT_HEADS = 8
# The official ELLA constructor's arguments, in its order.
CONFIG_KEYS = (
    "time_channel",
    "time_embed_dim",
    "width",
    "layers",
    "heads",
    "num_latents",
    "input_dim",
)


def _shape(tensors: dict[str, np.ndarray], name: str, ndim: int, source: str) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"{source}: missing tensor {name!r}")
    shape = tensors[name].shape
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {shape}, expected {ndim} dims")
    return shape


def config_from_tensors(tensors: dict[str, np.ndarray], heads: int, source: str) -> dict[str, int]:
    """The ELLA constructor's arguments, read from an official state dict's shapes."""
    time_embed_dim, time_channel = _shape(tensors, "time_embedding.linear_1.weight", 2, source)
    num_latents, width = _shape(tensors, "connector.latents", 2, source)
    _, input_dim = _shape(tensors, "connector.proj_in.weight", 2, source)
    block = re.compile(r"connector\.perceiver_blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for name in tensors if (m := block.match(name))}
    config = dict(
        time_channel=time_channel,
        time_embed_dim=time_embed_dim,
        width=width,
        layers=max(blocks, default=-1) + 1,
        heads=heads,
        num_latents=num_latents,
        input_dim=input_dim,
    )
    check_config(config, source)
    return config


def check_config(config: dict[str, Any], source: str) -> None:
    """Raises a CheckpointError naming the first field of `config` ELLA cannot be built with."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = [k for k in CONFIG_KEYS if k not in config]
    if unknown or missing:
        raise CheckpointError(f"{source}: config fields missing {missing}, unknown {unknown}")
    for key in CONFIG_KEYS:
        if not isinstance(config[key], int) or config[key] <= 0:
            raise CheckpointError(f"{source}: {key}={config[key]!r} must be a positive integer")
    if config["width"] % config["heads"]:
        raise CheckpointError(
            f"{source}: heads={config['heads']} does not divide width={config['width']}"
        )


def abstract_params(model: ELLA) -> Any:
    """The model's parameter tree as ShapeDtypeStructs, without computing anything."""
    features = jax.ShapeDtypeStruct((1, 1, model.input_dim), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), features, timesteps)["params"]


def read_official(path: str | os.PathLike, heads: int = DEFAULT_HEADS) -> tuple[dict, dict]:
    """(config, params) from an official-layout ELLA .safetensors file."""
    source = str(path)
    tensors = read_safetensors(path)
    config = config_from_tensors(tensors, heads, source)
    return config, params_from_torch(tensors, abstract_params(ELLA(**config)), source)


def write_official(
    path: str | os.PathLike, params: Any, dtype: DTypeLike | None = None, overwrite: bool = False
) -> None:
    """Writes params as an official-layout ELLA .safetensors (whole or not at all), in `dtype`
    (default: the params' own)."""
    tensors = params_to_torch(jax.device_get(params))
    if dtype is not None:
        tensors = {name: t.astype(dtype) for name, t in tensors.items()}
    with atomic_path(path, overwrite=overwrite) as staging:
        write_safetensors(tensors, staging)


def write_official_config(path: str | os.PathLike, config: dict[str, int]) -> None:
    """The official constructor's arguments as JSON (`ella_config.json`)."""
    Path(path).write_text(json.dumps({k: config[k] for k in CONFIG_KEYS}, indent=2) + "\n")


def write_converted(directory: str | os.PathLike, config: dict[str, int], params: Any) -> None:
    """Writes a converted directory (into an existing empty or new folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    write_safetensors({k: np.asarray(v) for k, v in flat.items()}, directory / PARAMS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({k: config[k] for k in CONFIG_KEYS}, indent=2))


def read_converted(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config, params) from a converted directory, checked against the model's tree."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    check_config(config, str(directory / CONFIG_FILE))
    flat = read_safetensors(directory / PARAMS_FILE)
    expected = traverse_util.flatten_dict(abstract_params(ELLA(**config)), sep="/")
    shapes = {name: leaf.shape for name, leaf in expected.items()}
    check_tensors(flat, shapes, str(directory / PARAMS_FILE))
    return config, traverse_util.unflatten_dict(flat, sep="/")


def read_ella(path: str | os.PathLike, heads: int | None = None) -> tuple[dict, dict]:
    """(config, params) from an official .safetensors file or a converted directory.

    `heads` defaults to 8 for a .safetensors file and to the stored value for a directory;
    given explicitly, it overrides both.
    """
    path = Path(path)
    if path.is_dir():
        config, params = read_converted(path)
        if heads is not None:
            config = {**config, "heads": heads}
            check_config(config, str(path))
        return config, params
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return read_official(path, DEFAULT_HEADS if heads is None else heads)


def load_ella(
    path: str | os.PathLike,
    heads: int | None = None,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike | None = None,
) -> tuple[ELLA, dict]:
    """(model, params) from an official .safetensors file or a converted directory.

    Every size but `heads` is read from the tensor shapes (see `read_ella` for `heads`). `dtype` is
    the compute dtype; params keep the checkpoint's dtype unless `param_dtype` is given.
    Use: `model.apply({"params": params}, t5_features, timesteps, token_mask)`.
    """
    config, params = read_ella(path, heads)
    if param_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    stored_dtype = jax.tree.leaves(params)[0].dtype
    model = ELLA(**config, dtype=dtype, param_dtype=param_dtype or stored_dtype)
    return model, jax.tree.map(jnp.asarray, params)
