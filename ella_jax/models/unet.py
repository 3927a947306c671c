"""diffusers' `UNet2DConditionModel` for SD 1.x / 2.x (and SDXL's added embeddings), NHWC.

Module names follow the diffusers checkpoint (`down_blocks.0.attentions.1.transformer_blocks.0`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax.models.embeddings import TimestepEmbedding, timestep_features
from ella_jax.models.hf_config import known_fields
from ella_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv
from ella_jax.models.transformer_2d import Transformer2DModel

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# Config fields this port implements only at these values (absent fields take diffusers' default).
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "addition_embed_type": (None, "text_time"),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "num_class_embeds": (None,),
    "resnet_out_scale_factor": (1.0,),
    "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",),
    "reverse_transformer_layers_per_block": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
}


# With remat, each ResNet and spatial transformer keeps only its inputs for the backward pass and
# recomputes the rest there (as diffusers' gradient checkpointing does).
_LAYERS = {
    False: (ResnetBlock2D, Transformer2DModel),
    True: (nn.remat(ResnetBlock2D), nn.remat(Transformer2DModel)),
}


def _per_block(value: Any, blocks: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A `unet/config.json`, with per-block settings expanded to one value per down block."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64  # the latents' side it was trained at (the pipelines' default size)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UNetConfig":
        """Reads a diffusers config; a field the port does not implement raises ValueError
        naming it. `attention_head_dim` is the number of heads unless `num_attention_heads` is
        set (the diffusers quirk SD 1.x/2.x configs rely on)."""
        for field, allowed in SUPPORTED_VALUES.items():
            if raw.get(field, allowed[0]) not in allowed:
                raise ValueError(f"{field}={raw[field]!r} is not supported (supported: {allowed})")
        blocks = len(raw.get("block_out_channels", cls.block_out_channels))
        for field, names in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for name in raw.get(field, ()):
                if name not in names:
                    raise ValueError(f"{field} has {name!r}: not supported (supported: {names})")
        if isinstance(raw.get("cross_attention_dim"), (list, tuple)):
            raise ValueError("cross_attention_dim as a list is not supported")
        heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)
        config = known_fields(cls, raw)
        config.update(
            heads=_per_block(heads, blocks),
            transformer_layers_per_block=_per_block(
                raw.get("transformer_layers_per_block", 1), blocks
            ),
            only_cross_attention=_per_block(raw.get("only_cross_attention", False), blocks),
        )
        return cls(**config)


class UNetBlock(nn.Module):
    """One resolution level: ResNets (each followed by a spatial transformer when `cross`), then
    a resampler. Down blocks return every intermediate output as skips; up blocks consume them."""

    out_channels: int
    num_layers: int
    cross: bool
    heads: int
    transformer_layers: int
    only_cross_attention: bool
    config: UNetConfig
    resample: str | None  # "down", "up" or None
    remat: bool = False  # see `_LAYERS`
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        temb: jnp.ndarray,
        context: jnp.ndarray,
        skips: Sequence[jnp.ndarray] = (),
    ) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """x (B, H, W, C), temb (B, T), context (B, S, D); `skips` (up blocks) are concatenated
        to the input of each ResNet, last first. -> (output, outputs for later skips)."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_block, transformer = _LAYERS[self.remat]
        skips, outputs = list(skips), []
        for j in range(self.num_layers):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = resnet_block(
                self.out_channels,
                c.norm_num_groups,
                c.norm_eps,
                im2col=True,
                name=f"resnets.{j}",
                **kw,
            )(x, temb)
            if self.cross:
                x = transformer(
                    self.heads,
                    self.out_channels // self.heads,
                    self.transformer_layers,
                    c.norm_num_groups,
                    c.use_linear_projection,
                    self.only_cross_attention,
                    c.upcast_attention,
                    name=f"attentions.{j}",
                    **kw,
                )(x, context)
            outputs.append(x)
        if self.resample == "down":
            x = Downsample2D(
                self.out_channels, c.downsample_padding, True, name="downsamplers.0", **kw
            )(x)
            outputs.append(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, True, name="upsamplers.0", **kw)(x)
        return x, outputs


class UNetMidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet at the lowest resolution."""

    config: UNetConfig
    remat: bool = False  # see `_LAYERS`
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels, heads = c.block_out_channels[-1], c.heads[-1]
        resnet_block, transformer = _LAYERS[self.remat]
        resnet = lambda name: resnet_block(  # noqa: E731
            channels, c.norm_num_groups, c.norm_eps, c.mid_block_scale_factor, True, name=name, **kw
        )
        x = resnet("resnets.0")(x, temb)
        x = transformer(
            heads,
            channels // heads,
            c.transformer_layers_per_block[-1],
            c.norm_num_groups,
            c.use_linear_projection,
            False,
            c.upcast_attention,
            name="attentions.0",
            **kw,
        )(x, context)
        return resnet("resnets.1")(x, temb)


class UNet2DConditionModel(nn.Module):
    """Noisy latents, timestep and text context -> the noise (or v) prediction.

    With the `cpu` kernels its convolutions run as matmuls over patches
    (`ella_jax.models.resnet.conv`). `remat`: each ResNet and spatial transformer keeps only
    its inputs for the backward pass and recomputes the rest there (training memory; the same
    numbers)."""

    config: UNetConfig
    remat: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray | float,
        encoder_hidden_states: jnp.ndarray,
        added_text_embeds: jnp.ndarray | None = None,
        added_time_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """sample (B, H, W, in_channels) NHWC, timesteps (B,) or scalar, encoder_hidden_states
        (B, S, cross_attention_dim); SDXL: added_text_embeds (B, P), added_time_ids (B, 6).
        H and W must be divisible by 2 ** (levels - 1). -> (B, H, W, out_channels) in `dtype`."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(c.block_out_channels)
        if sample.shape[1] % 2 ** (levels - 1) or sample.shape[2] % 2 ** (levels - 1):
            raise ValueError(
                f"latent size {sample.shape[1:3]} is not divisible by {2 ** (levels - 1)}"
            )
        sample = sample.astype(self.dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        time_embed_dim = 4 * c.block_out_channels[0]
        features = timestep_features(
            timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift
        )
        temb = TimestepEmbedding(time_embed_dim, name="time_embedding", **kw)(
            features.astype(self.dtype)
        )
        if c.addition_embed_type == "text_time":
            time_ids = timestep_features(
                added_time_ids.reshape(-1),
                c.addition_time_embed_dim,
                c.flip_sin_to_cos,
                c.freq_shift,
            ).reshape(batch, -1)
            added = jnp.concatenate([added_text_embeds, time_ids], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(time_embed_dim, name="add_embedding", **kw)(added)

        x = conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in", im2col=True, **kw)(sample)
        skips = [x]
        for i, block_type in enumerate(c.down_block_types):
            x, outputs = UNetBlock(
                c.block_out_channels[i],
                c.layers_per_block,
                block_type.startswith("CrossAttn"),
                c.heads[i],
                c.transformer_layers_per_block[i],
                c.only_cross_attention[i],
                c,
                "down" if i < levels - 1 else None,
                self.remat,
                name=f"down_blocks.{i}",
                **kw,
            )(x, temb, context)
            skips += outputs
        x = UNetMidBlock(c, self.remat, name="mid_block", **kw)(x, temb, context)
        for i, block_type in enumerate(c.up_block_types):
            level = levels - 1 - i
            consumed = c.layers_per_block + 1
            x, _ = UNetBlock(
                c.block_out_channels[level],
                consumed,
                block_type.startswith("CrossAttn"),
                c.heads[level],
                c.transformer_layers_per_block[level],
                c.only_cross_attention[level],
                c,
                "up" if level > 0 else None,
                self.remat,
                name=f"up_blocks.{i}",
                **kw,
            )(x, temb, context, skips[-consumed:])
            skips = skips[:-consumed]

        x = nn.silu(
            nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, name="conv_norm_out", **kw)(x)
        )
        return conv(c.out_channels, c.conv_out_kernel, "conv_out", im2col=True, **kw)(x)
