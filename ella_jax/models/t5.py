"""The T5 encoder (T5 v1.1 / flan-T5 and the original T5), as transformers' `T5EncoderModel`.

RMS norm, relative position buckets shared by every layer, unscaled attention, gated or plain
feed-forward. Module names follow the PyTorch checkpoint
(`encoder.block.0.layer.1.DenseReluDense.wi_0`).
In float16 the residual stream is clamped as the reference does, so activations stay finite
(ELLA was trained on float16 flan-t5-xl features).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.attention import dot_product_attention
from ella_jax.models.hf_config import known_fields
from ella_jax.models.norms import RMSNorm

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder fields of a Hugging Face T5 `config.json`."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new"): T5 v1.1's GELU.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "T5Config":
        """Reads a Hugging Face T5 config; what the port does not implement raises ValueError
        naming the field."""
        if raw.get("model_type", "t5") != "t5":
            raise ValueError(f"model_type={raw['model_type']!r} is not supported (t5)")
        config = cls(**known_fields(cls, raw))
        if config.activation not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={config.feed_forward_proj!r} is not supported "
                f"(activations: {', '.join(ACTIVATIONS)})"
            )
        return config


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> jnp.ndarray:
    """Bidirectional relative position buckets (query_length, key_length), as T5 bins them:
    half the buckets per direction, exact below num_buckets/4, logarithmic up to max_distance."""
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


def clamp_float16(hidden: jnp.ndarray) -> jnp.ndarray:
    """transformers' T5 float16 guard: once any value overflows, clamp to 1000 below the max."""
    if hidden.dtype != jnp.float16:
        return hidden
    top = jnp.finfo(jnp.float16).max
    bound = jnp.where(jnp.isinf(hidden).any(), top - 1000, top).astype(jnp.float16)
    return jnp.clip(hidden, -bound, bound)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention; block 0's owns the relative position bias table."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, key_mask: jnp.ndarray, position_bias: jnp.ndarray | None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (B, L, d_model), key_mask (B, L) -> ((B, L, d_model), position_bias (1, H, L, L))."""
        c = self.config
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        heads = lambda t: t.reshape(*t.shape[:2], c.num_heads, c.d_kv)  # noqa: E731
        q, k, v = (heads(dense(c.num_heads * c.d_kv, n)(x)) for n in ("q", "k", "v"))
        if position_bias is None:
            buckets = relative_position_buckets(
                x.shape[1],
                x.shape[1],
                c.relative_attention_num_buckets,
                c.relative_attention_max_distance,
            )
            table = nn.Embed(
                c.relative_attention_num_buckets,
                c.num_heads,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="relative_attention_bias",
            )
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]
        out = dot_product_attention(
            q, k, v, key_mask, bias=position_bias.astype(q.dtype), scale=1.0
        )
        out = dense(c.d_model, "o")(out.reshape(*out.shape[:2], -1))
        return out, position_bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, position_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        attention = T5Attention(
            self.config, self.has_relative_attention_bias, name="SelfAttention", **kw
        )
        out, position_bias = attention(normed, key_mask, position_bias)
        return x + out, position_bias


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=f"DenseReluDense.{name}", **kw)  # noqa: E731
        act = ACTIVATIONS[c.activation]
        h = RMSNorm(c.layer_norm_epsilon, name="layer_norm", **kw)(x)
        if c.is_gated:
            h = act(dense(c.d_ff, "wi_0")(h)) * dense(c.d_ff, "wi_1")(h)
        else:
            h = act(dense(c.d_ff, "wi")(h))
        return x + dense(c.d_model, "wo")(h)


class T5Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, position_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = T5LayerSelfAttention(
            self.config, self.has_relative_attention_bias, name="layer.0", **kw
        )
        x, position_bias = attention(x, key_mask, position_bias)
        x = clamp_float16(x)
        x = clamp_float16(T5LayerFF(self.config, name="layer.1", **kw)(x))
        return x, position_bias


class T5Stack(nn.Module):
    config: T5Config
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        position_bias = None
        for i in range(self.config.num_layers):
            block = T5Block(self.config, i == 0, name=f"block.{i}", **kw)
            x, position_bias = block(x, key_mask, position_bias)
        return RMSNorm(self.config.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


class T5Encoder(nn.Module):
    """Token ids -> last hidden states, as `T5EncoderModel(...).last_hidden_state`."""

    config: T5Config
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None):
        """input_ids (B, L) int, attention_mask (B, L) (1 / True for real tokens)
        -> (B, L, d_model) in `dtype`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(self.config.vocab_size, self.config.d_model, name="shared", **kw)(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        return T5Stack(self.config, name="encoder", **kw)(x, attention_mask.astype(bool))
