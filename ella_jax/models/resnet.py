"""diffusers' ResNet block and resamplers (NHWC), shared by the UNet and the VAE."""

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.kernels import kernel_path


class PatchConv(nn.Module):
    """`nn.Conv` (same parameters: `kernel` HWIO, `bias`) with symmetric padding, computed as one
    matmul: the kernel's shifted, strided views of the input side by side on the channel axis,
    times the (kernel * kernel * C_in, features) kernel."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x (B, H, W, C_in) -> (B, H', W', features)."""
        k, s, p = self.kernel, self.stride, self.padding
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        height, width = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        views = [
            x[:, i : i + s * (height - 1) + 1 : s, j : j + s * (width - 1) + 1 : s]
            for i in range(k)
            for j in range(k)
        ]
        return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, self.features) + bias


def conv(
    features: int,
    kernel: int,
    name: str,
    stride: int = 1,
    padding: int | None = None,
    im2col: bool = False,
    **kw,
) -> nn.Module:
    """A square convolution with PyTorch's symmetric padding (default: kernel // 2).

    im2col: a `PatchConv` with the `cpu` kernels (`ella_jax.kernels`). XLA:CPU runs the UNet's
    3x3 convolutions slower than the matmul over their patches (BENCHMARKS.md); the patches
    take kernel**2 times the input's memory, so the VAE, at image resolution, keeps `nn.Conv`.
    """
    pad = kernel // 2 if padding is None else padding
    if im2col and kernel > 1 and kernel_path() == "cpu":
        return PatchConv(features, kernel, stride, pad, name=name, **kw)
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
    im2col: bool = False  # see `conv`
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None) -> jnp.ndarray:
        """x (B, H, W, C_in), temb (B, T) or None -> (B, H, W, out_channels)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.epsilon, name=name, **kw)  # noqa: E731
        h = conv(self.out_channels, 3, "conv1", im2col=self.im2col, **kw)(nn.silu(norm("norm1")(x)))
        if temb is not None:
            h = (
                h
                + nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[
                    :, None, None
                ]
            )
        h = conv(self.out_channels, 3, "conv2", im2col=self.im2col, **kw)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; padding 0 pads right and bottom only, as the SD VAE does."""

    channels: int
    padding: int = 1
    im2col: bool = False  # see `conv`
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
            im2col=self.im2col,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    channels: int
    im2col: bool = False  # see `conv`
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        kw = dict(im2col=self.im2col, dtype=self.dtype, param_dtype=self.param_dtype)
        return conv(self.channels, 3, "conv", **kw)(x)
