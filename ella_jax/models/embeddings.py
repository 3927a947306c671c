"""Diffusion timestep embeddings, as diffusers' `Timesteps` and `TimestepEmbedding` compute them."""

import math

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


def timestep_features(
    timesteps: jnp.ndarray,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jnp.ndarray:
    """Sinusoidal features of timesteps (B,) -> (B, dim), in float32.

    freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)); features = [sin(t f), cos(t f)], or
    [cos, sin] with `flip_sin_to_cos` (what ELLA and SD use).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


class TimestepEmbedding(nn.Module):
    """`linear_1`, SiLU, `linear_2`: (..., time_channel) -> (..., time_embed_dim)."""

    time_embed_dim: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = nn.silu(nn.Dense(self.time_embed_dim, name="linear_1", **dense)(features))
        return nn.Dense(self.time_embed_dim, name="linear_2", **dense)(hidden)
