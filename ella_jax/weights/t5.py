"""The T5 encoder from a Hugging Face T5 folder (`config.json` and `model.safetensors`, or shards
listed in `model.safetensors.index.json`). Decoder tensors are not read."""

import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.t5 import T5Config, T5Encoder
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import read_config, read_weights_folder


def load_t5_encoder(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[T5Encoder, dict]:
    """(model, params) of a T5 folder's encoder; params in `param_dtype` (default: `dtype`).

    Use: `model.apply({"params": params}, input_ids, attention_mask)` -> (B, L, d_model).
    """
    config = read_config(storage.path(folder) / "config.json", T5Config.from_dict)
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
