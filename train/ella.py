"""ELLA's part of a training run (config.method = "ella", the default): the frozen T5, the
connector, the batch's text fields, the samples and the export. `train.trainer` runs it."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ella_jax import storage
from ella_jax.models.ella import ELLA
from ella_jax.sampling import TextConditioning
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.weights.ella import (
    CONFIG_KEYS,
    load_ella,
    read_ella,
    write_official,
    write_official_config,
)
from ella_jax.weights.t5 import load_t5_encoder
from ella_jax.weights.tensors import CheckpointError, read_json
from train import data
from train.errors import ConfigError
from train.step import Conditioner, ella_conditioner


class ELLARun:
    """ELLA trained on the frozen T5's features of each caption (see `train.trainer`)."""

    export_name = "ella.safetensors"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def check(self, cross_attention_dim: int) -> None:
        """Fails fast, naming the key: no T5 folder, an ELLA that does not fit the UNet or the
        T5, an `ella_init` of another shape, precomputed features made otherwise."""
        config = self.config
        if not config.t5 or not storage.reachable(config.t5).is_dir():
            raise ConfigError(f"config.t5={config.t5!r} is not a model folder")
        if config.ella.width != cross_attention_dim:
            raise ConfigError(
                f"config.ella.width={config.ella.width} is not the UNet's cross_attention_dim "
                f"{cross_attention_dim} ({config.sd}/unet/config.json)"
            )
        if config.ella.width % config.ella.heads:
            raise ConfigError(
                f"config.ella.heads={config.ella.heads} does not divide width={config.ella.width}"
            )
        d_model = read_json(storage.path(config.t5) / "config.json").get("d_model")
        if config.ella_init:
            self._check_ella_init({**config.ella, "input_dim": d_model})
        if config.data.source == "precomputed":
            self._check_precomputed(d_model)

    def _check_ella_init(self, wanted: dict) -> None:
        """`config.ella_init` is an ELLA of the run's shape (its input_dim: the T5's d_model)."""
        config = self.config
        try:
            found, _ = read_ella(config.ella_init, config.ella.heads)
        except CheckpointError as e:
            raise ConfigError(f"config.ella_init={config.ella_init!r}: {e}") from None
        for key, value in wanted.items():
            if found[key] != value:
                source = "the T5's d_model" if key == "input_dim" else f"config.ella.{key}"
                raise ConfigError(
                    f"config.ella_init={config.ella_init!r} has {key}={found[key]}, but the run "
                    f"needs {key}={value} ({source})"
                )

    def _check_precomputed(self, d_model: int) -> None:
        """The features in a `train.precompute` folder were made with this config's token
        length, T5 dtype and a T5 of the config's width (the step would train on them as
        they are)."""
        config = self.config
        summary_path = storage.path(config.data.path) / "precompute.json"
        made = read_json(summary_path)  # there: checked by train.trainer.check_config
        if "token_length" in made and made["token_length"] != config.token_length:
            raise ConfigError(
                f"config.token_length={config.token_length!r}, but {summary_path} was made "
                f"with token_length={made['token_length']!r}: rerun train.precompute with "
                "this config"
            )
        if "t5_dtype" in made and made["t5_dtype"] != str(config.t5_dtype):
            raise ConfigError(
                f"config.t5_dtype={str(config.t5_dtype)!r}, but {summary_path} was made with "
                f"t5_dtype={made['t5_dtype']!r}: rerun train.precompute with this config"
            )
        empty_path = storage.path(config.data.path) / data.EMPTY_CAPTION_FILE
        try:
            width = data.read_empty_caption(config.data.path)["t5_features"].shape[-1]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{empty_path}: not readable ({e}); rerun train.precompute") from None
        if width != d_model:
            raise ConfigError(
                f"{config.data.path} holds T5 features of width {width}, but config.t5="
                f"{config.t5!r} has d_model={d_model}: rerun train.precompute with this config"
            )

    def load_frozen(self, workdir: epath.Path) -> dict:
        """The frozen T5's params {"t5": ...}; builds the modules and the tokenizer."""
        config = self.config
        self.t5, t5_params = load_t5_encoder(config.t5, config.t5_dtype)
        self.tokenizer = load_tokenizer(config.t5)
        self.model = ELLA(
            **config.ella,
            input_dim=self.t5.config.d_model,
            dtype=config.dtype,
            param_dtype=jnp.float32,
        )
        self.model_config = {k: getattr(self.model, k) for k in CONFIG_KEYS}
        return {"t5": t5_params}

    def init_params(self) -> Any:
        """The connector's initial params (jittable): `ella_init`'s, or random from the seed."""
        config = self.config
        if config.ella_init:
            return load_ella(config.ella_init, config.ella.heads, param_dtype=jnp.float32)[1]
        features = jnp.zeros((1, 1, self.model.input_dim), jnp.float32)
        return self.model.init(jax.random.key(config.seed), features, jnp.zeros((1,)))["params"]

    def write_run_files(self, workdir: epath.Path) -> None:
        """ella_config.json: lets `python -m convert export` read any checkpoint of the run."""
        write_official_config(workdir / "ella_config.json", self.model_config)

    def prepare(self, skipped: data.Skipped) -> Any:
        """prepare(record, drop_caption) -> one example for the step (see `train.data`)."""
        config = self.config
        if config.data.source == "precomputed":
            return data.precomputed_examples(data.read_empty_caption(config.data.path))

        def tokenize_one(caption: str) -> tuple[np.ndarray, np.ndarray]:
            ids, mask = tokenize(self.tokenizer, [caption], config.token_length)
            return ids[0], mask[0]

        return data.online_examples(tokenize_one, config.data.resolution, skipped)

    def conditioner(self, models) -> Conditioner:
        return ella_conditioner(models, self.config.mask_padding)

    def sample_conditioning(self) -> Any:
        """conditioning(frozen, params) -> (cond, uncond, sampler params beside the UNet's) for
        config.sample_prompts (jittable): ELLA reads their T5 features at every step."""
        config = self.config
        n = len(config.sample_prompts)
        ids, mask = tokenize(
            self.tokenizer, [""] * n + list(config.sample_prompts), config.token_length
        )
        ella_mask = mask if config.mask_padding else np.ones_like(mask)

        def conditioning(frozen, params):
            features = self.t5.apply({"params": frozen["t5"]}, ids, mask)
            uncond = TextConditioning(features[:n], ella_mask[:n])
            cond = TextConditioning(features[n:], ella_mask[n:])
            return cond, uncond, {"ella": params}

        return conditioning

    def export(self, workdir: epath.Path, params: Any) -> str:
        """Writes the official-layout ELLA (and its config in the file's metadata)."""
        path = workdir / self.export_name
        write_official(path, params, self.config.export_dtype, True, self.model_config)
        return f"wrote {path} and {workdir / 'ella_config.json'}"
