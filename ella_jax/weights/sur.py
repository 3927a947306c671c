"""SUR-adapter checkpoints: the official state dict and the converted JAX directory.

Official layout: the official `Adapter`'s state dict as a .safetensors file (every name, the
unused `encoder_layer.*` and `attention.value_layer.*` included) with `sur_config.json` beside
it: the official constructor's arguments (`depth`, `adapter_weight`, `sd_text_size`), so that
`Adapter(**json.load(...))` then a strict `load_state_dict` works in the official code. The
course variant's learned eta head is not part of the official class: it goes beside them, in
`eta_head.safetensors`. A converted directory (`ella_jax.weights.converted`) holds the same
config and the whole Flax tree, the eta head included when there is one.

What the encoder attends over is not an official constructor argument: this project stores it
as `attend` ("batch" as released, "tokens" fixed) in an exported file's safetensors metadata
(`sur_attend`; the official loader ignores metadata) and in a converted directory's config, and
`load_sur_adapter` follows it unless told otherwise.
"""

import contextlib
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
from ella_jax.models.sur_adapter import ENCODER_HEADS, SURAdapter
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
from ella_jax.weights.trained_run import EXPORTS

CONFIG_FILE = "sur_config.json"  # beside an official file: the constructor's arguments
WEIGHTS_FILE = EXPORTS["sur"]  # what training exports
ETA_FILE = "eta_head.safetensors"  # beside an official file: the learned eta head, if any
ETA_HEAD = "eta_head"
CONFIG_KEYS = ("depth", "adapter_weight", "sd_text_size")  # the official constructor's order
MODES = {"official": "batch", "fixed": "tokens"}  # load mode -> what the encoder attends over
METADATA_KEY = "sur_attend"  # an exported file's stored attention ("batch" or "tokens")


def check_config(config: dict[str, Any], source: str) -> None:
    """Raises a CheckpointError naming the first field the adapter cannot be built with (the
    official constructor's arguments, and optionally this project's `attend`)."""
    unknown = sorted(set(config) - {*CONFIG_KEYS, "attend"})
    missing = [k for k in CONFIG_KEYS if k not in config]
    if unknown or missing:
        raise CheckpointError(f"{source}: config fields missing {missing}, unknown {unknown}")
    for key in ("depth", "sd_text_size"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] <= 0:
            raise CheckpointError(f"{source}: {key}={config[key]!r} must be a positive integer")
    if config["sd_text_size"] % ENCODER_HEADS:
        raise CheckpointError(
            f"{source}: sd_text_size={config['sd_text_size']} is not a multiple of the "
            f"encoder's {ENCODER_HEADS} heads"
        )
    if config.get("attend", "batch") not in MODES.values():
        raise CheckpointError(f"{source}: attend={config['attend']!r}: use 'batch' or 'tokens'")
    eta = config["adapter_weight"]
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 1:
        raise CheckpointError(f"{source}: adapter_weight={eta!r} must be a number in [0, 1]")


def sizes_from_tensors(tensors: dict[str, np.ndarray], source: str) -> dict[str, int]:
    """`depth` and `sd_text_size` from an official state dict's names and shapes."""
    if "fc.weight" not in tensors or np.ndim(tensors["fc.weight"]) != 2:
        raise CheckpointError(f"{source}: no 2-d tensor 'fc.weight' (not a SUR-adapter)")
    layer = re.compile(r"transformer_encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for name in tensors if (m := layer.match(name))}
    return {"depth": max(layers, default=-1) + 1, "sd_text_size": tensors["fc.weight"].shape[0]}


def model_for(
    config: dict[str, Any],
    mode: str = "official",
    learned_eta: bool = False,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
) -> SURAdapter:
    """The adapter of an official config, attending as `mode` says ("official": over the
    batch axis, as released; "fixed": over tokens)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'official' or 'fixed'")
    return SURAdapter(
        depth=config["depth"],
        eta=float(config["adapter_weight"]),
        width=config["sd_text_size"],
        attend=MODES[mode],
        learned_eta=learned_eta,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def abstract_params(model: SURAdapter) -> Any:
    """The model's parameter tree as ShapeDtypeStructs, without computing anything."""
    clip_hidden = jax.ShapeDtypeStruct((1, 1, model.width), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), clip_hidden)["params"]


def _read_sidecar_config(path: epath.Path) -> dict[str, Any]:
    sidecar = path.parent / CONFIG_FILE
    if not sidecar.is_file():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE} beside it (the official constructor's arguments, e.g. "
            '{"depth": 2, "adapter_weight": 0.1, "sd_text_size": 768}: the official code keeps '
            "adapter_weight in the checkpoint's path)"
        )
    config = read_json(sidecar)
    check_config(config, str(sidecar))
    return config


