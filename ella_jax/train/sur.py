"""SUR-adapter's part of a training run (config.method = "sur"): the frozen CLIP text encoder,
the LLM vectors and their frozen projection W0, the adapter, the losses, samples and export.
`train.trainer` runs it; `../SUR_SPEC.md` (the official recipe) and `configs/sur_*.py` say what
each option reproduces.

Each example is (image, simple caption, complex caption) and the LLM vector of its simple
caption, looked up by caption in a safetensors file {caption: (D,) vector} (`sur.llm_vectors`,
or the `llm_vectors.safetensors` that `train.precompute` writes for a SUR config). The step
computes, with `out, encoder_out, _ = adapter(CLIP(simple))`:

    loss = MSE(UNet(noisy, t, out), noise) + lambda_llm * L(W0 f_LLM, encoder_out)
                                           + lambda_cp * L(CLIP(complex), out)

L = `distillation_kl` (official) or `cosine_loss` (the course project's). W0 (Linear(D, W)) is
drawn from the seed as torch initialises a Linear, frozen, and saved in the run's folder
(`sur_llm_projection.safetensors`; the official one is never saved).
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import msgpack
import numpy as np
from etils import epath

from ella_jax import storage
from ella_jax.models.sur_adapter import SURAdapter
from ella_jax.sampling import TextConditioning, adapt_clip_context
from ella_jax.storage import atomic_path
from ella_jax.sur import cosine_loss, distillation_kl
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train import data
from ella_jax.train.errors import ConfigError
from ella_jax.train.step import Conditioner
from ella_jax.weights import sur
from ella_jax.weights.clip import load_clip_text_encoder
from ella_jax.weights.tensors import (
    CheckpointError,
    read_json,
    read_safetensors,
    write_safetensors,
)

PROJECTION_FILE = "sur_llm_projection.safetensors"  # W0, in the run's folder
LLM_VECTORS_FILE = "llm_vectors.safetensors"  # in a train.precompute folder of a SUR config
SOURCES = ("manifest", "array_record", "precomputed")  # the ones whose records carry "complex"
LOSSES = {"kl": distillation_kl, "cosine": cosine_loss}
UNUSED = ("encoder_layer", "attention/value_layer")  # in the official state dict, never applied


def llm_vectors_path(config: ml_collections.ConfigDict) -> str:
    """`sur.llm_vectors`, or the precomputed folder's file when it is empty."""
    if config.sur.llm_vectors:
        return config.sur.llm_vectors
    return str(storage.path(config.data.path) / LLM_VECTORS_FILE)


def read_llm_vectors(path: str) -> dict[str, np.ndarray]:
    """{caption: (D,) float32} from a safetensors file of one vector per caption."""
    vectors = read_safetensors(path)
    widths = {v.shape for v in vectors.values()}
    if not vectors or len(widths) != 1 or len(next(iter(widths))) != 1:
        raise CheckpointError(f"{path}: expected one (D,) vector per caption, found {widths}")
    return {caption: v.astype(np.float32) for caption, v in vectors.items()}


def eta_of(options: ml_collections.ConfigDict) -> float | str:
    """`sur.eta`: a number in [0, 1] (a string on the command line) or "learned"."""
    if options.eta == "learned":
        return "learned"
    try:
        eta = float(options.eta)
    except (TypeError, ValueError):
        eta = None
    if isinstance(options.eta, bool) or eta is None or not 0 <= eta <= 1:
        raise ConfigError(f"config.sur.eta={options.eta!r}: use a number in [0, 1] or 'learned'")
    return eta


