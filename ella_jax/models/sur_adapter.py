"""SUR-adapter (Zhong et al., ACM MM 2023): an adapter on the frozen CLIP text encoder's output.

`out = eta * fc(attention(encoder(x), x)) + (1 - eta) * x` replaces CLIP's last hidden state x as
the UNet's context. Submodules and parameters carry the names of the official PyTorch state
dict (`transformer_encoder.layers.0.self_attn.in_proj_weight`, `attention.output_layer.2`, ...),
so conversion is a rename and a transpose.

The official encoder is torch's `TransformerEncoder` built with `batch_first=False`: it reads
(B, 77, W) as (sequence=B, batch=77), so its self-attention runs over the *batch* axis at each
token position. `attend="batch"` reproduces that; `attend="tokens"` is the fix (over tokens).
"""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

Attend = Literal["batch", "tokens"]
ENCODER_HEADS = 8  # the official nn.TransformerEncoderLayer(W, nhead=8, dim_feedforward=2048)
ENCODER_FEEDFORWARD = 2048
DROPOUT = 0.1  # torch's default, kept by the official code
ETA_HIDDEN = 64  # the learned eta head's hidden width (the course variant)


def _attention(
    query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, dropout: nn.Dropout, det: bool
) -> jnp.ndarray:
    """softmax(q k^T / sqrt(D)) v with dropout on the weights (as torch's MultiheadAttention).
    query (..., T, D), key (..., S, D), value (..., S, E) -> (..., T, E). Short sequences only:
    the weights are materialised (77 tokens, or the batch)."""
    scores = jnp.einsum("...td,...sd->...ts", query, key) / jnp.sqrt(query.shape[-1]).astype(
        query.dtype
    )
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(query.dtype)
    return jnp.einsum("...ts,...se->...te", dropout(weights, deterministic=det), value)


class EncoderSelfAttention(nn.Module):
    """torch's `nn.MultiheadAttention` as self-attention: packed `in_proj`, then `out_proj`."""

    width: int
    heads: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """x (B, S, width) -> (B, S, width), attending over S."""
        w, h = self.width, self.heads
        weight = self.param(
            "in_proj_weight", nn.initializers.xavier_uniform(), (3 * w, w), self.param_dtype
        )
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * w,), self.param_dtype)
        x, weight, bias = nn.dtypes.promote_dtype(x, weight, bias, dtype=self.dtype)
        heads_first = lambda t: t.reshape(*t.shape[:2], h, w // h).swapaxes(1, 2)  # noqa: E731
        q, k, v = (heads_first(t) for t in jnp.split(x @ weight.T + bias, 3, axis=-1))
        out = _attention(q, k, v, nn.Dropout(DROPOUT), deterministic)  # (B, h, S, w / h)
        out = out.swapaxes(1, 2).reshape(x.shape)
        return nn.Dense(w, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)


class TransformerEncoderLayer(nn.Module):
    """torch's `nn.TransformerEncoderLayer` as the official code builds it: post-LN, ReLU,
    dropout 0.1, LayerNorm eps 1e-5. Attends over axis 1 of its (B, S, width) input."""

    width: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dropout = lambda t: nn.Dropout(DROPOUT)(t, deterministic=deterministic)  # noqa: E731
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        attention = EncoderSelfAttention(self.width, ENCODER_HEADS, name="self_attn", **kw)
        x = norm("norm1")(x + dropout(attention(x, deterministic)))
        hidden = dropout(nn.relu(nn.Dense(ENCODER_FEEDFORWARD, name="linear1", **kw)(x)))
        return norm("norm2")(x + dropout(nn.Dense(self.width, name="linear2", **kw)(hidden)))


class AdapterAttention(nn.Module):
    """The official single-head `Attention(query=t, key=x, value=x)`: h = softmax(q k^T /
    sqrt(width)) x + x over tokens, then a residual MLP. `value_layer` is created (it is in the
    state dict) but, as in the official code, never applied."""

    width: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, query: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
        """query, tokens (B, T, width) -> (B, T, width)."""
        dense = lambda name: nn.Dense(self.width, name=name, **kw)  # noqa: E731
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.is_initializing():
            dense("value_layer")(tokens)
        q, k = dense("query_layer")(query), dense("key_layer")(tokens)
        values = tokens.astype(self.dtype)
        hidden = _attention(q, k, values, nn.Dropout(0.0), True) + values
        mlp = dense("output_layer.2")(nn.relu(dense("output_layer.0")(hidden)))
        return mlp + hidden


class EtaHead(nn.Module):
    """The course variant's learned mix: sigmoid(MLP(mean of CLIP's tokens)), one per prompt,
    starting at `initial` (zero last kernel, bias logit(initial))."""

    initial: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x (B, T, W) -> eta (B, 1, 1) in (0, 1)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = nn.relu(nn.Dense(ETA_HIDDEN, name="linear1", **kw)(jnp.mean(x, axis=1)))
        logit = jnp.log(self.initial / (1 - self.initial))
        bias_init = nn.initializers.constant(logit)
        out = nn.Dense(
            1, kernel_init=nn.initializers.zeros, bias_init=bias_init, name="linear2", **kw
        )
        return jax.nn.sigmoid(out(hidden).astype(jnp.float32))[:, :, None]


class SURAdapter(nn.Module):
    """The official `Adapter(depth, adapter_weight, sd_text_size)`.

    `eta` is the official `adapter_weight` (0.1 in `run.sh`); `learned_eta` adds the course
    variant's per-prompt head (`eta_head`, starting at `eta`). Dropout (0.1, in the encoder)
    runs only with `deterministic=False` and a "dropout" rng.
    """

    depth: int = 2
    eta: float = 0.1
    width: int = 768
    attend: Attend = "batch"
    learned_eta: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        if self.attend not in ("batch", "tokens"):
            raise ValueError(f"SURAdapter attend={self.attend!r}: use 'batch' or 'tokens'")
        if self.width % ENCODER_HEADS:
            raise ValueError(f"SURAdapter width={self.width} is not a multiple of 8 heads")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, clip_hidden: jnp.ndarray, deterministic: bool = True
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """clip_hidden (B, T, width), CLIP's last hidden state -> (out, encoder_out, llm_out),
        each (B, T, width): the UNet's context, the encoder's output (distilled towards the LLM)
        and `fc`'s (the adapter's own term)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = clip_hidden.astype(self.dtype)
        if self.is_initializing():  # the official template layer: in the state dict, unused
            TransformerEncoderLayer(self.width, name="encoder_layer", **kw)(x)
        encoded = x.swapaxes(0, 1) if self.attend == "batch" else x
        for i in range(self.depth):
            layer = TransformerEncoderLayer(
                self.width, name=f"transformer_encoder.layers.{i}", **kw
            )
            encoded = layer(encoded, deterministic)
        encoded = encoded.swapaxes(0, 1) if self.attend == "batch" else encoded
        attended = AdapterAttention(self.width, name="attention", **kw)(encoded, x)
        llm_out = nn.Dense(self.width, kernel_init=nn.initializers.zeros, name="fc", **kw)(attended)
        eta = EtaHead(self.eta, name="eta_head", **kw)(x) if self.learned_eta else self.eta
        out = eta * llm_out + (1 - eta) * x
        return out.astype(self.dtype), encoded, llm_out
