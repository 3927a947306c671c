"""Decoder-only LLMs of the Llama family (Llama 2/3, TinyLlama, Mistral, Qwen2), as transformers'
`LlamaModel`, `MistralModel` and `Qwen2Model`: the frozen text model behind a connector.

RMS norm, rotary position embeddings (default, linear, dynamic NTK and Llama 3 scaling),
grouped-query causal attention with the padding masked (right padding), a SwiGLU MLP; Qwen2's
q/k/v biases, Llama's optional attention and MLP biases. Module names follow the checkpoint
(`layers.0.self_attn.q_proj`); a CausalLM checkpoint's `model.` prefix and `lm_head` are the
loader's business (`ella_jax.weights.llm`).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ella_jax.models.attention import dot_product_attention
from ella_jax.models.hf_config import known_fields
from ella_jax.models.norms import RMSNorm

FAMILIES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """The fields of a Llama / Mistral / Qwen2 `config.json` the port reads. `rope` holds the
    rotary settings as (name, value) pairs (hashable), whichever way the file wrote them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope: tuple[tuple[str, Any], ...] = (("rope_type", "default"), ("rope_theta", 10000.0))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def rope_settings(self) -> dict[str, Any]:
        return dict(self.rope)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLMConfig":
        """Reads a Hugging Face config; what the port does not implement raises ValueError
        naming the field."""
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"model_type={model_type!r} is not supported ({', '.join(FAMILIES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported (silu)")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={raw['partial_rotary_factor']} is not supported"
            )
        if model_type == "qwen2" and raw.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported for qwen2 (its o_proj has none)")
        fields = known_fields(cls, raw)
        window = raw.get("sliding_window")
        # Qwen2 keeps a window in its config that applies only with use_sliding_window.
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            window = None
        fields["sliding_window"] = window
        fields["rope"] = tuple(sorted(_rope(raw).items()))
        return cls(**fields)


def _rope(raw: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a config: transformers 5's `rope_parameters`, or the older
    `rope_theta` + `rope_scaling` (whose type key is `rope_type` or `type`)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    # transformers reads original_max_position_embeddings for llama3 only; others may carry it.
    unknown = sorted(set(params) - {*ROPE_KEYS[rope_type], "original_max_position_embeddings"})
    if unknown:
        raise ValueError(f"rope {rope_type} field {unknown[0]!r} is not supported")
    missing = [k for k in ROPE_KEYS[rope_type] if k not in params]
    if missing:
        raise ValueError(f"rope {rope_type} needs {missing[0]!r}")
    return {"rope_type": rope_type, "rope_theta": float(theta), **params}


def inverse_frequencies(config: LLMConfig, length: int) -> np.ndarray:
    """(head_width / 2,) float32 rotary frequencies for sequences of `length` tokens, as
    transformers computes them (float32 arithmetic; dynamic scaling grows the base past
    max_position_embeddings as a fresh transformers model does)."""
    rope = config.rope_settings
    dim = config.head_width
    base = np.float32(rope["rope_theta"])
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    kind = rope["rope_type"]
    if kind == "dynamic" and length > config.max_position_embeddings:
        factor = rope["factor"]
        grown = factor * length / config.max_position_embeddings - (factor - 1)
        base = np.float32(base * grown ** (dim / (dim - 2)))
    inverse = (np.float32(1.0) / base**exponents).astype(np.float32)
    if kind == "linear":
        inverse = inverse / np.float32(rope["factor"])
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inverse
        scaled = np.where(wavelength > context / low, inverse / factor, inverse)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inverse = np.where(medium, smoothed, scaled).astype(np.float32)
    return inverse


def rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x (B, L, H, D) rotated by the angles of cos, sin (L, D): transformers' rotate_half form."""
    first, second = jnp.split(x, 2, axis=-1)
    half_turned = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, None] + half_turned * sin[:, None]


class SelfAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions (`self_attn`)."""

    config: LLMConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias):
        """x (B, L, hidden), cos/sin (L, head_width), bias (B, 1, L, L) -> (B, L, hidden)."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = c.head_width

        def project(name: str, heads: int) -> jnp.ndarray:
            out = nn.Dense(heads * width, use_bias=c.qkv_bias, name=name, **kw)(x)
            return out.reshape(*x.shape[:2], heads, width)

        q = project("q_proj", c.num_attention_heads)
        k, v = project("k_proj", c.kv_heads), project("v_proj", c.kv_heads)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        groups = c.num_attention_heads // c.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = dot_product_attention(q, k, v, bias=bias)
        out = out.reshape(*x.shape[:2], c.num_attention_heads * width)
        return nn.Dense(c.hidden_size, use_bias=c.attention_bias, name="o_proj", **kw)(out)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    config: LLMConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = nn.Dense(c.intermediate_size, name="gate_proj", **kw)(x)
        up = nn.Dense(c.intermediate_size, name="up_proj", **kw)(x)
        return nn.Dense(c.hidden_size, name="down_proj", **kw)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LLMConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        x = x + SelfAttention(c, name="self_attn", **kw)(normed, cos, sin, bias)
        normed = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + MLP(c, name="mlp", **kw)(normed)


class DecoderLLM(nn.Module):
    """Token ids -> hidden states of a decoder-only LLM, as the base model (`LlamaModel`, ...)."""

    config: LLMConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        layer: int | None = None,
    ) -> jnp.ndarray:
        """input_ids (B, L) int, attention_mask (B, L) (True for real tokens; right padding)
        -> (B, L, hidden_size) in `dtype`: transformers' `output_hidden_states` entry `layer`
        (0 the embeddings, k the output of layer k, num_hidden_layers the final norm's output),
        None: the last hidden state. Only the layers up to `layer` run. Padded positions hold
        values no real token reads."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = c.num_hidden_layers if layer is None else layer
        if not 0 <= layers <= c.num_hidden_layers:
            raise ValueError(f"layer={layer}: this model has layers 0 to {c.num_hidden_layers}")
        length = input_ids.shape[1]
        if c.sliding_window is not None and length > c.sliding_window:
            raise ValueError(
                f"{length} tokens exceed the sliding window of {c.sliding_window}, which this "
                "port does not implement"
            )
        x = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens", **kw)(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        bias = jnp.where(allowed, 0.0, jnp.finfo(self.dtype).min).astype(self.dtype)
        angles = np.arange(length, dtype=np.float32)[:, None] * inverse_frequencies(c, length)
        angles = np.concatenate([angles, angles], axis=-1)
        cos, sin = (jnp.asarray(f(angles), self.dtype) for f in (np.cos, np.sin))
        for i in range(layers):
            x = DecoderLayer(c, name=f"layers.{i}", **kw)(x, cos, sin, bias)
        if layers == c.num_hidden_layers:
            x = RMSNorm(c.rms_norm_eps, name="norm", **kw)(x)
        return x