def trainable(params: Any) -> Any:
    """True for the params that train: all but the official state dict's unused ones (torch's
    AdamW skips them, having no gradient; optax would decay them)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    keep = [not any(name.startswith(u) for u in UNUSED) for name in names]
    return jax.tree.unflatten(jax.tree.structure(params), keep)


ARCHITECTURE_KEYS = ("depth", "eta", "attend")  # config.sur's: a resume may not change them


class SURRun:
    """SUR-adapter trained on CLIP's output of simple captions (see the module docstring)."""

    export_name = sur.WEIGHTS_FILE

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.options = config.sur

    def architecture_changes(
        self, saved: ml_collections.ConfigDict, workdir: epath.Path
    ) -> list[str]:
        """What of the adapter's shape or attention differs from the run `saved` (its config)
        trained, as "key old -> new" lines."""
        return [
            f"config.sur.{key} {saved.sur.get(key)!r} -> {self.options[key]!r}"
            for key in ARCHITECTURE_KEYS
            if saved.sur.get(key) != self.options[key]
        ]

    def check(self, cross_attention_dim: int, with_data: bool = True) -> None:
        """Fails fast, naming the key (the LLM vectors of the data: `with_data`)."""
        config, options = self.config, self.options
        for sub in ("text_encoder", "tokenizer"):
            if not (storage.path(config.sd) / sub).is_dir():
                raise ConfigError(f"config.sd={config.sd!r} has no {sub}/ folder (CLIP)")
        width = read_json(storage.path(config.sd) / "text_encoder" / "config.json").get(
            "hidden_size"
        )
        if width != cross_attention_dim:
            raise ConfigError(
                f"{config.sd}: CLIP's hidden_size {width} is not the UNet's cross_attention_dim "
                f"{cross_attention_dim}: the adapter's output replaces CLIP's as the context"
            )
        choices = dict(attend=("batch", "tokens"), loss=tuple(LOSSES))
        for key, allowed in choices.items():
            if options[key] not in allowed:
                raise ConfigError(f"config.sur.{key}={options[key]!r}: use one of {allowed}")
        if eta_of(options) == "learned" and not 0 < options.initial_eta < 1:
            raise ConfigError(
                f"config.sur.initial_eta={options.initial_eta!r}: a learned eta starts in (0, 1)"
            )
        if options.temperature <= 0:
            raise ConfigError(f"config.sur.temperature={options.temperature!r} must be positive")
        if config.data.source not in SOURCES:
            raise ConfigError(
                f"config.data.source={config.data.source!r}: SUR-adapter reads complex captions "
                f"from {', '.join(SOURCES)} records (a 'complex' field)"
            )
        path = llm_vectors_path(config)
        if with_data and not storage.path(path).is_file():
            where = "set config.sur.llm_vectors" if config.data.source != "precomputed" else ""
            raise ConfigError(
                f"config.sur.llm_vectors: {path} is not a file (a safetensors file of one vector "
                f"per caption; train.precompute writes one for a SUR config) {where}".rstrip()
            )
        if options.init:
            try:
                found, _ = sur.read_sur_adapter(options.init)
            except CheckpointError as e:
                raise ConfigError(f"config.sur.init={options.init!r}: {e}") from None
            if (found["depth"], found["sd_text_size"]) != (options.depth, width):
                raise ConfigError(
                    f"config.sur.init={options.init!r} has depth={found['depth']}, "
                    f"sd_text_size={found['sd_text_size']}; the run needs {options.depth}, {width}"
                )

    def load_frozen(self, workdir: epath.Path) -> dict:
        """{"clip": CLIP's params, "projection": W0}; builds the modules and reads the vectors."""
        config, options = self.config, self.options
        sd = storage.path(config.sd)
        self.clip, clip_params = load_clip_text_encoder(sd / "text_encoder", config.dtype)
        self.tokenizer = load_tokenizer(sd / "tokenizer")
        self.vectors = read_llm_vectors(llm_vectors_path(config))
        llm_width = next(iter(self.vectors.values())).shape[0]
        width = self.clip.config.hidden_size
        eta = eta_of(options)
        learned = eta == "learned"
        self.model = SURAdapter(
            depth=options.depth,
            eta=options.initial_eta if learned else eta,
            width=width,
            attend=options.attend,
            learned_eta=learned,
            dtype=config.dtype,
            param_dtype=jnp.float32,
        )
        self.model_config = {
            "depth": options.depth,
            "adapter_weight": float(self.model.eta),
            "sd_text_size": width,
            "attend": options.attend,  # stored with the export (not an official argument)
        }
        saved = workdir / PROJECTION_FILE
        if saved.is_file():  # a resumed run: the W0 it started with
            tensors = read_safetensors(saved)
            projection = {"kernel": tensors["weight"].T, "bias": tensors["bias"]}
        else:  # torch's Linear(D, W) initialisation: U(-1/sqrt(D), 1/sqrt(D))
            bound = 1 / np.sqrt(llm_width)
            keys = jax.random.split(jax.random.key(config.seed + 1), 2)
            projection = {
                "kernel": jax.random.uniform(
                    keys[0], (llm_width, width), minval=-bound, maxval=bound
                ),
                "bias": jax.random.uniform(keys[1], (width,), minval=-bound, maxval=bound),
            }
        self.projection = jax.device_get(projection)
        return {"clip": clip_params, "projection": self.projection}

    def init_params(self) -> Any:
        """The adapter's initial params (jittable): `sur.init`'s, or random from the seed."""
        if self.options.init:
            _, params = sur.read_sur_adapter(self.options.init)
            params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
            if not self.model.learned_eta:  # a head the run does not use is not exported
                return {k: v for k, v in params.items() if k != sur.ETA_HEAD}
            if sur.ETA_HEAD not in params:
                params = {**params, sur.ETA_HEAD: self._random_params()[sur.ETA_HEAD]}
            return params
        return self._random_params()

    def _random_params(self) -> Any:
        clip_hidden = jnp.zeros((1, 1, self.model.width), jnp.float32)
        return self.model.init(jax.random.key(self.config.seed), clip_hidden)["params"]

    def trainable(self, params: Any) -> Any:
        return trainable(params)

    def write_run_files(self, workdir: epath.Path) -> None:
        """sur_config.json and W0 (once: a resumed run keeps the one it started with)."""
        config_json = json.dumps({k: self.model_config[k] for k in sur.CONFIG_KEYS}, indent=1)
        # exactly the official constructor's arguments: what the export writes beside itself
        (workdir / sur.CONFIG_FILE).write_text(config_json + "\n")
        saved = workdir / PROJECTION_FILE
        if not saved.is_file():
            weight = np.ascontiguousarray(np.asarray(self.projection["kernel"]).T)
            tensors = {"weight": weight, "bias": np.asarray(self.projection["bias"])}
            with atomic_path(saved, overwrite=True) as staging:
                write_safetensors(tensors, staging)

    def batch_spec(self, batch: int, frozen: dict, vae: Any) -> dict:
        """{field: ShapeDtypeStruct} of a batch of `batch` examples as `prepare` makes them."""
        config = self.config
        ids = jax.ShapeDtypeStruct((batch, self.clip.config.max_position_embeddings), np.int32)
        vector = next(iter(self.vectors.values()))
        spec = dict(
            valid=jax.ShapeDtypeStruct((batch,), np.bool_),
            input_ids=ids,
            complex_ids=ids,
            llm_vector=jax.ShapeDtypeStruct((batch, *vector.shape), vector.dtype),
        )
        size = config.data.resolution
        if config.data.source == "precomputed":
            moments = data.latent_moments_spec(vae, frozen["vae"], batch, size)
            return {**spec, "latent_mean": moments, "latent_logvar": moments}
        return {**spec, "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)}

    def prepare(self, skipped: data.Skipped) -> Any:
        """prepare(record, drop_caption) -> {image or latent moments, "valid", "input_ids" and
        "complex_ids" (77,) CLIP tokens, "llm_vector" (D,)}."""
        config = self.config
        length = self.clip.config.max_position_embeddings
        precomputed = config.data.source == "precomputed"

        def prepare(record: Any, drop_caption: bool) -> dict:
            if isinstance(record, bytes):
                record = msgpack.unpackb(record)
            source = data.unpack_arrays(record) if precomputed else record
            simple = "" if drop_caption else str(source.get("caption", ""))
            if not drop_caption and "complex" not in source:
                raise ValueError(
                    f"the record of caption {simple!r} has no 'complex' caption: SUR-adapter "
                    "trains on (image, simple caption, complex caption) records"
                )
            complex_caption = "" if drop_caption else str(source["complex"])
            if simple not in self.vectors:
                raise ValueError(
                    f"caption {simple!r} has no vector in {llm_vectors_path(config)} (rerun "
                    "train.precompute, or make the file from these captions)"
                )
            ids, _ = tokenize(self.tokenizer, [simple, complex_caption], length)
            text = {"input_ids": ids[0], "complex_ids": ids[1], "llm_vector": self.vectors[simple]}
            if precomputed:
                moments = {k: source[k] for k in ("latent_mean", "latent_logvar")}
                return {**moments, "valid": np.bool_(True), **text}
            decoded = data.decode(record, config.data.resolution, skipped)
            return {"image": decoded["image"], "valid": decoded["valid"], **text}

        return prepare

    def conditioner(self, models) -> Conditioner:
        options = self.options
        distance = LOSSES[options.loss]
        clip, adapter = self.clip, self.model

        def encode(frozen: dict, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
            hidden = lambda ids: clip.apply({"params": frozen["clip"]}, ids)[0]  # noqa: E731
            return hidden(batch["input_ids"]), hidden(batch["complex_ids"]), batch["llm_vector"]

        def condition(params, frozen, text, timesteps, rng):
            simple, complex_hidden, llm_vector = text
            out, encoder_out, _ = adapter.apply(
                {"params": params}, simple, deterministic=False, rngs={"dropout": rng}
            )
            projection = frozen["projection"]
            llm_target = (llm_vector @ projection["kernel"] + projection["bias"])[:, None, :]
            loss_llm = distance(llm_target, encoder_out, **_temperature(options))
            loss_cp = distance(complex_hidden, out, **_temperature(options))
            extra = options.lambda_llm * loss_llm + options.lambda_cp * loss_cp
            context = jax.lax.stop_gradient(out) if options.detach_unet_input else out
            return context, extra, {"loss_llm": loss_llm, "loss_cp": loss_cp}

        return Conditioner(encode, condition)

    def sample_conditioning(self) -> Any:
        """conditioning(frozen, params) -> (cond, uncond, sampler params beside the UNet's) for
        config.sample_prompts (jittable): CLIP's context through the adapter, run on the
        [negative; positive] batch at once as the official pipeline runs it."""
        config = self.config
        n = len(config.sample_prompts)
        length = self.clip.config.max_position_embeddings
        ids, _ = tokenize(self.tokenizer, [""] * n + list(config.sample_prompts), length)

        def conditioning(frozen, params):
            hidden = self.clip.apply({"params": frozen["clip"]}, ids)[0]
            cond, uncond = adapt_clip_context(
                self.model,
                params,
                TextConditioning(clip_context=hidden[n:]),
                TextConditioning(clip_context=hidden[:n]),
            )
            return cond, uncond, {}

        return conditioning

    def export(self, workdir: epath.Path, params: Any) -> str:
        """Writes sur_adapter.safetensors + sur_config.json (+ eta_head.safetensors)."""
        path = workdir / self.export_name
        sur.write_official(path, params, self.model_config, self.config.export_dtype, True)
        return f"wrote {path} and {workdir / sur.CONFIG_FILE}"


def _temperature(options: ml_collections.ConfigDict) -> dict:
    return {"temperature": options.temperature} if options.loss == "kl" else {}
