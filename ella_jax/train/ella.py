"""ELLA's part of a training run (config.method = "ella", the default): the frozen text model
(a T5 or a decoder-only LLM, `train.text_encoder`), the connector, the batch's text fields, the
samples and the export. `train.trainer` runs it."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ella_jax import storage
from ella_jax.models.ella import ELLA
from ella_jax.sampling import TextConditioning, sdxl_time_ids
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train import data
from ella_jax.train.errors import ConfigError
from ella_jax.train.step import Conditioner, ella_conditioner
from ella_jax.train.text_encoder import text_encoder
from ella_jax.weights.diffusers import is_sdxl, load_sdxl_text_encoder_2
from ella_jax.weights.ella import (
    CONFIG_KEYS,
    SIDECAR_FILE,
    load_ella,
    read_ella,
    write_official,
    write_official_config,
)
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.text_model import folder_width
from ella_jax.weights.trained_run import EXPORTS, export_metadata


class ELLARun:
    """ELLA trained on the frozen text model's features of each caption (`train.trainer`)."""

    export_name = EXPORTS["ella"]

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        # SDXL: its second CLIP encoder gives the UNet's pooled embedding (with the time ids).
        self.sdxl = bool(config.sd) and is_sdxl(config.sd)
        self.clip_2 = None

    def check(self, cross_attention_dim: int, with_data: bool = True) -> None:
        """Fails fast, naming the key: no text model folder, an ELLA that does not fit the
        UNet or the text model, an `ella_init` of another shape, precomputed features made
        otherwise (`with_data`)."""
        config = self.config
        encoder = text_encoder(config)
        if config.ella.width != cross_attention_dim:
            raise ConfigError(
                f"config.ella.width={config.ella.width} is not the UNet's cross_attention_dim "
                f"{cross_attention_dim} ({config.sd}/unet/config.json)"
            )
        if config.ella.width % config.ella.heads:
            raise ConfigError(
                f"config.ella.heads={config.ella.heads} does not divide width={config.ella.width}"
            )
        width = folder_width(encoder.path)
        if config.ella_init:
            self._check_ella_init({**config.ella, "input_dim": width})
        if config.data.source == "precomputed" and with_data:
            self._check_precomputed(encoder, width)

    def _check_ella_init(self, wanted: dict) -> None:
        """`config.ella_init` is an ELLA of the run's shape (its input_dim: the text model's
        width)."""
        config = self.config
        try:
            found, _ = read_ella(config.ella_init, config.ella.heads)
        except CheckpointError as e:
            raise ConfigError(f"config.ella_init={config.ella_init!r}: {e}") from None
        for key, value in wanted.items():
            if found[key] != value:
                source = "the text model's width" if key == "input_dim" else f"config.ella.{key}"
                raise ConfigError(
                    f"config.ella_init={config.ella_init!r} has {key}={found[key]}, but the run "
                    f"needs {key}={value} ({source})"
                )

    def _check_precomputed(self, encoder, width: int) -> None:
        """The features in a `train.precompute` folder were made with this config's token
        length, text model dtype and layer, and a text model of its width (the step would
        train on them as they are)."""
        config = self.config
        summary_path = storage.path(config.data.path) / "precompute.json"
        made = read_json(summary_path)  # there: checked by train.trainer.check_config
        if "token_length" in made and made["token_length"] != config.token_length:
            raise ConfigError(
                f"config.token_length={config.token_length!r}, but {summary_path} was made "
                f"with token_length={made['token_length']!r}: rerun train.precompute with "
                "this config"
            )
        if "t5_dtype" in made and made["t5_dtype"] != encoder.dtype:
            raise ConfigError(
                f"the text model's dtype is {encoder.dtype!r}, but {summary_path} was made with "
                f"t5_dtype={made['t5_dtype']!r}: rerun train.precompute with this config"
            )
        if made.get("text_layer") != encoder.layer:
            raise ConfigError(
                f"config.text_encoder.layer={encoder.layer}, but {summary_path} was made with "
                f"layer {made.get('text_layer')}: rerun train.precompute with this config"
            )
        if self.sdxl and not made.get("sdxl", False):
            raise ConfigError(
                f"config.sd={config.sd!r} is SDXL, but {summary_path} was made for another model "
                "(no pooled embeddings or time ids): rerun train.precompute with this config"
            )
        empty_path = storage.path(config.data.path) / data.EMPTY_CAPTION_FILE
        try:
            found = data.read_empty_caption(config.data.path)["t5_features"].shape[-1]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{empty_path}: not readable ({e}); rerun train.precompute") from None
        if found != width:
            raise ConfigError(
                f"{config.data.path} holds text features of width {found}, but {encoder.key}="
                f"{encoder.path!r} has width {width}: rerun train.precompute with this config"
            )

    def architecture_changes(
        self, saved: ml_collections.ConfigDict, workdir: epath.Path
    ) -> list[str]:
        """What of the connector's shape differs from the run `saved` (its config) in `workdir`
        trained: `ella.*` keys, and the text model's width (its input_dim, in the run's
        ella_config.json), as "key old -> new" lines."""
        old, new = saved.get("ella", {}), self.config.ella
        changes = [
            f"config.ella.{key} {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted({*old, *new})
            if old.get(key) != new.get(key)
        ]
        sidecar = workdir / SIDECAR_FILE
        trained_width = read_json(sidecar).get("input_dim") if sidecar.is_file() else None
        width = folder_width(text_encoder(self.config).path)
        if trained_width is not None and width != trained_width:
            changes.append(f"the text model's width (input_dim) {trained_width} -> {width}")
        return changes

    @functools.cached_property
    def tokenizer(self):
        """The text model's tokenizer (read when first needed: compiling needs none)."""
        return load_tokenizer(text_encoder(self.config).path)

    @functools.cached_property
    def tokenizer_2(self):
        """SDXL's second CLIP encoder's tokenizer."""
        return load_tokenizer(storage.path(self.config.sd) / "tokenizer_2")

    def load_frozen(self, workdir: epath.Path) -> dict:
        """The frozen text model's params {"text": ...} (and SDXL's second CLIP encoder's,
        "clip_2"); builds the modules."""
        config = self.config
        self.text_model, text_params = text_encoder(config).load()
        frozen = {}
        if self.sdxl:
            self.clip_2, frozen["clip_2"], self.zero_negative = load_sdxl_text_encoder_2(
                config.sd, config.dtype
            )
        self.model = ELLA(
            **config.ella,
            input_dim=self.text_model.width,
            dtype=config.dtype,
            param_dtype=jnp.float32,
        )
        self.model_config = {k: getattr(self.model, k) for k in CONFIG_KEYS}
        return {"text": text_params, **frozen}

    def init_params(self) -> Any:
        """The connector's initial params (jittable): `ella_init`'s, or random from the seed."""
        config = self.config
        if config.ella_init:
            return load_ella(config.ella_init, config.ella.heads, param_dtype=jnp.float32)[1]
        features = jnp.zeros((1, 1, self.model.input_dim), jnp.float32)
        return self.model.init(jax.random.key(config.seed), features, jnp.zeros((1,)))["params"]

    def batch_spec(self, batch: int, frozen: dict, vae: nn.Module) -> dict:
        """{field: ShapeDtypeStruct} of a batch of `batch` examples as `prepare` makes them:
        online, images and tokens; precomputed, what train.precompute wrote (the dtypes its
        frozen encoders give, read off them without running them)."""
        config = self.config
        size = config.data.resolution
        tokens = (batch, config.token_length)
        spec = dict(
            valid=jax.ShapeDtypeStruct((batch,), np.bool_),
            token_mask=jax.ShapeDtypeStruct(tokens, np.bool_),
        )
        if config.data.source == "precomputed":
            ids = jax.ShapeDtypeStruct(tokens, np.int32)
            features = jax.eval_shape(self.text_model, frozen["text"], ids, spec["token_mask"])
            moments = data.latent_moments_spec(vae, frozen["vae"], batch, size)
            spec.update(t5_features=features, latent_mean=moments, latent_logvar=moments)
            if self.sdxl:  # float32 as precompute stores it
                width = self.clip_2.config.projection_dim
                spec.update(pooled=jax.ShapeDtypeStruct((batch, width), np.float32))
        else:
            spec.update(
                image=jax.ShapeDtypeStruct((batch, size, size, 3), np.float32),
                input_ids=jax.ShapeDtypeStruct(tokens, np.int32),
            )
            if self.sdxl:
                length = self.clip_2.config.max_position_embeddings
                spec.update(clip_2_ids=jax.ShapeDtypeStruct((batch, length), np.int32))
        if self.sdxl:
            spec.update(time_ids=jax.ShapeDtypeStruct((batch, 6), np.float32))
        return spec

    def write_run_files(self, workdir: epath.Path) -> None:
        """ella_config.json: lets `python -m convert export` read any checkpoint of the run."""
        write_official_config(workdir / SIDECAR_FILE, self.model_config)

    def prepare(self, skipped: data.Skipped) -> Any:
        """prepare(record, drop_caption) -> one example for the step (see `train.data`)."""
        config = self.config
        if config.data.source == "precomputed":
            return data.precomputed_examples(data.read_empty_caption(config.data.path))

        def tokenize_one(caption: str) -> tuple[np.ndarray, np.ndarray]:
            ids, mask = tokenize(self.tokenizer, [caption], config.token_length)
            return ids[0], mask[0]

        sdxl_tokenize = None
        if self.sdxl:
            length = self.clip_2.config.max_position_embeddings
            sdxl_tokenize = lambda c: tokenize(self.tokenizer_2, [c], length)[0][0]  # noqa: E731
        return data.online_examples(
            tokenize_one, config.data.resolution, skipped, sdxl_tokenize=sdxl_tokenize
        )

    def conditioner(self, models) -> Conditioner:
        return ella_conditioner(models, self.config.mask_padding, self.sdxl, self.clip_2)

    def sample_conditioning(self) -> Any:
        """conditioning(frozen, params) -> (cond, uncond, sampler params beside the UNet's) for
        config.sample_prompts (jittable): ELLA reads their text features at every step."""
        config = self.config
        n = len(config.sample_prompts)
        ids, mask = tokenize(
            self.tokenizer, [""] * n + list(config.sample_prompts), config.token_length
        )
        ella_mask = mask if config.mask_padding else np.ones_like(mask)
        if self.sdxl:  # the pooled embedding of the prompts (zeros or "" for the negative)
            length = self.clip_2.config.max_position_embeddings
            clip_ids = tokenize(self.tokenizer_2, [""] * n + list(config.sample_prompts), length)[0]
            size = config.data.resolution
            time_ids = sdxl_time_ids(size, size, n)

        def conditioning(frozen, params):
            features = self.text_model(frozen["text"], ids, mask)
            negative, positive = (), ()
            if self.sdxl:
                pooled = self.clip_2.apply({"params": frozen["clip_2"]}, clip_ids, True)[1]
                zeros = jnp.zeros_like(pooled[:n]) if self.zero_negative else pooled[:n]
                negative, positive = (zeros, time_ids), (pooled[n:], time_ids)
            uncond = TextConditioning(features[:n], ella_mask[:n], None, *negative)
            cond = TextConditioning(features[n:], ella_mask[n:], None, *positive)
            return cond, uncond, {"ella": params}

        return conditioning

    def export(self, workdir: epath.Path, params: Any) -> str:
        """Writes the official-layout ELLA (its config and the run's sampling settings in the
        file's metadata)."""
        path = workdir / self.export_name
        metadata = export_metadata(self.config.to_dict())
        write_official(path, params, self.config.export_dtype, True, self.model_config, metadata)
        return f"wrote {path} and {workdir / SIDECAR_FILE}"
