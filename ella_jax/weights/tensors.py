"""Reading and writing safetensors files (local or in a bucket) with errors that name the file."""

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from ella_jax import storage
from ella_jax.weights import shapes_only

MAX_HEADER_BYTES = 100_000_000  # as the safetensors library allows


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_safetensors(
    path: str | os.PathLike, keep: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (those whose name `keep` accepts), as numpy arrays in
    their stored dtypes."""
    path = storage.path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if storage.is_remote(path):  # read whole: safe_open maps local files only
            tensors = safetensors.numpy.load(path.read_bytes())
            return {name: t for name, t in tensors.items() if keep is None or keep(name)}
        with safetensors.safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys() if keep is None or keep(name)}  # noqa: SIM118
    except Exception as e:  # the library raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file's header ({} when it has none)."""
    path = storage.path(path)
    try:
        if not storage.is_remote(path):
            with safetensors.safe_open(path, framework="numpy") as f:
                return dict(f.metadata() or {})
        with path.open("rb") as file:  # the header alone: an 8-byte little-endian size, JSON
            size = int.from_bytes(file.read(8), "little")
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size} bytes")
            return dict(json.loads(file.read(size)).get("__metadata__") or {})
    except Exception as e:  # the library raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_weights_folder(
    folder: str | os.PathLike, stem: str, keep: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """The tensors of `folder/stem.safetensors`, or of the shards listed in
    `folder/stem.safetensors.index.json` (as Hugging Face and diffusers save large models);
    none inside `shapes_only()`."""
    if shapes_only.active():
        return {}
    folder = storage.path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single, keep)
    if not index.is_file():
        raise CheckpointError(f"{folder}: neither {single.name} nor {index.name} is there")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_safetensors(folder / shard, keep))
    return tensors


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a missing or malformed file is a CheckpointError."""
    path = storage.path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_config(path: str | os.PathLike, parse: Callable[[dict], Any]) -> Any:
    """`parse(the JSON object in path)`; its ValueError (a field the port does not implement)
    becomes a CheckpointError naming the file."""
    try:
        return parse(read_json(path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def write_safetensors(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Writes tensors to `path`; wrap in `atomic_path` for an all-or-nothing write."""
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
    storage.give_umask_modes(path)  # safetensors writes 0600
