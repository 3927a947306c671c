"""`ELLAPipeline`: the official ELLA inference, from standard folders, around the jitted sampler
(and plain SD, and SUR-adapter's: CLIP, the adapter, the UNet)."""

import functools
import math
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.sampling import (
    TextConditioning,
    adapt_clip_context,
    sample_latents,
    sdxl_time_ids,
)
from ella_jax.schedulers import SchedulerConfig, initial_latents, make_schedule
from ella_jax.sharding import param_shardings, shard_batch
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.weights.clip import load_clip_text_encoder
from ella_jax.weights.diffusers import is_sdxl, load_sdxl_text_encoder_2, load_unet, load_vae
from ella_jax.weights.ella import load_ella
from ella_jax.weights.sur import load_sur_adapter
from ella_jax.weights.tensors import CheckpointError, read_config, read_json
from ella_jax.weights.text_model import load_text_model
from ella_jax.weights.trained_run import (
    TrainedWith,
    check_text_model,
    checkpoint_in,
    trained_with,
)

FIXED_TOKEN_LENGTH = 128  # ELLA's T5 length in training and in the reference inference
Mode = Literal["ella", "ella+clip", "clip", "sur"]
MODES = ("ella", "ella+clip", "clip", "sur")


def _encode_sdxl(clip, clip_2, params, params_2, ids, ids_2) -> tuple[jax.Array, jax.Array]:
    first = clip.apply({"params": params}, ids, True)[0]
    second, pooled = clip_2.apply({"params": params_2}, ids_2, True)
    return jnp.concatenate([first, second.astype(first.dtype)], axis=-1), pooled


