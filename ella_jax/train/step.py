"""The train step: a pure function of (trained state, frozen params, batch).

The frozen VAE gives latents; noise and a uniform timestep give the noisy latents; a method's
`Conditioner` gives the frozen UNet's context from the batch's text and the trained params
(ELLA: ELLA(T5 features, t); SUR-adapter: the adapter on CLIP's output, `train.sur`) and any
loss of its own; the loss is the MSE to the noise (or to v) over valid images, plus the
method's. Gradients reach the trained params alone.
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
    params: Any  # the trained model's (ELLA or SUR-adapter), float32 master weights
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # uint32 (2,), raw key data


class Models(NamedTuple):
    text: Callable  # a TextModel (ella_jax.weights.text_model): (params, ids, mask) -> features
    vae: nn.Module
    unet: nn.Module
    ella: nn.Module


class Conditioner(NamedTuple):
    """How a method conditions the UNet. encode(frozen, batch) -> text: the frozen text models'
    outputs (no gradient); condition(params, frozen, text, timesteps, rng) -> (context
    (B, N, C), extra loss (a float32 scalar added to the MSE), extra metrics {name: scalar});
    added(frozen, batch) -> the UNet's added conditions (SDXL's pooled embedding and time ids,
    as keyword arguments; no gradient), None for none."""

    encode: Callable[[dict, dict], Any]
    condition: Callable[..., tuple[jax.Array, jax.Array, dict]]
    added: Callable[[dict, dict], dict] | None = None


def ella_conditioner(
    models: "Models", mask_padding: bool, sdxl: bool = False, clip_2: nn.Module | None = None
) -> Conditioner:
    """ELLA's: text features (precomputed, or the frozen text model on the batch's tokens) and
    ELLA(features, t, token_mask) as the context (the mask: when `mask_padding`). `sdxl`: the
    UNet's added conditions are the batch's precomputed "pooled" embedding (or SDXL's second
    CLIP encoder `clip_2`'s projected pooled embedding of its "clip_2_ids") and its "time_ids"."""

    def encode(frozen: dict, batch: dict) -> tuple[jax.Array, jax.Array | None]:
        if "t5_features" in batch:
            features = batch["t5_features"]
        else:
            features = models.text(frozen["text"], batch["input_ids"], batch["token_mask"])
        return features, batch["token_mask"] if mask_padding else None

    def condition(params, frozen, text, timesteps, rng):
        features, token_mask = text
        context = models.ella.apply({"params": params}, features, timesteps, token_mask)
        return context, jnp.zeros((), jnp.float32), {}

    def added(frozen: dict, batch: dict) -> dict:
        if "pooled" in batch:  # precomputed
            pooled = batch["pooled"]
        else:
            pooled = clip_2.apply({"params": frozen["clip_2"]}, batch["clip_2_ids"], True)[1]
        return dict(added_text_embeds=pooled, added_time_ids=batch["time_ids"])

    return Conditioner(encode, condition, added if sdxl else None)


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

    mse = make_denoising_mse(models.unet, alphas_cumprod, prediction_type)

    def per_example_loss(
        ella_params: Any,
        unet_params: Any,
        t5_features: jax.Array,
        token_mask: jax.Array | None,
        latents: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
    ) -> jax.Array:
        context = models.ella.apply({"params": ella_params}, t5_features, timesteps, token_mask)
        return mse(unet_params, context, latents, noise, timesteps)

    return per_example_loss


def make_denoising_mse(
    unet: nn.Module, alphas_cumprod: jax.Array, prediction_type: str
) -> Callable[..., jax.Array]:
    """mse(unet_params, context, latents, noise, timesteps, added=None) -> (B,) float32: the MSE
    of the frozen UNet's prediction on `latents` noised to `timesteps`, given `context` (and
    the `added` conditions, SDXL's), to the noise (or to v). latents and noise (B, h, w, c)
    scaled as the UNet takes them."""

    def mse(unet_params, context, latents, noise, timesteps, added=None):
        noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
        if prediction_type == "v_prediction":
            target = velocity(alphas_cumprod, latents, noise, timesteps)
        else:
            target = noise
        prediction = unet.apply({"params": unet_params}, noisy, timesteps, context, **(added or {}))
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(1, 2, 3))

    return mse


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
    conditioner: Conditioner | None = None,
) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """train_step(state, frozen {"vae", "unet", + the method's}, batch) -> (state, metrics).
    batch: "valid" (B,), either "image" (B, R, R, 3) in [-1, 1] (the frozen VAE runs here) or
    its precomputed "latent_mean", "latent_logvar" (B, h, w, c), and the text the conditioner
    reads (default ELLA's: "token_mask" (B, T) and "input_ids" (B, T) or "t5_features"
    (B, T, D)). metrics: "loss", "grad_norm", "skipped" (invalid images), "finite" (False: the
    loss, the gradient or the update was not finite, and the state was left as it was), and
    the conditioner's."""
    conditioner = conditioner or ella_conditioner(models, config.mask_padding)
    mse = make_denoising_mse(models.unet, alphas_cumprod, config.prediction_type)

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        rng, latent_rng, noise_rng, time_rng = jax.random.split(
            jax.random.wrap_key_data(state.rng), 4
        )
        condition_rng = jax.random.fold_in(time_rng, 1)  # ELLA's draws stay what they were
        text = jax.lax.stop_gradient(conditioner.encode(frozen, batch))
        added = conditioner.added and jax.lax.stop_gradient(conditioner.added(frozen, batch))
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

        def loss_fn(params: Any) -> tuple[jax.Array, dict]:
            context, extra_loss, extra_metrics = conditioner.condition(
                params, frozen, text, timesteps, condition_rng
            )
            per_example = mse(frozen["unet"], context, latents, noise, timesteps, added)
            loss = jnp.sum(weight * per_example) / jnp.maximum(jnp.sum(valid), 1.0)
            return loss + extra_loss, extra_metrics

        (loss, extra_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
            **extra_metrics,
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
    accumulation: int = 1,
    trainable: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then a constant or cosine learning rate, after global-norm
    gradient clipping (0: none). `accumulation` > 1: the gradients of that many steps are
    averaged into one update (the steps between leave the params as they are, while the EMA
    still moves at every step); the schedule counts updates. `trainable(params)` -> a tree of
    bools: the others are never updated (nor decayed). Returns (optimizer, learning-rate
    schedule of the step)."""
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        updates = max(total_steps // accumulation - warmup_steps, 1)
        after = optax.cosine_decay_schedule(learning_rate, updates)
    else:
        raise ValueError(f"lr_schedule={schedule!r}: use 'constant' or 'cosine'")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    lr = optax.join_schedules([warmup, after], [warmup_steps]) if warmup_steps else after
    clip = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    optimizer = optax.chain(*clip, optax.adamw(lr, weight_decay=weight_decay))
    if trainable is not None:
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda t: "trained" if t else "frozen", trainable(params)
        )
        optimizer = optax.multi_transform(
            {"trained": optimizer, "frozen": optax.set_to_zero()}, labels
        )
    if accumulation > 1:
        optimizer = optax.MultiSteps(optimizer, accumulation)
    return optimizer, lambda step: lr(step // accumulation)
