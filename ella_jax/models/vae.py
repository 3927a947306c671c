"""diffusers' `AutoencoderKL` (the SD VAE), NHWC: images in [-1, 1] <-> latent moments."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.attention import Attention
from ella_jax.models.hf_config import known_fields
from ella_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv

RESNET_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A `vae/config.json`."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
        """Reads a diffusers config; a field the port does not implement raises ValueError."""
        if raw.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"act_fn={raw['act_fn']!r} is not supported (silu)")
        for field, name in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ]:
            for block in raw.get(field, ()):
                if block != name:
                    raise ValueError(f"{field} has {block!r}: not supported ({name})")
        for field in ("latents_mean", "latents_std"):
            if raw.get(field) is not None:
                raise ValueError(f"{field} is not supported")
        return cls(**known_fields(cls, raw))


class MidBlock(nn.Module):
    """ResNet, one-head self-attention over H*W (residual), ResNet; no timestep embedding."""

    channels: int
    groups: int
    add_attention: bool
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, RESNET_EPS, name="resnets.0", **kw)(x)
        if self.add_attention:
            batch, height, width, channels = x.shape
            attention = Attention(
                1,
                channels,
                qkv_bias=True,
                upcast=True,
                norm_groups=self.groups,
                name="attentions.0",
                **kw,
            )
            x = x + attention(x.reshape(batch, height * width, channels)).reshape(x.shape)
        return ResnetBlock2D(self.channels, self.groups, RESNET_EPS, name="resnets.1", **kw)(x)


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(c.block_out_channels[0], 3, "conv_in", **kw)(x)
        for i, channels in enumerate(c.block_out_channels):
            for j in range(c.layers_per_block):
                x = ResnetBlock2D(
                    channels,
                    c.norm_num_groups,
                    RESNET_EPS,
                    name=f"down_blocks.{i}.resnets.{j}",
                    **kw,
                )(x)
            if i < len(c.block_out_channels) - 1:
                x = Downsample2D(channels, 0, name=f"down_blocks.{i}.downsamplers.0", **kw)(x)
        x = MidBlock(
            c.block_out_channels[-1],
            c.norm_num_groups,
            c.mid_block_add_attention,
            name="mid_block",
            **kw,
        )(x)
        x = nn.GroupNorm(c.norm_num_groups, epsilon=RESNET_EPS, name="conv_norm_out", **kw)(x)
        return conv(2 * c.latent_channels, 3, "conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(c.block_out_channels[-1], 3, "conv_in", **kw)(z)
        x = MidBlock(
            c.block_out_channels[-1],
            c.norm_num_groups,
            c.mid_block_add_attention,
            name="mid_block",
            **kw,
        )(x)
        for i, channels in enumerate(reversed(c.block_out_channels)):
            for j in range(c.layers_per_block + 1):
                x = ResnetBlock2D(
                    channels, c.norm_num_groups, RESNET_EPS, name=f"up_blocks.{i}.resnets.{j}", **kw
                )(x)
            if i < len(c.block_out_channels) - 1:
                x = Upsample2D(channels, name=f"up_blocks.{i}.upsamplers.0", **kw)(x)
        x = nn.GroupNorm(c.norm_num_groups, epsilon=RESNET_EPS, name="conv_norm_out", **kw)(x)
        return conv(c.out_channels, 3, "conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """`encode`: images in [-1, 1] -> (mean, logvar) of the latent Gaussian (unscaled);
    `decode`: unscaled latents -> images. Scale with `config.scaling_factor` (and
    `shift_factor`) outside, as diffusers pipelines do."""

    config: VAEConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, **kw)
        self.decoder = Decoder(c, **kw)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, 1, "quant_conv", **kw)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, 1, "post_quant_conv", **kw)

    def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """images (B, H, W, C) in [-1, 1] -> mean, logvar (B, H/f, W/f, latent_channels), logvar
        clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
        """latents (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, C), unclipped."""
        latents = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """The reconstruction of `images` from the latent mean (used to create the params)."""
        mean, _ = self.encode(images)
        return self.decode(mean)