class ELLAPipeline:
    """Text to image with ELLA: T5 once per prompt, ELLA + UNet at every step, VAE decode.

    Build with `from_pretrained`; call with prompts. Each stage is jitted once per shape. An
    SDXL folder (`text_encoder_2/`) adds the second CLIP encoder, its pooled embedding and the
    time ids to every mode.
    """

    def __init__(
        self,
        modules: dict,
        params: dict,
        tokenizers: dict,
        scheduler: SchedulerConfig,
        mesh: Mesh | None = None,
        force_zeros_for_empty_prompt: bool = False,
        trained: TrainedWith | None = None,
    ) -> None:
        self.modules = modules
        self.tokenizers = tokenizers
        self.scheduler = scheduler
        self.mesh = mesh
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        # The connector's run: its token length and padding are the defaults of every call.
        self.trained = trained
        self.token_length = trained.token_length if trained else "fixed"
        self.fixed_token_length = trained.max_tokens if trained else FIXED_TOKEN_LENGTH
        if mesh is not None:
            params = jax.device_put(params, param_shardings(params, mesh))
        self.params = params
        text, clip, vae = modules.get("t5"), modules["clip"], modules["vae"]
        self._t5 = jax.jit(lambda p, ids, mask: text(p, ids, mask))
        self._clip = jax.jit(lambda p, ids: clip.apply({"params": p}, ids)[0])
        self._sdxl = jax.jit(functools.partial(_encode_sdxl, clip, modules.get("clip_2")))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        unet, ella, adapter = modules["unet"], modules.get("ella"), modules.get("sur")

        def sample(
            params, schedule, prediction_type, latents, cond, uncond, guidance_scale, dropout_rng
        ):
            if "sur" in params:
                cond, uncond = adapt_clip_context(adapter, params["sur"], cond, uncond, dropout_rng)
            return sample_latents(
                unet, ella, params, schedule, prediction_type, latents, cond, uncond, guidance_scale
            )

        self._sample = jax.jit(sample, static_argnames="prediction_type")

    @classmethod
    def from_pretrained(
        cls,
        sd: str | os.PathLike,
        t5: str | os.PathLike | None = None,
        ella: str | os.PathLike | None = None,
        ella_heads: int | None = None,
        dtype: DTypeLike = "float32",
        t5_dtype: DTypeLike | None = None,
        scheduler: str | None = None,
        mesh: Mesh | None = None,
        sur: str | os.PathLike | None = None,
        sur_mode: Literal["official", "fixed"] | None = None,
        text_layer: int | None = None,
        force_text_model: bool = False,
    ) -> "ELLAPipeline":
        """sd: a diffusers Stable Diffusion folder; t5: ELLA's text model, a Hugging Face T5
        folder (flan-t5-xl) or decoder-only LLM folder (Llama, Mistral, Qwen2; `text_layer`: the
        hidden-state entry its connector was trained on, None: the last), `modules["t5"]` then;
        ella: an official ELLA .safetensors, a converted directory or a training work directory
        (its export; `ella_heads` as in `load_ella`); ELLA needs the text model. An ELLA a run
        exported brings the run's settings (its config.json beside it): its text layer, and the
        token length and padding of every call; a `text_layer` that contradicts it is an error,
        and so is a text model of another architecture than the run's (`force_text_model`: use
        it all the same).
        sur: a SUR-adapter (`load_sur_adapter`, or a training work directory; `sur_mode`
        "official": its encoder attends over the batch, as released; "fixed": over tokens; None:
        as the file stores, else official).
        `dtype` is the UNet, VAE, CLIP, ELLA and SUR compute and parameter dtype; `t5_dtype`
        defaults to float32 in a float32 pipeline and to float16 otherwise, the dtype ELLA's
        features were trained on. `scheduler`: "dpm", "ddim" or "euler" overrides the folder's
        scheduler class. `mesh`: shard the parameters and the batch over it."""
        sd = storage.reachable(sd)
        trained = None
        if ella is not None and t5 is None:
            raise ValueError(f"{ella}: ELLA reads text features: give the T5 or LLM folder (t5=)")
        if ella is not None:
            ella = checkpoint_in(ella)
            trained = trained_with(ella)
        if sur is not None:
            sur = checkpoint_in(sur, "sur")
        if trained is not None:
            if text_layer is not None and text_layer != trained.text_layer:
                raise CheckpointError(
                    f"text_layer={text_layer}, but {trained.source} trained the connector on "
                    f"layer {trained.text_layer} (None: the last)"
                )
            text_layer = trained.text_layer
            if not force_text_model:
                check_text_model(trained, t5)
        dtype = jnp.dtype(dtype)
        t5_dtype = jnp.dtype(t5_dtype or (jnp.float32 if dtype == jnp.float32 else jnp.float16))
        unet, unet_params = load_unet(sd / "unet", dtype)
        # SDXL's VAE overflows in float16 (diffusers upcasts it when its config says
        # force_upcast): it then decodes in float32.
        upcast = read_json(sd / "vae" / "config.json").get("force_upcast", False)
        vae_dtype = jnp.float32 if upcast and dtype == jnp.float16 else dtype
        vae, vae_params = load_vae(sd / "vae", vae_dtype)
        clip, clip_params = load_clip_text_encoder(sd / "text_encoder", dtype)
        modules = dict(unet=unet, vae=vae, clip=clip)
        params = dict(unet=unet_params, vae=vae_params, clip=clip_params)
        tokenizers = dict(clip=load_tokenizer(sd / "tokenizer"))
        zeros = False
        if is_sdxl(sd):
            modules["clip_2"], params["clip_2"], zeros = load_sdxl_text_encoder_2(sd, dtype)
            tokenizers["clip_2"] = load_tokenizer(sd / "tokenizer_2")
        if t5 is not None:
            modules["t5"], params["t5"] = load_text_model(t5, t5_dtype, text_layer)
            tokenizers["t5"] = load_tokenizer(t5)
        adapters = [("ella", ella, load_ella, dict(heads=ella_heads))]
        adapters.append(("sur", sur, load_sur_adapter, dict(mode=sur_mode)))
        for name, path, load, options in adapters:
            if path is None:
                continue
            modules[name], params[name] = load(path, **options, dtype=dtype, param_dtype=dtype)
            if name == "ella" and modules["ella"].input_dim != modules["t5"].width:
                raise CheckpointError(
                    f"{path}: ELLA reads features of width {modules['ella'].input_dim}, but "
                    f"{t5} gives {modules['t5'].width}"
                )
            if modules[name].width != unet.config.cross_attention_dim:
                raise CheckpointError(
                    f"{path}: {name} width {modules[name].width} is not the UNet's "
                    f"cross_attention_dim {unet.config.cross_attention_dim} ({sd / 'unet'})"
                )
        scheduler_config = read_config(
            sd / "scheduler" / "scheduler_config.json",
            functools.partial(SchedulerConfig.from_dict, kind=scheduler),
        )
        return cls(modules, params, tokenizers, scheduler_config, mesh, zeros, trained)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side: 2 ** (the VAE's levels - 1)."""
        return 2 ** (len(self.modules["vae"].config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """Pixels of an image's side when none is asked for: the UNet's sample_size times the
        VAE's scale factor, as diffusers."""
        return self.modules["unet"].config.sample_size * self.vae_scale_factor

    def encode_prompt(
        self, prompts: list[str] | str, token_length: Literal["fixed", "flexible"] | None = None
    ) -> tuple[jax.Array, np.ndarray]:
        """Text features (B, L, width) and token mask (B, L) bool. "fixed": padded and truncated
        to 128 tokens (or the token length the connector's run trained with; the connector sees
        all of them, as in the reference); "flexible": each prompt's own tokens, the batch
        padded and the padding masked. None: the run's ("flexible" where it masked padding),
        else "fixed"."""
        token_length = token_length or self.token_length
        if token_length not in ("fixed", "flexible"):
            raise ValueError(f"token_length={token_length!r}: use 'fixed' or 'flexible'")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = self.fixed_token_length if token_length == "fixed" else None
        ids, mask = tokenize(self.tokenizers["t5"], prompts, max_length)
        features = self._t5(self.params["t5"], ids, mask)
        # In the fixed mode the reference connector attends to every position, padding included.
        return features, (np.ones_like(mask) if token_length == "fixed" else mask)

    def encode_clip(self, prompts: list[str]) -> jax.Array:
        """CLIP's last hidden state (B, 77, C) for the plain-SD and ELLA+CLIP modes."""
        ids, _ = tokenize(
            self.tokenizers["clip"], prompts, self.modules["clip"].config.max_position_embeddings
        )
        return self._clip(self.params["clip"], ids)

    def encode_sdxl(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
        """SDXL's CLIP context (B, 77, C1 + C2), both encoders' penultimate hidden states
        concatenated, and the second encoder's projected pooled embedding (B, P)."""
        ids = [
            tokenize(
                self.tokenizers[name], prompts, self.modules[name].config.max_position_embeddings
            )[0]
            for name in ("clip", "clip_2")
        ]
        return self._sdxl(self.params["clip"], self.params["clip_2"], *ids)

    def conditioning(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        token_length: Literal["fixed", "flexible"] | None,
        mode: Mode,
        clip_prompts: list[str] | None = None,
    ) -> tuple[TextConditioning, TextConditioning]:
        """(cond, uncond) for `sample_latents`; prompts and negatives are encoded together, so
        they share one padded token length. `negative_prompts` None: the empty prompt, or for an
        SDXL folder with `force_zeros_for_empty_prompt`, zeros for the negative CLIP context and
        pooled embedding (ELLA still reads the empty prompt's features), as diffusers does."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        needs = {"ella": "ella", "ella+clip": "ella", "sur": "sur"}.get(mode)
        if needs is not None and needs not in self.modules:
            raise ValueError(f"mode={mode!r}: the pipeline was built without {needs}=")
        batch = len(prompts)
        sdxl = "clip_2" in self.modules
        zeros = negative_prompts is None and sdxl and self.force_zeros_for_empty_prompt
        negative_prompts = [""] * batch if negative_prompts is None else negative_prompts
        parts: dict[str, tuple] = {}
        if mode in ("ella", "ella+clip"):
            features, mask = self.encode_prompt(negative_prompts + prompts, token_length)
            parts.update(
                t5_features=(features[:batch], features[batch:]),
                token_mask=(mask[:batch], mask[batch:]),
            )
        if sdxl:
            context, pooled = self.encode_sdxl(negative_prompts + (clip_prompts or prompts))
            parts.update(pooled=(pooled[:batch], pooled[batch:]))
            if mode != "ella":
                parts.update(clip_context=(context[:batch], context[batch:]))
        elif mode != "ella":
            context = self.encode_clip(negative_prompts + (clip_prompts or prompts))
            parts.update(clip_context=(context[:batch], context[batch:]))
        if zeros:
            parts = {
                k: (jnp.zeros_like(v[0]), v[1]) if k in ("clip_context", "pooled") else v
                for k, v in parts.items()
            }
        uncond = TextConditioning(**{k: v[0] for k, v in parts.items()})
        cond = TextConditioning(**{k: v[1] for k, v in parts.items()})
        return cond, uncond

    def __call__(
        self,
        prompts: list[str] | str,
        negative_prompt: list[str] | str | None = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 12.0,
        token_length: Literal["fixed", "flexible"] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | jax.Array | None = None,
        seed: int = 0,
        output_type: Literal["pil", "np", "latent"] = "pil",
        mode: Mode = "ella",
        clip_prompts: list[str] | None = None,
        sur_dropout: bool = False,
    ):
        """Generates one image per prompt. `negative_prompt` None: the empty prompt, or zeros
        for an SDXL folder that forces them (see `conditioning`); SDXL's time ids are (height,
        width, 0, 0, height, width). `token_length` None: the connector's run's (see
        `encode_prompt`); `height`, `width` None: `default_size`. `latents` (B, h, w, C) NHWC
        is the initial noise (default: normal noise from `seed`). output_type "np": (B, H, W,
        3) floats in [0, 1]; "latent": the final NHWC latents; "pil": a list of PIL images.
        `clip_prompts` gives CLIP other prompts than T5 (ELLA+CLIP: tags for CLIP, the sentence
        for T5). `sur_dropout`: the SUR-adapter's dropout on (drawn from `seed`), as the
        official demo leaves it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height, width = height or self.default_size, width or self.default_size
        if num_inference_steps < 1 or not math.isfinite(guidance_scale):
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be at least 1 and "
                f"guidance_scale={guidance_scale} finite"
            )
        if negative_prompt is None:
            negatives = None
        else:
            negatives = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        cond, uncond = self.conditioning(prompts, negatives, token_length, mode, clip_prompts)
        if cond.pooled is not None:  # SDXL: original size, crop top-left, target size
            time_ids = sdxl_time_ids(height, width, len(prompts))
            cond, uncond = cond._replace(time_ids=time_ids), uncond._replace(time_ids=time_ids)

        vae_config = self.modules["vae"].config
        factor = self.vae_scale_factor
        if latents is None:
            shape = (len(prompts), height // factor, width // factor, vae_config.latent_channels)
            latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        schedule = make_schedule(self.scheduler, num_inference_steps)
        latents = initial_latents(schedule, jnp.asarray(latents, jnp.float32))
        if self.mesh is not None:
            latents, cond, uncond = shard_batch(self.mesh, (latents, cond, uncond))
        params = {"unet": self.params["unet"]}
        if mode in ("ella", "ella+clip", "sur"):
            adapter = "sur" if mode == "sur" else "ella"
            params[adapter] = self.params[adapter]
        latents = self._sample(
            params,
            schedule,
            self.scheduler.prediction_type,
            latents,
            cond,
            uncond,
            jnp.float32(guidance_scale),
            jax.random.fold_in(jax.random.key(seed), 1) if sur_dropout else None,
        )
        if output_type == "latent":
            return latents
        scaled = latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)
        images = self._decode(self.params["vae"], scaled)
        images = np.asarray(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(np.round(255 * image).astype(np.uint8)) for image in images]
