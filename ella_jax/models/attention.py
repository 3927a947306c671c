"""Attention: the one function every model here calls, and diffusers' `Attention` module.

`jax.nn.dot_product_attention` picks the backend: XLA on CPU and TPU, cuDNN flash attention on
NVIDIA GPUs where the shapes and dtype allow it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


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
    dtype = query.dtype
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA:CPU has no float16 dot with float32 accumulation, which the attention asks for.
        query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
        bias = None if bias is None else bias.astype(jnp.float32)
    out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale)
    return out.astype(dtype)


class Attention(nn.Module):
    """diffusers' `Attention`: `to_q`, `to_k`, `to_v`, `to_out.0` over token sequences.

    Self-attention when `context` is None. `upcast` computes the attention in float32 (SD 2.x's
    `upcast_attention`, the VAE's `upcast_softmax`). `norm_groups` GroupNorms the input first
    (`group_norm`, as in the VAE's mid-block attention).
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast: bool = False
    norm_groups: int | None = None
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        """x (B, T, C), context (B, S, C_ctx) or None -> (B, T, C)."""
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.norm_groups is not None:
            x = nn.GroupNorm(self.norm_groups, epsilon=1e-6, name="group_norm", **kw)(x)
        context = x if context is None else context
        heads = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)  # noqa: E731
        q = heads(nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x))
        k = heads(nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context))
        v = heads(nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context))
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = dot_product_attention(q, k, v).astype(self.dtype)
        return nn.Dense(x.shape[-1], name="to_out.0", **kw)(out.reshape(*out.shape[:2], inner))
