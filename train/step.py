"""The train step: a pure function of (trained state, frozen params, batch).

Frozen T5 and VAE give text features and latents; noise and a uniform timestep give the noisy
latents; ELLA(features, t) is the frozen UNet's context; the loss is the MSE to the noise (or to
v), over valid images only. Gradients reach the ELLA params alone.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ella_jax.schedulers import add_noise, snr, velocity


@flax.struct.dataclass
class TrainState:
    """Everything that trains and is checkpointed (the frozen models are not in it)."""

    step: jax.Array  # int32 ()
    params: Any  # ELLA, float32 master weights
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # uint32 (2,), raw key data


class Models(NamedTuple):
    t5: nn.Module
    vae: nn.Module
    unet: nn.Module
    ella: nn.Module


class StepConfig(NamedTuple):
    """The static settings of the step (from the training config and the model folders)."""

    prediction_type: str  # "epsilon" or "v_prediction", from the UNet's scheduler config
    scaling_factor: float
    shift_factor: float
    ema_decay: float
    min_snr_gamma: float  # 0: plain MSE
    mask_padding: bool  # ELLA ignores padded T5 tokens (False: attends all 128, as the reference)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """The state at step 0 around freshly initialised ELLA params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def make_denoising_loss(
    models: Models, alphas_cumprod: jax.Array, prediction_type: str
) -> Callable[..., jax.Array]:
    """per_example_loss(ella_params, unet_params, t5_features, token_mask, latents, noise,
    timesteps) -> (B,) float32: the MSE of the frozen UNet's prediction, conditioned on
    ELLA(t5_features, timesteps, token_mask), to the noise (or to v) of `latents` noised to
    `timesteps`. t5_features (B, T, D), token_mask (B, T) bool or None (every token attended),
    latents and noise (B, h, w, c) scaled as the UNet takes them, timesteps (B,) int."""

    def per_example_loss(
        ella_params: Any,
        unet_params: Any,
        t5_features: jax.Array,
        token_mask: jax.Array | None,
        latents: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
    ) -> jax.Array:
        noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
        if prediction_type == "v_prediction":
            target = velocity(alphas_cumprod, latents, noise, timesteps)
        else:
            target = noise
        context = models.ella.apply({"params": ella_params}, t5_features, timesteps, token_mask)
        prediction = models.unet.apply({"params": unet_params}, noisy, timesteps, context)
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(1, 2, 3))

    return per_example_loss


def loss_weights(
    alphas_cumprod: jax.Array,
    timesteps: jax.Array,
    valid: jax.Array,
    min_snr_gamma: float,
    prediction_type: str,
) -> jax.Array:
    """(B,) float32 weights of the per-example losses: 0 for an invalid image; with
    min_snr_gamma > 0, min(SNR, gamma) / SNR for epsilon targets and / (SNR + 1) for v targets
    (min-SNR weighting as diffusers' train_text_to_image.py computes it). timesteps (B,) int,
    valid (B,) float32."""
    if min_snr_gamma <= 0:
        return valid
    ratio = snr(alphas_cumprod, timesteps)
    divisor = ratio + 1 if prediction_type == "v_prediction" else ratio
    return valid * jnp.minimum(ratio, min_snr_gamma) / divisor


def make_train_step(
    models: Models,
    optimizer: optax.GradientTransformation,
    alphas_cumprod: jax.Array,
    config: StepConfig,
) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """train_step(state, frozen {"t5", "vae", "unet"}, batch) -> (state, metrics). batch:
    "valid" (B,), "token_mask" (B, T), and either "image" (B, R, R, 3) in [-1, 1] and
    "input_ids" (B, T) (the frozen VAE and T5 run here) or their precomputed outputs
    "latent_mean", "latent_logvar" (B, h, w, c) and "t5_features" (B, T, D). metrics: "loss",
    "grad_norm", "skipped" (invalid images), "finite" (False: the loss, the gradient or the
    update was not finite, and the state was left as it was)."""
    per_example_loss = make_denoising_loss(models, alphas_cumprod, config.prediction_type)

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        rng, latent_rng, noise_rng, time_rng = jax.random.split(
            jax.random.wrap_key_data(state.rng), 4
        )
        if "t5_features" in batch:
            features = batch["t5_features"]
        else:
            t5_params = {"params": frozen["t5"]}
            features = models.t5.apply(t5_params, batch["input_ids"], batch["token_mask"])
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            vae_params = {"params": frozen["vae"]}
            mean, logvar = models.vae.apply(vae_params, batch["image"], method="encode")
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(latent_rng, mean.shape)
        latents = (latents - config.shift_factor) * config.scaling_factor
        noise = jax.random.normal(noise_rng, latents.shape)
        batch_size = latents.shape[0]
        timesteps = jax.random.randint(time_rng, (batch_size,), 0, alphas_cumprod.shape[0])
        valid = batch["valid"].astype(jnp.float32)
        weight = loss_weights(
            alphas_cumprod, timesteps, valid, config.min_snr_gamma, config.prediction_type
        )
        ella_mask = batch["token_mask"] if config.mask_padding else None
        features = jax.lax.stop_gradient(features)

        def loss_fn(params: Any) -> jax.Array:
            per_example = per_example_loss(
                params, frozen["unet"], features, ella_mask, latents, noise, timesteps
            )
            return jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(valid), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(
            lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, state.ema_params, params
        )
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        # A non-finite step leaves the trained state as it was: no state with a NaN in it exists
        # to be saved (the trainer stops on `finite`).
        kept = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            state.step + 1,
            kept(params, state.params),
            kept(ema_params, state.ema_params),
            kept(opt_state, state.opt_state),
            jax.random.key_data(rng),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "skipped": batch_size - jnp.sum(valid),
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    weight_decay: float,
    grad_clip: float,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then a constant or cosine learning rate, after global-norm
    gradient clipping (0: none). Returns (optimizer, learning-rate schedule)."""
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"lr_schedule={schedule!r}: use 'constant' or 'cosine'")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    lr = optax.join_schedules([warmup, after], [warmup_steps]) if warmup_steps else after
    clip = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    return optax.chain(*clip, optax.adamw(lr, weight_decay=weight_decay)), lr
