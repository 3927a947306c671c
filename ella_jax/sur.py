"""SUR-adapter's training losses: the official distillation KL and the course project's cosine.

The adapter (`ella_jax.models.sur_adapter`) is trained with the denoising MSE plus
`lambda_llm * L(W0 f_LLM, encoder_out) + lambda_cp * L(CLIP(complex prompt), out)`, L one of these.
"""

import jax
import jax.numpy as jnp


def distillation_kl(x: jax.Array, y: jax.Array, temperature: float = 1.0) -> jax.Array:
    """KL(softmax(y / T) || softmax(x / T)) * T^2, softmax over the last axis, summed over every
    position and feature and divided by the batch: the official training script's
    `kl_div(log_softmax(x), softmax(y), reduction="batchmean")`. x (B, 1 or N, W) broadcasts
    against y (B, N, W); the gradient reaches both. Returns a float32 scalar."""
    log_p = jax.nn.log_softmax(x.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(y.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.exp(log_q) * (log_q - log_p)
    return jnp.sum(kl) / x.shape[0] * temperature**2


def cosine_loss(a: jax.Array, b: jax.Array) -> jax.Array:
    """The course project's loss: the batch mean of 1 - cos(mean of a's tokens, mean of b's).
    a (B, N or 1, W), b (B, M, W) -> a float32 scalar."""
    a = jnp.mean(a.astype(jnp.float32), axis=1)
    b = jnp.mean(b.astype(jnp.float32), axis=1)
    norms = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)
    return jnp.mean(1 - jnp.sum(a * b, axis=-1) / norms)
