"""Attention: the one function every model here calls, and diffusers' `Attention` module.

`jax.nn.dot_product_attention` picks the implementation on TPU (XLA) and NVIDIA GPUs (cuDNN flash
attention where the shapes and dtype allow it). On the CPU, where XLA would materialise every
(B, H, T, S) score of the UNet's self-attention, `blocked_attention` runs instead.
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
    if jax.default_backend() != "cpu":
        out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale)
        return out.astype(dtype)
    if dtype == jnp.float16:
        # XLA:CPU has no float16 dot with float32 accumulation, which the attention asks for.
        query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
        bias = None if bias is None else bias.astype(jnp.float32)
    return blocked_attention(query, key, value, mask, bias, scale).astype(dtype)


@jax.named_scope("blocked_attention")  # names its ops in profiles
def blocked_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    mask: jnp.ndarray | None,
    bias: jnp.ndarray | None,
    scale: float | None,
    block: int = 128,
) -> jnp.ndarray:
    """`dot_product_attention` for the CPU: heads-first matmuls, the softmax normalised after
    the product with the values, and for T >= 4 * block a `lax.map` over blocks of `block`
    queries, so that a block's scores (B, H, block, S) stay in cache. mask, bias broadcastable
    to (B, H, T, S). 1.2x on SD 1.5's UNet at 256 px (BENCHMARKS.md)."""
    batch, length, heads, dim = query.shape
    scale = dim**-0.5 if scale is None else scale
    q = jnp.swapaxes(query * jnp.asarray(scale, query.dtype), 1, 2)  # (B, H, T, D)
    k_t = jnp.transpose(key, (0, 2, 3, 1))  # (B, H, D, S)
    v = jnp.swapaxes(value, 1, 2)  # (B, H, S, D)

    def attend(q_block: jnp.ndarray, bias_block: jnp.ndarray | None) -> jnp.ndarray:
        scores = jnp.matmul(q_block, k_t, preferred_element_type=jnp.float32)
        if bias_block is not None:
            scores = scores + bias_block
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jnp.exp(scores - scores.max(-1, keepdims=True))
        out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out / weights.sum(-1, keepdims=True)

    if bias is not None or length < 4 * block or length % block:
        out = attend(q, bias)
    else:
        blocks = jnp.moveaxis(q.reshape(batch, heads, length // block, block, dim), 2, 0)
        out = jax.lax.map(lambda q_block: attend(q_block, None), blocks)
        out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, length, dim)
    return jnp.swapaxes(out, 1, 2)


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
