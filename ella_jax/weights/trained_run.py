"""What a training run leaves for the sampler: its work directory, its export and the settings
the connector was trained with.

`python -m train.main --workdir W` writes W/config.json (the run's config) when it starts, and
its export (W/ella.safetensors, or a SUR-adapter's W/sur_adapter.safetensors) when it ends. A
sampler that ignored the config would run the connector otherwise than it trained: padding
masked or not, a fixed token length of another size, another hidden state or another text model
altogether. An ELLA export carries those settings in its safetensors metadata too
(`export_metadata`), so that the file alone, shared without its run, is sampled as trained.
`trained_with` reads them; `checkpoint_in` lets a work directory stand wherever a checkpoint is
asked for.
"""

import dataclasses
import json
import os
from typing import Any

from etils import epath

from ella_jax import storage
from ella_jax.weights.converted import PARAMS_FILE
from ella_jax.weights.tensors import CheckpointError, read_json, read_safetensors_metadata

RUN_CONFIG_FILE = "config.json"  # the run's config, beside its checkpoints and export
EXPORTS = {"ella": "ella.safetensors", "sur": "sur_adapter.safetensors"}  # by config.method
METADATA_KEY = "ella_jax_run"  # an export's safetensors metadata: `TrainedWith` as JSON
# What tells text models apart in their config.json: the architecture and its sizes (T5's
# names, then the LLMs'). Two checkpoints of one architecture are not told apart.
TEXT_MODEL_KEYS = ("model_type", "vocab_size", "d_model", "d_ff", "num_layers", "num_heads",
                   "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainedWith:
    """The sampling settings a run's connector was trained with (from its config.json, or from
    its export's metadata)."""

    source: str  # where they were read: the run's config.json, or the export's metadata
    token_length: str  # "flexible" where the run masked the padding, else "fixed"
    max_tokens: int  # the text model's token length the run padded and truncated to
    text_layer: int | None  # the text model's hidden-state entry (None: the last)
    text_model: dict[str, Any] | None = None  # `text_model_identity`; None: not known
    sample_steps: int | None = None  # the run's own samples: sampler steps
    sample_guidance: float | None = None  # and classifier-free guidance

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that carries these settings in a checkpoint file."""
        settings = dataclasses.asdict(self)
        del settings["source"]
        return {METADATA_KEY: json.dumps(settings)}


def run_config(directory: str | os.PathLike) -> dict | None:
    """The config of the training run whose work directory is `directory`, None when it holds
    none (a converted checkpoint's config.json is the model's, not a run's)."""
    path = storage.path(directory) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    config = read_json(path)
    return config if isinstance(config, dict) and "total_steps" in config else None


def checkpoint_in(location: str | os.PathLike, method: str = "ella") -> epath.Path:
    """`location` itself, or for a training work directory its export of `method`'s weights. A
    work directory without one (the run has not ended) is a CheckpointError saying what to do."""
    path = storage.reachable(location)
    config = run_config(path) if path.is_dir() else None
    if config is None:
        return path
    trained = config.get("method", "ella")
    if trained != method:
        raise CheckpointError(f"{path}: the work directory of a {trained} run, not of {method}")
    export = path / EXPORTS[method]
    if not export.is_file():
        raise CheckpointError(
            f"{path}: a work directory without its export {EXPORTS[method]} (the run has not "
            f"ended): export a checkpoint with `python -m convert export {path} OUT.safetensors`"
        )
    return export


def text_model_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """The architecture of the text model in `folder`, from its config.json (TEXT_MODEL_KEYS)."""
    raw = read_json(storage.path(folder) / "config.json")
    return {"model_type": "t5", **{key: raw[key] for key in TEXT_MODEL_KEYS if key in raw}}


def from_run_config(config: dict, source: str) -> TrainedWith:
    """The settings of the run whose config (as its config.json holds it) is `config`; the text
    model's identity where its folder can be read."""
    text_encoder = config.get("text_encoder") or {}
    folder = text_encoder.get("path") or config.get("t5")
    identity = None
    if folder and storage.path(folder).joinpath("config.json").is_file():
        identity = text_model_identity(folder)
    return TrainedWith(
        source=source,
        token_length="flexible" if config.get("mask_padding") else "fixed",
        max_tokens=int(config.get("token_length", 128)),
        text_layer=text_encoder.get("layer"),
        text_model=identity,
        sample_steps=config.get("sample_steps"),
        sample_guidance=config.get("sample_guidance"),
    )


def export_metadata(config: dict) -> dict[str, str]:
    """The safetensors metadata that carries the settings of the run `config` into its export."""
    return from_run_config(config, "").metadata()


def trained_with(checkpoint: str | os.PathLike) -> TrainedWith | None:
    """The settings of the run whose export `checkpoint` is: from the file's metadata (a
    converted directory's params.safetensors carries them too), else from the run's
    config.json (in the work directory `checkpoint`, or beside the file); None for a checkpoint
    of no run (the released ELLA, a directory converted from it)."""
    path = storage.path(checkpoint)
    carrier = path if path.is_file() else path / PARAMS_FILE
    if carrier.is_file():
        metadata = read_safetensors_metadata(carrier)
        if METADATA_KEY in metadata:
            source = f"{carrier} (metadata {METADATA_KEY!r})"
            try:
                return TrainedWith(source=source, **json.loads(metadata[METADATA_KEY]))
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{source}: not the settings of a run ({e})") from None
    folder = path if run_config(path) is not None else path.parent
    config = run_config(folder)
    if config is None:
        return None
    return from_run_config(config, str(folder / RUN_CONFIG_FILE))


def check_text_model(trained: TrainedWith, folder: str | os.PathLike) -> None:
    """A CheckpointError when the text model in `folder` is not of the architecture the
    connector was trained on (a connector reads any model of its width, and draws nonsense)."""
    if trained.text_model is None:
        return
    found, wanted = text_model_identity(folder), trained.text_model
    # Another architecture names its sizes otherwise: its model_type says enough.
    same_kind = found["model_type"] == wanted.get("model_type")
    keys = sorted({*found, *wanted}) if same_kind else ["model_type"]
    changes = [
        f"{key} {wanted.get(key)!r} -> {found.get(key)!r}"
        for key in keys
        if wanted.get(key) != found.get(key)
    ]
    if changes:
        raise CheckpointError(
            f"{folder}: not the text model the connector was trained on ({'; '.join(changes)}; "
            f"{trained.source}): give that model, or force it (--force-text-model, "
            "force_text_model=True) if you know the features match"
        )
