"""The CLIP text encoder from a Hugging Face `CLIPTextModel` folder (`config.json` and
`model.safetensors`, or shards listed in `model.safetensors.index.json`), such as a Stable
Diffusion pipeline's `text_encoder/`."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.clip import ACTIVATIONS, CLIPTextConfig, CLIPTextEncoder
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import CheckpointError, read_json, read_weights_folder

PREFIX = "text_model."


def read_clip_text_config(folder: str | os.PathLike) -> CLIPTextConfig:
    """The text encoder's config, with a CheckpointError naming any field the port does not
    support."""
    path = Path(folder) / "config.json"
    raw = read_json(path)
    if raw.get("model_type", "clip_text_model") != "clip_text_model":
        raise CheckpointError(
            f"{path}: model_type={raw['model_type']!r} is not supported (clip_text_model)"
        )
    try:
        config = CLIPTextConfig.from_dict(raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.hidden_act not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: hidden_act={config.hidden_act!r} is not supported "
            f"(activations: {', '.join(ACTIVATIONS)})"
        )
    if not isinstance(config.eos_token_id, int):
        raise CheckpointError(f"{path}: eos_token_id={config.eos_token_id!r} must be an integer")
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads={config.num_attention_heads} does not divide "
            f"hidden_size={config.hidden_size}"
        )
    return config


def load_clip_text_encoder(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[CLIPTextEncoder, dict]:
    """(model, params) of a CLIP text encoder folder; params in `param_dtype` (default: `dtype`).

    Use: `model.apply({"params": params}, input_ids)` -> ((B, L, hidden), pooled (B, hidden)).
    """
    config = read_clip_text_config(folder)
    tensors = read_weights_folder(folder, "model")
    # transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that earlier releases
    # (and so every released Stable Diffusion folder) have.
    tensors = {n if n.startswith(PREFIX) else PREFIX + n: t for n, t in tensors.items()}
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
