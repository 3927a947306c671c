"""The T5 encoder from a Hugging Face T5 folder (`config.json` and `model.safetensors`, or shards
listed in `model.safetensors.index.json`). Decoder tensors are not read."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.t5 import ACTIVATIONS, T5Config, T5Encoder
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import CheckpointError, read_json, read_weights_folder


def read_t5_config(folder: str | os.PathLike) -> T5Config:
    """The encoder's config, with a CheckpointError naming any field the port does not support."""
    path = Path(folder) / "config.json"
    raw = read_json(path)
    if raw.get("model_type", "t5") != "t5":
        raise CheckpointError(f"{path}: model_type={raw['model_type']!r} is not supported (t5)")
    try:
        config = T5Config.from_dict(raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.activation not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: feed_forward_proj={config.feed_forward_proj!r} is not supported "
            f"(activations: {', '.join(ACTIVATIONS)})"
        )
    return config


def load_t5_encoder(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[T5Encoder, dict]:
    """(model, params) of a T5 folder's encoder; params in `param_dtype` (default: `dtype`).

    Use: `model.apply({"params": params}, input_ids, attention_mask)` -> (B, L, d_model).
    """
    config = read_t5_config(folder)
    tensors = read_weights_folder(
        folder, "model", keep=lambda n: n.startswith(("shared.", "encoder."))
    )
    # The encoder's embedding is tied to `shared`; checkpoints hold one or both copies.
    embedding = tensors.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in tensors and embedding is not None:
        tensors["shared.weight"] = embedding
    model = T5Encoder(config, dtype=dtype, param_dtype=param_dtype or dtype)
    example = (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
    params = params_for(model, example, tensors, str(folder), model.param_dtype)
    return model, params