def read_official(path: str | os.PathLike) -> tuple[dict, dict]:
    """(config, params) from an official .safetensors file and the sur_config.json beside it
    (and the eta head beside them, when there is one); config["attend"] when the file stores
    it."""
    path = storage.path(path)
    tensors = read_safetensors(path)
    config = _read_sidecar_config(path)
    attend = read_safetensors_metadata(path).get(METADATA_KEY)
    if attend is not None:
        config = {**config, "attend": attend}
        check_config(config, f"{path} (metadata {METADATA_KEY!r})")
    for key, value in sizes_from_tensors(tensors, str(path)).items():
        if config[key] != value:
            raise CheckpointError(
                f"{path.parent / CONFIG_FILE}: {key}={config[key]}, but the tensors of {path} "
                f"have {key}={value}"
            )
    eta_file = path.parent / ETA_FILE
    learned_eta = eta_file.is_file()
    expected = abstract_params(model_for(config, learned_eta=learned_eta))
    if not learned_eta:
        return config, params_from_torch(tensors, expected, str(path))
    head = {ETA_HEAD: expected.pop(ETA_HEAD)}
    eta_params = params_from_torch(read_safetensors(eta_file), head, str(eta_file))
    return config, {**params_from_torch(tensors, expected, str(path)), **eta_params}


def _sidecar(destination: epath.Path, contents: bytes, overwrite: bool, stack) -> None:
    """Writes `contents` to `destination` when the stack closes (unless it is there already)."""
    if destination.is_file() and destination.read_bytes() == contents:
        return
    staging = stack.enter_context(atomic_path(destination, overwrite=overwrite))
    staging.write_bytes(contents)


def write_official(
    path: str | os.PathLike,
    params: Any,
    config: dict[str, Any],
    dtype: DTypeLike | None = None,
    overwrite: bool = False,
) -> None:
    """Writes params as an official .safetensors in `dtype` (default: the params' own; with
    config["attend"] in its metadata when given), the sur_config.json beside it (one with the
    same contents may be there already) and, for a learned eta, the eta head's file; each whole
    or not at all, and nothing when any of them exists (unless `overwrite`)."""
    path = storage.path(path)
    check_config(config, str(path))
    params = dict(jax.device_get(params))
    eta_head = params.pop(ETA_HEAD, None)
    cast = lambda tensors: {n: t.astype(dtype or t.dtype) for n, t in tensors.items()}  # noqa: E731
    config_json = json.dumps({k: config[k] for k in CONFIG_KEYS}, indent=1) + "\n"
    stale_eta = path.parent / ETA_FILE if eta_head is None else None
    if stale_eta is not None and stale_eta.exists() and not overwrite:
        raise FileExistsError(
            f"{stale_eta}: already exists and would be read as this adapter's eta head (pass "
            "--overwrite to remove it)"
        )
    metadata = {METADATA_KEY: config["attend"]} if "attend" in config else None
    with contextlib.ExitStack() as stack:  # every destination checked before any is written
        _sidecar(path.parent / CONFIG_FILE, config_json.encode(), overwrite, stack)
        if eta_head is not None:
            staging = stack.enter_context(atomic_path(path.parent / ETA_FILE, overwrite))
            write_safetensors(cast(params_to_torch({ETA_HEAD: eta_head})), staging)
        staging = stack.enter_context(atomic_path(path, overwrite=overwrite))
        write_safetensors(cast(params_to_torch(params)), staging, metadata)
    if stale_eta is not None and stale_eta.exists():  # only once the new files are in place
        stale_eta.unlink()


def write_converted(directory: str | os.PathLike, config: dict[str, Any], params: Any) -> None:
    """Writes a converted SUR-adapter directory (into an existing empty or new folder)."""
    keys = [*CONFIG_KEYS, "attend"]
    converted.write_converted(directory, {k: config[k] for k in keys if k in config}, params)


def read_converted(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config, params) from a converted directory, checked against the model's tree."""

    def expected(config: dict, flat: dict) -> Any:
        learned_eta = any(name.startswith(f"{ETA_HEAD}/") for name in flat)
        return abstract_params(model_for(config, learned_eta=learned_eta))

    return converted.read_converted(directory, check_config, expected)


def read_sur_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """(config, params) from an official .safetensors file or a converted directory."""
    path = storage.path(path)
    if path.is_dir():
        return read_converted(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return read_official(path)


def load_sur_adapter(
    path: str | os.PathLike,
    mode: str | None = None,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike | None = None,
) -> tuple[SURAdapter, dict]:
    """(model, params) from an official .safetensors (with sur_config.json beside it) or a
    converted directory. mode "official": the encoder attends over the batch axis, as the
    released code does; "fixed": over tokens; None: what the checkpoint stores (this project's
    exports), else "official". `dtype` is the compute dtype; params keep the checkpoint's dtype
    unless `param_dtype` is given.
    Use: `out, encoder_out, llm_out = model.apply({"params": params}, clip_hidden)`."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'official' or 'fixed'")
    config, params = read_sur_adapter(path)
    if mode is None:
        mode = "fixed" if config.get("attend") == "tokens" else "official"
    if param_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    stored_dtype = jax.tree.leaves(params)[0].dtype
    model = model_for(
        config, mode, ETA_HEAD in params, dtype=dtype, param_dtype=param_dtype or stored_dtype
    )
    return model, jax.tree.map(jnp.asarray, params)
