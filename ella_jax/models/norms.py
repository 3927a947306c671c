"""RMS normalisation, the norm of T5 and of the Llama family (both checkpoints call its scale
`weight`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class RMSNorm(nn.Module):
    """x / rms(x) * scale, no bias, statistics in float32; the normalised value is cast to
    `dtype` before the scale, as transformers does."""

    epsilon: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
        return scale.astype(self.dtype) * normed
