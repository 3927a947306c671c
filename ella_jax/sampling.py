"""The sampler: a `lax.scan` over the scheduler's steps, ELLA re-run at every step.

One batched UNet call per step does classifier-free guidance: the batch is [unconditional;
conditional], as diffusers orders it. The UNet's context is, per step:
- ELLA: `ELLA(t5_features, t, token_mask)` (B, 64, 768), recomputed with that step's timestep;
- ELLA + CLIP: ELLA's tokens then CLIP's (B, 64 + 77, 768), the order of the authors' ComfyUI node;
- CLIP: CLIP's (B, 77, 768) alone, plain Stable Diffusion, for side-by-side comparisons;
- SUR-adapter: CLIP's, adapted once before the steps (`adapt_clip_context`).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ella_jax.models.ella import ELLA
from ella_jax.models.unet import UNet2DConditionModel
from ella_jax.schedulers import Schedule, scale_model_input, step


class TextConditioning(NamedTuple):
    """What the prompts give the UNet; leave out what the mode does not use.

    t5_features (B, L, D) and token_mask (B, L) bool feed ELLA; clip_context (B, 77, C) is the
    CLIP text encoder's last hidden state (SDXL: both encoders' penultimate, concatenated);
    SDXL's added conditions: pooled (B, P), the second encoder's projected pooled embedding, and
    time_ids (B, 6) (original size, crop top-left, target size).
    """

    t5_features: jax.Array | None = None
    token_mask: jax.Array | None = None
    clip_context: jax.Array | None = None
    pooled: jax.Array | None = None
    time_ids: jax.Array | None = None


def sdxl_time_ids(height: int, width: int, count: int) -> np.ndarray:
    """(count, 6) float32 SDXL time ids of an uncropped image generated at its own size:
    original size, crop top-left (0, 0), target size."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (count, 1))


def adapt_clip_context(
    adapter: nn.Module,
    adapter_params: dict,
    cond: TextConditioning,
    uncond: TextConditioning,
    dropout_rng: jax.Array | None = None,
) -> tuple[TextConditioning, TextConditioning]:
    """(cond, uncond) with CLIP's context replaced by the SUR-adapter's output, the adapter run
    once on [uncond; cond] as the official pipeline runs it (the official adapter's batch-axis
    attention then mixes them; the fixed one adapts each prompt alone). With `dropout_rng` the
    adapter's dropout is on, as the official demo leaves it. Jittable."""
    count = uncond.clip_context.shape[0]
    both = jnp.concatenate([uncond.clip_context, cond.clip_context], axis=0)
    if dropout_rng is None:
        adapted = adapter.apply({"params": adapter_params}, both)[0]
    else:
        rngs = {"dropout": dropout_rng}
        adapted = adapter.apply({"params": adapter_params}, both, False, rngs=rngs)[0]
    return cond._replace(clip_context=adapted[count:]), uncond._replace(
        clip_context=adapted[:count]
    )


def _both(uncond: jax.Array | None, cond: jax.Array | None) -> jax.Array | None:
    return None if cond is None else jnp.concatenate([uncond, cond], axis=0)


def sample_latents(
    unet: UNet2DConditionModel,
    ella: ELLA | None,
    params: dict,
    schedule: Schedule,
    prediction_type: str,
    latents: jax.Array,
    cond: TextConditioning,
    uncond: TextConditioning,
    guidance_scale: jax.Array | float,
) -> jax.Array:
    """Denoises `latents` (B, h, w, C) NHWC, already scaled by `schedule.init_noise_sigma`,
    through every step of `schedule`; returns the final latents (B, h, w, C) in float32.

    params: {"unet": ..., "ella": ...} ("ella" only when cond.t5_features is given). `cond` and
    `uncond` must have the same shapes (pad both prompts' tokens together). Pure and jittable:
    `jax.jit(sample_latents, static_argnums=(0, 1, 4))`.
    """
    t5_features = _both(uncond.t5_features, cond.t5_features)
    token_mask = _both(uncond.token_mask, cond.token_mask)
    clip_context = _both(uncond.clip_context, cond.clip_context)
    added = {}
    if cond.pooled is not None:  # SDXL
        added = dict(
            added_text_embeds=_both(uncond.pooled, cond.pooled).astype(unet.dtype),
            added_time_ids=_both(uncond.time_ids, cond.time_ids),
        )
    if t5_features is None and clip_context is None:
        raise ValueError("conditioning has neither T5 features (ELLA) nor a CLIP context")

    def context(timestep: jax.Array) -> jax.Array:
        parts = []
        if t5_features is not None:
            ella_params = {"params": params["ella"]}
            parts.append(ella.apply(ella_params, t5_features, timestep, token_mask))
        if clip_context is not None:
            parts.append(clip_context.astype(unet.dtype))
        return jnp.concatenate(parts, axis=1)

    def denoise(carry: tuple[jax.Array, jax.Array], i: jax.Array):
        x, previous_x0 = carry
        timestep = schedule.timesteps[i]
        x_in = scale_model_input(schedule, i, x).astype(unet.dtype)
        prediction = unet.apply(
            {"params": params["unet"]},
            jnp.concatenate([x_in, x_in]),
            timestep,
            context(timestep),
            **added,
        ).astype(jnp.float32)
        unconditional, conditional = jnp.split(prediction, 2)
        guided = unconditional + guidance_scale * (conditional - unconditional)
        return step(schedule, i, x, guided, previous_x0, prediction_type), None

    x = latents.astype(jnp.float32)
    steps = jnp.arange(schedule.timesteps.shape[0])
    (x, _), _ = jax.lax.scan(denoise, (x, jnp.zeros_like(x)), steps)
    return x
