"""ELLA checkpoints: the official PyTorch layout and the converted JAX directory.

A converted directory (`ella_jax.weights.converted`) holds `config.json` (the official
constructor's arguments, heads included) and `params.safetensors`.

An official-layout file's tensors give every size but the number of attention heads. This
project's exports carry the whole config in the file's safetensors metadata (`ella_config`;
the official loader ignores metadata, so the file stays official) and training writes it beside
them too (`ella_config.json`): both are read and checked against the tensors. Only a file with
neither and the released model's shapes defaults to the released 8 heads.
"""

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.ella import ELLA
from ella_jax.storage import atomic_path
from ella_jax.weights import converted
from ella_jax.weights.naming import params_from_torch, params_to_torch
from ella_jax.weights.tensors import (
    CheckpointError,
    read_json,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)

SIDECAR_FILE = "ella_config.json"  # beside a checkpoint (train.main writes it)
METADATA_KEY = "ella_config"  # the same JSON in an exported file's safetensors metadata
DEFAULT_HEADS = 8  # the released ella-sd1.5-tsc-t5xl's, stored in no file
RELEASED_SIZES = dict(
    time_channel=320, time_embed_dim=768, width=768, layers=6, num_latents=64, input_dim=2048
)
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


def sizes_from_tensors(tensors: dict[str, np.ndarray], source: str) -> dict[str, int]:
    """The ELLA constructor's arguments but `heads`, read from an official state dict's shapes."""
    time_embed_dim, time_channel = _shape(tensors, "time_embedding.linear_1.weight", 2, source)
    num_latents, width = _shape(tensors, "connector.latents", 2, source)
    _, input_dim = _shape(tensors, "connector.proj_in.weight", 2, source)
    block = re.compile(r"connector\.perceiver_blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for name in tensors if (m := block.match(name))}
    return dict(
        time_channel=time_channel,
        time_embed_dim=time_embed_dim,
        width=width,
        layers=max(blocks, default=-1) + 1,
        num_latents=num_latents,
        input_dim=input_dim,
    )


def _stored_configs(path: epath.Path) -> list[tuple[str, dict]]:
    """(where, config) for each config stored with an official file: its metadata's, and a
    sibling ella_config.json's."""
    stored = []
    metadata = read_safetensors_metadata(path)
    if METADATA_KEY in metadata:
        where = f"{path} (metadata {METADATA_KEY!r})"
        try:
            config = json.loads(metadata[METADATA_KEY])
        except ValueError as e:
            raise CheckpointError(f"{where}: not JSON ({e})") from None
        stored.append((where, config))
    sidecar = path.parent / SIDECAR_FILE
    if sidecar.is_file():
        stored.append((str(sidecar), read_json(sidecar)))
    return stored


def heads_of(path: epath.Path, sizes: dict[str, int], heads: int | None) -> int:
    """The attention heads of the official file at `path` with tensor `sizes`: the stored
    config's (checked against the sizes and against `heads`, when given), else `heads`, else 8
    for the released shapes. Anything else is a CheckpointError that says what to do."""
    stored = _stored_configs(path)
    for where, config in stored:
        check_config(config, where)
        for key, value in sizes.items():
            if config[key] != value:
                raise CheckpointError(
                    f"{where}: {key}={config[key]}, but the tensors of {path} have {key}={value}"
                )
    if len({config["heads"] for _, config in stored}) > 1:
        (first, a), (second, b) = stored
        raise CheckpointError(f"{first} says heads={a['heads']}, {second} heads={b['heads']}")
    if stored:
        where, config = stored[0]
        if heads is not None and heads != config["heads"]:
            raise CheckpointError(
                f"{path}: heads={heads} was asked for, but {where} says heads={config['heads']}"
            )
        return config["heads"]
    if heads is not None:
        return heads
    if sizes == RELEASED_SIZES:
        return DEFAULT_HEADS
    raise CheckpointError(
        f"{path}: its number of attention heads is stored neither in its metadata nor in an "
        f"{SIDECAR_FILE} beside it, and its shapes are not the released model's: pass the heads "
        "(heads=, --ella-heads, --heads)"
    )


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


def read_official(path: str | os.PathLike, heads: int | None = None) -> tuple[dict, dict]:
    """(config, params) from an official-layout ELLA .safetensors file (heads: `heads_of`)."""
    path = storage.path(path)
    tensors = read_safetensors(path)
    sizes = sizes_from_tensors(tensors, str(path))
    config = {**sizes, "heads": heads_of(path, sizes, heads)}
    check_config(config, str(path))
    return config, params_from_torch(tensors, abstract_params(ELLA(**config)), str(path))


def write_official(
    path: str | os.PathLike,
    params: Any,
    dtype: DTypeLike | None = None,
    overwrite: bool = False,
    config: dict[str, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes params as an official-layout ELLA .safetensors (whole or not at all), in `dtype`
    (default: the params' own), with `config` (the constructor's arguments) and `metadata`
    (e.g. a run's `trained_run.export_metadata`) in its metadata."""
    tensors = params_to_torch(jax.device_get(params))
    if dtype is not None:
        tensors = {name: t.astype(dtype) for name, t in tensors.items()}
    metadata = dict(metadata or {})
    if config is not None:
        check_config(config, str(path))
        metadata[METADATA_KEY] = json.dumps({k: config[k] for k in CONFIG_KEYS})
    with atomic_path(path, overwrite=overwrite) as staging:
        write_safetensors(tensors, staging, metadata or None)


def write_official_config(path: str | os.PathLike, config: dict[str, int]) -> None:
    """The official constructor's arguments as JSON (`ella_config.json`)."""
    storage.path(path).write_text(json.dumps({k: config[k] for k in CONFIG_KEYS}, indent=2) + "\n")


def write_converted(
    directory: str | os.PathLike,
    config: dict[str, int],
    params: Any,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a converted ELLA directory (into an existing empty or new folder), `metadata` in
    its params file (a run's settings, `trained_run.TrainedWith.metadata`)."""
    converted.write_converted(directory, {k: config[k] for k in CONFIG_KEYS}, params, metadata)


def read_converted(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config, params) from a converted directory, checked against the model's tree."""
    return converted.read_converted(
        directory, check_config, lambda config, _: abstract_params(ELLA(**config))
    )


def read_ella(path: str | os.PathLike, heads: int | None = None) -> tuple[dict, dict]:
    """(config, params) from an official .safetensors file or a converted directory.

    The heads are the stored ones (a directory's config.json; a file's metadata or the
    ella_config.json beside it, see `heads_of`); `heads` given and different is an error.
    """
    path = storage.path(path)
    if path.is_dir():
        config, params = read_converted(path)
        if heads is not None and heads != config["heads"]:
            raise CheckpointError(
                f"{path}: heads={heads} was asked for, but {path / converted.CONFIG_FILE} says "
                f"heads={config['heads']}"
            )
        return config, params
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return read_official(path, heads)


def load_ella(
    path: str | os.PathLike,
    heads: int | None = None,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike | None = None,
) -> tuple[ELLA, dict]:
    """(model, params) from an official .safetensors file or a converted directory.

    Every size but `heads` is read from the tensor shapes; `heads` from what is stored with the
    checkpoint (see `read_ella`; `heads=` is needed only where nothing is). `dtype` is
    the compute dtype; params keep the checkpoint's dtype unless `param_dtype` is given.
    Use: `model.apply({"params": params}, t5_features, timesteps, token_mask)`.
    """
    config, params = read_ella(path, heads)
    if param_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    stored_dtype = jax.tree.leaves(params)[0].dtype
    model = ELLA(**config, dtype=dtype, param_dtype=param_dtype or stored_dtype)
    return model, jax.tree.map(jnp.asarray, params)
