"""Attention: the one function every model here calls, and diffusers' `Attention` module.

Which implementation runs (`choose_attention`) depends on the kernel path (`ella_jax.kernels`),
the device, the dtype and the shapes:

- `cpu` kernels: `blocked_attention` always (faster than XLA:CPU's own, BENCHMARKS.md).
- `accelerator` kernels: cuDNN flash attention (`jax.nn.dot_product_attention(...,
  implementation="cudnn")`) on NVIDIA GPUs from Ampere on (compute capability 8.0) where its
  limits hold: float16 or bfloat16, a head dim that is a multiple of 8 and at most 128 (256
  from Hopper, 9.0), no bias and no mask (cuDNN would take them as a (B, H, T, S) bias and
  compute its gradient; the masked attentions here, ELLA's over padded tokens and T5's, are
  short). Elsewhere XLA's implementation (`implementation="xla"`, which materialises the
  (B, H, T, S) scores) for queries shorter than `LONG`, and `blocked_attention`, whose memory
  does not grow with T x S, from `LONG` on. SD 1.5 at 512 px on a Hopper GPU in bfloat16 runs
  every UNet attention in cuDNN; on an Ampere GPU the head dim 160 of its third level (256
  tokens) takes XLA's; in float32, with `upcast`, in the VAE (one head of 512) and on TPUs,
  attention over 1024 tokens or more is blocked.
- `reference` kernels: XLA's implementation always (FLOP counting, `ella_jax.flops`).

Dot inputs the backend cannot multiply into float32 are computed in float32 (float16 on CPUs
and TPUs, bfloat16 on GPUs older than Ampere): XLA's implementation asks for exactly those dot
algorithms (F16_F16_F32, BF16_BF16_F32), which fail to compile where they are missing.
"""

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.kernels import (
    KernelPath,
    compiling_for_another_platform,
    kernel_path,
    target_platform,
)

LONG = 1024  # queries from which the accelerator path never holds the full scores
CPU_BLOCK = 128  # queries per block on the CPU: a block's scores stay in cache
Implementation = Literal["cudnn", "xla", "blocked"]


def choose_attention(
    path: KernelPath,
    platform: str,
    compute_capability: tuple[int, int] | None,
    dtype: DTypeLike,
    head_dim: int,
    queries: int,
    masked: bool,
) -> Implementation:
    """The implementation for one attention call (module docstring). platform: "cpu", "gpu"
    or "tpu"; compute_capability: an NVIDIA GPU's (major, minor), else None; dtype: the one the
    dots take (`dot_dtype`); masked: a bias or key mask is added to the scores."""
    if path == "reference":
        return "xla"
    if path == "cpu":
        return "blocked"
    if (
        platform == "gpu"
        and compute_capability is not None
        and compute_capability >= (8, 0)
        and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= (256 if compute_capability >= (9, 0) else 128)
        and not masked
    ):
        return "cudnn"
    return "blocked" if queries >= LONG else "xla"


def dot_dtype(
    dtype: DTypeLike, platform: str, compute_capability: tuple[int, int] | None
) -> jnp.dtype:
    """The dtype attention's dots take inputs in: `dtype`, or float32 where the backend has no
    float32-accumulating dot for it (module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16 and platform in ("cpu", "tpu"):
        return jnp.dtype(jnp.float32)
    if dtype == jnp.bfloat16 and compute_capability is not None and compute_capability < (8, 0):
        return jnp.dtype(jnp.float32)
    return dtype


def _device() -> tuple[str, tuple[int, int] | None]:
    """(platform, NVIDIA compute capability or None) of the default device, or of the platform
    being compiled for (`kernels.compiling_for`: no capability known)."""
    if compiling_for_another_platform():
        return target_platform(), None
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if not capability or "cuda" not in device.client.platform_version.lower():
        return device.platform, None
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    return device.platform, (major, minor)


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
    Returns (B, T, H, D) in query's dtype.
    """
    dtype = query.dtype
    _, queries, _, dim = query.shape
    path, (platform, capability) = kernel_path(), _device()
    compute = dot_dtype(dtype, platform, capability)
    implementation = choose_attention(
        path,
        platform,
        capability,
        dtype=compute,
        head_dim=dim,
        queries=queries,
        masked=key_mask is not None or bias is not None,
    )
    query, key, value = (t.astype(compute) for t in (query, key, value))
    bias = None if bias is None else bias.astype(compute)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if implementation == "blocked":
        if path == "cpu":  # one block below 4 blocks' worth: the loop costs more
            block = CPU_BLOCK if queries >= 4 * CPU_BLOCK else queries
        else:
            block = accelerator_block(key.shape[1])
        out = blocked_attention(query, key, value, mask, bias, scale, block)
    else:
        out = jax.nn.dot_product_attention(
            query, key, value, bias=bias, mask=mask, scale=scale, implementation=implementation
        )
    return out.astype(dtype)


def accelerator_block(keys: int) -> int:
    """Queries per block of the accelerator's blocked attention: the power of two in
    [128, LONG / 2] nearest below 2**20 / keys (4 MiB of float32 scores per image and head up to
    8192 keys)."""
    return max(128, min(LONG // 2, 2 ** int(math.log2(max(2**20 // keys, 1)))))


@jax.named_scope("blocked_attention")  # names its ops in profiles
def blocked_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    mask: jnp.ndarray | None,
    bias: jnp.ndarray | None,
    scale: float | None,
    block: int,
) -> jnp.ndarray:
    """`dot_product_attention` as heads-first matmuls with the softmax normalised after the
    product with the values; for T > block, a `lax.map` over blocks of `block` queries (the
    last one padded), each rematerialised in the backward pass, so that only one block's scores
    (B, H, block, S) exist at a time, forward or backward. mask (B, 1, 1, S) or None; bias
    broadcastable to (B, H, T, S), per query (T) or not (1)."""
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

    if length <= block:
        return jnp.swapaxes(attend(q, bias), 1, 2)
    count = -(-length // block)
    pad = count * block - length

    def blocks(t: jnp.ndarray) -> jnp.ndarray:  # (..., T, X) -> (count, ..., block, X)
        t = jnp.pad(t, [(0, 0)] * (t.ndim - 2) + [(0, pad), (0, 0)])
        return jnp.moveaxis(t.reshape(*t.shape[:-2], count, block, t.shape[-1]), -3, 0)

    per_query_bias = bias is not None and bias.shape[-2] == length
    body = jax.checkpoint(
        lambda xs: attend(xs[0], xs[1] if per_query_bias else bias), prevent_cse=False
    )
    out = jax.lax.map(body, (blocks(q), blocks(bias) if per_query_bias else None))
    out = jnp.moveaxis(out, 0, -3).reshape(batch, heads, count * block, dim)[:, :, :length]
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
