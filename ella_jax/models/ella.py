"""ELLA's Timestep-Aware Semantic Connector: a Perceiver resampler with timestep-modulated norms.

Submodules and parameters carry the names of the official PyTorch checkpoint
(`connector.perceiver_blocks.0.ln_1.linear`, ...), so conversion is a rename and a transpose.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.attention import dot_product_attention
from ella_jax.models.embeddings import TimestepEmbedding, timestep_features


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then `* (1 + scale) + shift` from the timestep embedding."""

    width: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray) -> jnp.ndarray:
        """x (B, N, width), temb (B, 1, time_embed_dim) -> (B, N, width)."""
        # Zero init, as the official code: a fresh connector starts as plain LayerNorm.
        modulation = nn.Dense(
            2 * self.width,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(nn.silu(temb))
        shift, scale = jnp.split(modulation, 2, axis=-1)
        normed = nn.LayerNorm(
            epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype, name="norm"
        )(x)
        return normed * (1 + scale) + shift


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` (packed q/k/v projection `in_proj`, then `out_proj`)."""

    width: int
    heads: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, latents: jnp.ndarray, tokens: jnp.ndarray, key_mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """Queries from `latents` attend to keys/values from [latents; tokens].

        latents (B, N, width), tokens (B, L, width), key_mask (B, N + L) -> (B, N, width).
        """
        w = self.width
        # Kept in PyTorch's (3 * width, width) layout: Wq, Wk, Wv are then contiguous row blocks,
        # where slicing a (width, 3 * width) kernel would copy it at every call.
        weight = self.param(
            "in_proj_weight", nn.initializers.xavier_uniform(), (3 * w, w), self.param_dtype
        )
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * w,), self.param_dtype)
        latents, tokens, weight, bias = nn.dtypes.promote_dtype(
            latents, tokens, weight, bias, dtype=self.dtype
        )
        q, k_latents, v_latents = jnp.split(latents @ weight.T + bias, 3, axis=-1)
        k_tokens, v_tokens = jnp.split(tokens @ weight[w:].T + bias[w:], 2, axis=-1)
        k = jnp.concatenate([k_latents, k_tokens], axis=1)
        v = jnp.concatenate([v_latents, v_tokens], axis=1)

        split_heads = lambda t: t.reshape(*t.shape[:2], self.heads, w // self.heads)  # noqa: E731
        out = dot_product_attention(split_heads(q), split_heads(k), split_heads(v), key_mask)
        out = out.reshape(*out.shape[:2], w)
        return nn.Dense(w, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)


class PerceiverAttentionBlock(nn.Module):
    """Latents attend to [latents; text tokens], then a squared-ReLU MLP; both residual."""

    width: int
    heads: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        latents: jnp.ndarray,
        temb: jnp.ndarray,
        key_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x (B, L, width) text tokens, latents (B, N, width), temb (B, 1, E),
        key_mask (B, N + L) or None -> latents (B, N, width)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed_latents = AdaLayerNorm(self.width, name="ln_1", **kw)(latents, temb)
        normed_x = AdaLayerNorm(self.width, name="ln_2", **kw)(x, temb)
        attn = MultiheadAttention(self.width, self.heads, name="attn", **kw)
        latents = latents + attn(normed_latents, normed_x, key_mask)

        hidden = AdaLayerNorm(self.width, name="ln_ff", **kw)(latents, temb)
        hidden = nn.Dense(4 * self.width, name="mlp.c_fc", **kw)(hidden)
        hidden = jnp.square(nn.relu(hidden))
        return latents + nn.Dense(self.width, name="mlp.c_proj", **kw)(hidden)


class PerceiverResampler(nn.Module):
    """Learned latents, shifted by the timestep, read the projected text through the blocks."""

    width: int
    layers: int
    heads: int
    num_latents: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, temb: jnp.ndarray, token_mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """x (B, L, input_dim), temb (B, 1, E), token_mask (B, L) -> (B, num_latents, width)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latents = self.param(
            "latents",
            nn.initializers.normal(stddev=self.width**-0.5),
            (self.num_latents, self.width),
            self.param_dtype,
        )
        time_shift = nn.Dense(self.width, name="time_aware_linear", **kw)(nn.silu(temb))
        latents = latents.astype(self.dtype)[None] + time_shift  # (B, N, width)
        x = nn.Dense(self.width, name="proj_in", **kw)(x)

        key_mask = None
        if token_mask is not None:
            latent_keys = jnp.ones((x.shape[0], self.num_latents), dtype=bool)
            key_mask = jnp.concatenate([latent_keys, token_mask.astype(bool)], axis=1)
        for i in range(self.layers):
            block = PerceiverAttentionBlock(
                self.width, self.heads, name=f"perceiver_blocks.{i}", **kw
            )
            latents = block(x, latents, temb, key_mask)
        return latents


class ELLA(nn.Module):
    """The Timestep-Aware Semantic Connector: text features and timestep -> UNet context.

    Defaults are the released SD 1.5 / flan-t5-xl model. `dtype` is the compute dtype,
    `param_dtype` the dtype parameters are created in (checkpoints keep their own).
    """

    time_channel: int = 320
    time_embed_dim: int = 768
    width: int = 768
    layers: int = 6
    heads: int = 8
    num_latents: int = 64
    input_dim: int = 2048
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        if self.heads <= 0 or self.width % self.heads:
            raise ValueError(f"ELLA heads={self.heads} does not divide width={self.width}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        t5_features: jnp.ndarray,
        timesteps: jnp.ndarray | float,
        token_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """t5_features (B, L, input_dim); timesteps (B,) or a scalar for the whole batch;
        token_mask (B, L) bool, True for real tokens (None: every token is attended).
        Returns (B, num_latents, width) in `dtype`."""
        if t5_features.shape[-1] != self.input_dim:  # else Flax's ScopeParamShapeError
            raise ValueError(
                f"features have width {t5_features.shape[-1]}, the connector expects "
                f"{self.input_dim} (its input_dim: the text model it was trained on)"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = t5_features.shape[0]
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        position = timestep_features(timesteps, self.time_channel).astype(self.dtype)
        temb = TimestepEmbedding(self.time_embed_dim, name="time_embedding", **kw)(position)
        connector = PerceiverResampler(
            self.width, self.layers, self.heads, self.num_latents, name="connector", **kw
        )
        return connector(t5_features.astype(self.dtype), temb[:, None, :], token_mask)
