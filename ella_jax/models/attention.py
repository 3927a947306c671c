"""The one attention function every model here calls.

`jax.nn.dot_product_attention` picks the backend: XLA on CPU and TPU, cuDNN flash attention on
NVIDIA GPUs where the shapes and dtype allow it.
"""

import jax
import jax.numpy as jnp


def dot_product_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    key_mask: jnp.ndarray | None = None,
    bias: jnp.ndarray | None = None,
    scale: float | None = None,
) -> jnp.ndarray:
    """softmax(scale * q k^T + bias) v over heads.

    query (B, T, H, D); key, value (B, S, H, D); key_mask (B, S) bool, True where a key may be
    attended; bias broadcastable to (B, H, T, S); scale defaults to 1/sqrt(D).
    Returns (B, T, H, D).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale)
