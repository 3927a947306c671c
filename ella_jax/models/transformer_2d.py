"""diffusers' `Transformer2DModel` (the UNet's spatial transformer) and `BasicTransformerBlock`."""

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.attention import Attention


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text context, GEGLU feed-forward; pre-LayerNorm
    and residual each. `only_cross_attention` makes the first attention a cross-attention too."""

    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """x (B, T, C), context (B, S, C_ctx) -> (B, T, C)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = lambda name: Attention(  # noqa: E731
            self.heads, self.dim_head, upcast=self.upcast_attention, name=name, **kw
        )
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        x = x + attention("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attention("attn2")(norm("norm2")(x), context)
        dim = x.shape[-1]
        hidden, gate = jnp.split(
            nn.Dense(8 * dim, name="ff.net.0.proj", **kw)(norm("norm3")(x)), 2, -1
        )
        hidden = hidden * nn.gelu(
            gate, approximate=False
        )  # exact GELU, as the weights were trained
        return x + nn.Dense(dim, name="ff.net.2", **kw)(hidden)


class Transformer2DModel(nn.Module):
    """GroupNorm, project in (1x1 conv or linear), transformer blocks over the H*W tokens,
    project out, residual."""

    heads: int
    dim_head: int
    layers: int
    groups: int
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """x (B, H, W, C), context (B, S, C_ctx) -> (B, H, W, C)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        # A 1x1 convolution and a Dense are the same map; only the checkpoint's layout differs.
        project = (
            (lambda n, name: nn.Dense(n, name=name, **kw))
            if self.use_linear_projection
            else (lambda n, name: nn.Conv(n, (1, 1), name=name, **kw))
        )
        h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
        h = project(inner, "proj_in")(h).reshape(batch, height * width, inner)
        for i in range(self.layers):
            h = BasicTransformerBlock(
                self.heads,
                self.dim_head,
                self.only_cross_attention,
                self.upcast_attention,
                name=f"transformer_blocks.{i}",
                **kw,
            )(h, context)
        h = project(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x
