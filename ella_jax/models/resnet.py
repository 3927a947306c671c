"""diffusers' ResNet block and resamplers (NHWC), shared by the UNet and the VAE."""

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: int | None = None, **kw):
    """A square convolution with PyTorch's symmetric padding (default: kernel // 2)."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        name=name,
        **kw,
    )


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added between; 1x1 shortcut
    when the channel count changes."""

    out_channels: int
    groups: int
    epsilon: float
    output_scale_factor: float = 1.0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None) -> jnp.ndarray:
        """x (B, H, W, C_in), temb (B, T) or None -> (B, H, W, out_channels)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.epsilon, name=name, **kw)  # noqa: E731
        h = conv(self.out_channels, 3, "conv1", **kw)(nn.silu(norm("norm1")(x)))
        if temb is not None:
            h = (
                h
                + nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[
                    :, None, None
                ]
            )
        h = conv(self.out_channels, 3, "conv2", **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; padding 0 pads right and bottom only, as the SD VAE does."""

    channels: int
    padding: int = 1
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.channels,
            3,
            "conv",
            stride=2,
            padding=self.padding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    channels: int
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
