"""The CLIP text encoder of Stable Diffusion 1.x / 2.x, as transformers' `CLIPTextModel`.

Pre-norm transformer with learned position embeddings, causal self-attention and a final
LayerNorm. Module names follow the PyTorch checkpoint
(`text_model.encoder.layers.0.self_attn.q_proj`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.attention import dot_product_attention
from ella_jax.models.hf_config import known_fields

ACTIVATIONS = {
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
}
# transformers' sentinel: configs saved before eos_token_id was fixed say 2 (SD 1.x and 2.x do);
# their pooled position is the largest token id's, the end token having the largest id in CLIP.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a Hugging Face CLIP text encoder `config.json` (transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # `CLIPTextModelWithProjection` (SDXL's text_encoder_2): the pooled output is projected.
    projection_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPTextConfig":
        """Reads a Hugging Face CLIP text config; what the port does not implement raises
        ValueError naming the field."""
        if raw.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"model_type={raw['model_type']!r} is not supported (clip_text_model)")
        fields = known_fields(cls, raw)
        # SD 1.x configs carry a projection_dim their CLIPTextModel never applies.
        if "CLIPTextModelWithProjection" not in raw.get("architectures", ()):
            fields.pop("projection_dim", None)
        config = cls(**fields)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={config.hidden_act!r} is not supported "
                f"(activations: {', '.join(ACTIVATIONS)})"
            )
        if not isinstance(config.eos_token_id, int):
            raise ValueError(f"eos_token_id={config.eos_token_id!r} must be an integer")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} does not divide "
                f"hidden_size={config.hidden_size}"
            )
        return config


def causal_bias(length: int, dtype: DTypeLike) -> jnp.ndarray:
    """(1, 1, length, length): 0 where a query may see a key (key <= query), else the most
    negative `dtype` value."""
    allowed = jnp.tril(jnp.ones((length, length), bool))
    return jnp.where(allowed, 0, jnp.finfo(dtype).min).astype(dtype)[None, None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased `q_proj`, `k_proj`, `v_proj`, `out_proj`."""

    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
        """x (B, L, hidden), bias broadcastable to (B, heads, L, L) -> (B, L, hidden)."""
        c = self.config
        dense = lambda name: nn.Dense(  # noqa: E731
            c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        heads = lambda t: t.reshape(*t.shape[:2], c.num_attention_heads, -1)  # noqa: E731
        q, k, v = (heads(dense(f"{n}_proj")(x)) for n in ("q", "k", "v"))
        out = dot_product_attention(q, k, v, bias=bias)
        return dense("out_proj")(out.reshape(*out.shape[:2], c.hidden_size))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.config.intermediate_size, name="fc1", **kw)(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=self.config.layer_norm_eps, name=name, **kw)  # noqa: E731
        x = x + CLIPAttention(self.config, name="self_attn", **kw)(norm("layer_norm1")(x), bias)
        return x + CLIPMLP(self.config, name="mlp", **kw)(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """-> (the last layer's output, the one before it)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bias = causal_bias(x.shape[1], self.dtype)
        previous = x
        for i in range(self.config.num_hidden_layers):
            previous, x = x, CLIPEncoderLayer(self.config, name=f"layers.{i}", **kw)(x, bias)
        return x, previous


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(
            c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw
        )(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        x, penultimate = CLIPEncoder(c, name="encoder", **kw)(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if c.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # the first end token
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return x, pooled, penultimate


class CLIPTextEncoder(nn.Module):
    """Token ids -> (last_hidden_state, pooled), as `CLIPTextModel(...)`'s `last_hidden_state`
    and `pooler_output`, with no padding mask (as Stable Diffusion calls it). With
    `penultimate`, the first is `hidden_states[-2]` (the layer before the last, no final norm),
    as SDXL reads both encoders; a config with `projection_dim` projects the pooled output
    (`CLIPTextModelWithProjection`'s `text_embeds`)."""

    config: CLIPTextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jnp.ndarray, penultimate: bool = False
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """input_ids (B, L) int, L <= max_position_embeddings
        -> ((B, L, hidden), (B, hidden or projection_dim)) in `dtype`; pooled is the
        final-normed state at the end token."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last, pooled, before = CLIPTextTransformer(c, name="text_model", **kw)(input_ids)
        if c.projection_dim is not None:
            pooled = nn.Dense(c.projection_dim, use_bias=False, name="text_projection", **kw)(
                pooled
            )
        return (before if penultimate else last), pooled
