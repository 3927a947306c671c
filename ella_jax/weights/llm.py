"""A decoder-only LLM (Llama, Mistral, Qwen2) from a Hugging Face folder: `config.json` and
`model.safetensors` or the shards `model.safetensors.index.json` lists. A CausalLM checkpoint's
`model.` prefix is dropped and its `lm_head` (tied or not) is not read."""

import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.llm import DecoderLLM, LLMConfig
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import read_config, read_weights_folder


def load_llm(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[DecoderLLM, dict]:
    """(model, params) of an LLM folder; params in `param_dtype` (default: `dtype`).

    Use: `model.apply({"params": params}, input_ids, attention_mask, layer=k)` -> (B, L, hidden):
    transformers' `output_hidden_states` entry k (None: the last hidden state).
    """
    config = read_config(storage.path(folder) / "config.json", LLMConfig.from_dict)
    tensors = read_weights_folder(folder, "model", keep=lambda n: not n.startswith("lm_head."))
    tensors = {name.removeprefix("model."): array for name, array in tensors.items()}
    model = DecoderLLM(config, dtype=dtype, param_dtype=param_dtype or dtype)
    example = (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
    # Rotary caches some checkpoints keep are recomputed from the config.
    ignore = lambda name: name.endswith("rotary_emb.inv_freq")  # noqa: E731
    params = params_for(model, example, tensors, str(folder), model.param_dtype, ignore)
    return model, params
