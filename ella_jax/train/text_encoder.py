"""The run's frozen text model, `config.text_encoder`: a T5 or a decoder-only LLM folder.

    c.text_encoder = text_encoder_config()  # in a configs/ file
    --config.text_encoder.kind=llm --config.text_encoder.path=/models/TinyLlama-1.1B \
        --config.text_encoder.layer=22

kind: "t5", "llm" or "" (read from the folder's config.json); path: the Hugging Face folder;
layer: an LLM's hidden-state entry (transformers' numbering; unset: its last hidden state);
dtype: its compute dtype. An empty path or dtype falls back to `config.t5` / `config.t5_dtype`,
so the older `--config.t5=` keeps working.
"""

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from ella_jax import storage
from ella_jax.train.errors import ConfigError
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.text_model import KINDS, TextModel, folder_kind, load_text_model


def text_encoder_config(
    kind: str = "", path: str = "", layer: int | None = None, dtype: str = ""
) -> ml_collections.ConfigDict:
    """The `config.text_encoder` block (see the module docstring)."""
    return ml_collections.ConfigDict(
        dict(kind=kind, path=path, layer=placeholder(int) if layer is None else layer, dtype=dtype)
    )


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """The resolved settings: `key` names the config entry the path came from (for errors)."""

    kind: str
    path: str
    layer: int | None
    dtype: str
    key: str

    def load(self) -> tuple[TextModel, dict]:
        """(text model, its params); its tokenizer is `text.load_tokenizer(self.path)`."""
        return load_text_model(self.path, self.dtype, self.layer, self.kind)

    def summary(self) -> dict:
        """What train.precompute records of it (and checks again at training)."""
        return {"text_kind": self.kind, "text_layer": self.layer}


def text_encoder(config: ml_collections.ConfigDict) -> TextEncoder:
    """The run's text model settings, checked against its folder: a missing folder, an unknown
    kind, a kind the folder is not or a layer it does not have is a ConfigError naming the key."""
    block = config.get("text_encoder") or ml_collections.ConfigDict()
    key = "config.text_encoder.path" if block.get("path") else "config.t5"
    path = block.get("path") or config.get("t5", "")
    dtype = block.get("dtype") or config.get("t5_dtype", "float32")
    kind, layer = block.get("kind") or "", block.get("layer")
    if kind and kind not in KINDS:
        raise ConfigError(f"config.text_encoder.kind={kind!r}: use one of {', '.join(KINDS)}")
    if not path or not storage.reachable(path).is_dir():
        raise ConfigError(f"{key}={path!r} is not a model folder")
    try:
        found = folder_kind(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    if kind and kind != found:
        raise ConfigError(f"config.text_encoder.kind={kind!r}, but {key}={path!r} is a {found}")
    if layer is not None:
        layers = read_json(storage.path(path) / "config.json").get("num_hidden_layers")
        if found == "t5":
            raise ConfigError(
                f"config.text_encoder.layer={layer}: a T5's layers are not selectable"
            )
        if not 0 <= layer <= layers:
            raise ConfigError(
                f"config.text_encoder.layer={layer}, but {path} has hidden states 0 to {layers}"
            )
    return TextEncoder(found, str(path), layer, str(dtype), key)
