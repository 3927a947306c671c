"""What a training run leaves for the sampler: its work directory, its export and the settings
the connector was trained with.

`python -m train.main --workdir W` writes W/config.json (the run's config) when it starts, and
its export (W/ella.safetensors, or a SUR-adapter's W/sur_adapter.safetensors) when it ends. A
sampler that ignored the config would run the connector otherwise than it trained: padding
masked or not, a fixed token length of another size, another hidden state of the text model.
`trained_with` reads those settings beside a checkpoint; `checkpoint_in` lets a work directory
stand wherever a checkpoint is asked for.
"""

import dataclasses
import os

from etils import epath

from ella_jax import storage
from ella_jax.weights.tensors import CheckpointError, read_json

RUN_CONFIG_FILE = "config.json"  # the run's config, beside its checkpoints and export
EXPORTS = {"ella": "ella.safetensors", "sur": "sur_adapter.safetensors"}  # by config.method


@dataclasses.dataclass(frozen=True)
class TrainedWith:
    """The sampling settings a run's connector was trained with (from its config.json)."""

    source: str  # the run's config.json
    token_length: str  # "flexible" where the run masked the padding, else "fixed"
    max_tokens: int  # the text model's token length the run padded and truncated to
    text_layer: int | None  # the text model's hidden-state entry (None: the last)


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


def trained_with(checkpoint: str | os.PathLike) -> TrainedWith | None:
    """The settings of the run whose export `checkpoint` is (a work directory or a file in one,
    beside its config.json); None for a checkpoint of no run (the released ELLA, a converted
    directory)."""
    folder = storage.path(checkpoint)
    config = run_config(folder)
    if config is None:  # a file (or converted directory) beside the run's config
        folder = folder.parent
        config = run_config(folder)
    if config is None:
        return None
    layer = (config.get("text_encoder") or {}).get("layer")
    return TrainedWith(
        source=str(folder / RUN_CONFIG_FILE),
        token_length="flexible" if config.get("mask_padding") else "fixed",
        max_tokens=int(config.get("token_length", 128)),
        text_layer=layer,
    )
