"""The CLIP text encoder from a Hugging Face `CLIPTextModel` folder (`config.json` and
`model.safetensors`, or shards listed in `model.safetensors.index.json`), such as a Stable
Diffusion pipeline's `text_encoder/`."""

import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import read_config, read_weights_folder

PREFIX = "text_model."


def load_clip_text_encoder(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[CLIPTextEncoder, dict]:
    """(model, params) of a CLIP text encoder folder; params in `param_dtype` (default: `dtype`).

    Use: `model.apply({"params": params}, input_ids)` -> ((B, L, hidden), pooled (B, hidden)).
    """
    config = read_config(storage.path(folder) / "config.json", CLIPTextConfig.from_dict)
    tensors = read_weights_folder(folder, "model")
    # transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that earlier releases
    # (and so every released Stable Diffusion folder) have.
    tensors = {
        n if n.startswith((PREFIX, "text_projection.")) else PREFIX + n: t
        for n, t in tensors.items()
    }
    model = CLIPTextEncoder(config, dtype=dtype, param_dtype=param_dtype or dtype)
    example = (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
    params = params_for(
        model,
        example,
        tensors,
        str(folder),
        model.param_dtype,
        ignore=lambda n: n.endswith("position_ids"),
    )
    return model, params
