"""The frozen text model behind a connector, whatever its architecture: a T5 encoder or a
decoder-only LLM (Llama, Mistral, Qwen2), read from a Hugging Face folder. Callers see one
interface, `text_model(params, input_ids, attention_mask)` -> (B, L, width) hidden states; the
kind comes from the folder's `config.json` (`model_type`)."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.llm import FAMILIES
from ella_jax.weights.tensors import CheckpointError, read_json

KINDS = ("t5", "llm")


@dataclasses.dataclass(frozen=True)
class TextModel:
    """A loaded text model: `kind` "t5" or "llm", `layer` the LLM's hidden-state entry read
    (transformers' numbering; None: its last hidden state). Hashable: jitted code may close over
    it."""

    module: nn.Module
    kind: str
    layer: int | None = None

    @property
    def width(self) -> int:
        config = self.module.config
        return config.d_model if self.kind == "t5" else config.hidden_size

    def __call__(self, params: dict, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B, L), attention_mask (B, L) (True for real tokens) -> (B, L, width)."""
        if self.kind == "llm":
            return self.module.apply({"params": params}, input_ids, attention_mask, self.layer)
        return self.module.apply({"params": params}, input_ids, attention_mask)


def folder_kind(folder: str | os.PathLike) -> str:
    """ "t5" or "llm", from the folder's config.json; CheckpointError for any other model."""
    path = storage.path(folder) / "config.json"
    model_type = read_json(path).get("model_type", "t5")
    if model_type == "t5":
        return "t5"
    if model_type in FAMILIES:
        return "llm"
    raise CheckpointError(
        f"{path}: model_type={model_type!r} is not a text model this project reads "
        f"(t5, {', '.join(FAMILIES)})"
    )


def folder_width(folder: str | os.PathLike) -> int:
    """The hidden width of the text model in `folder`, from its config.json alone."""
    raw = read_json(storage.path(folder) / "config.json")
    return raw["d_model"] if folder_kind(folder) == "t5" else raw["hidden_size"]


def load_text_model(
    folder: str | os.PathLike,
    dtype: DTypeLike = jnp.float32,
    layer: int | None = None,
    kind: str | None = None,
) -> tuple[TextModel, dict]:
    """(text model, params) of a T5 or LLM folder in `dtype`. `kind` (optional) must be the
    folder's; `layer` selects an LLM's hidden-state entry (a T5 has none to select)."""
    from ella_jax.weights.llm import load_llm
    from ella_jax.weights.t5 import load_t5_encoder

    found = folder_kind(folder)
    if kind and kind != found:
        raise CheckpointError(f"{folder}: a {found} folder, not {kind}")
    if found == "t5":
        if layer is not None:
            raise CheckpointError(f"{folder}: layer={layer}: a T5's layers are not selectable")
        module, params = load_t5_encoder(folder, dtype)
    else:
        module, params = load_llm(folder, dtype)
        if layer is not None and not 0 <= layer <= module.config.num_hidden_layers:
            raise CheckpointError(
                f"{folder}: layer={layer}, but the model has hidden states 0 to "
                f"{module.config.num_hidden_layers}"
            )
    return TextModel(module, found, layer), params
