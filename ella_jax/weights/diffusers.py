"""The UNet and the VAE from a diffusers Stable Diffusion folder (`unet/`, `vae/`: each a
`config.json` and `diffusion_pytorch_model.safetensors`, or shards with an index), and what makes
a folder SDXL: its second text encoder (`text_encoder_2/`, `tokenizer_2/`)."""

import os

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ella_jax import storage
from ella_jax.models.clip import CLIPTextEncoder
from ella_jax.models.unet import UNet2DConditionModel, UNetConfig
from ella_jax.models.vae import AutoencoderKL, VAEConfig
from ella_jax.weights.modules import params_for
from ella_jax.weights.tensors import read_config, read_json, read_weights_folder

WEIGHTS_STEM = "diffusion_pytorch_model"


def load_unet(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[UNet2DConditionModel, dict]:
    """(model, params) from a diffusers `unet/` folder; params in `param_dtype` (default `dtype`).

    Use: `model.apply({"params": params}, latents_nhwc, timesteps, context)`.
    """
    config = read_config(storage.path(folder) / "config.json", UNetConfig.from_dict)
    model = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype or dtype)
    levels = len(config.block_out_channels)
    size = 2 ** (levels - 1)
    example = [
        jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32),
    ]
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        example += [
            jax.ShapeDtypeStruct((1, text_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, 6), jnp.float32),
        ]
    tensors = read_weights_folder(folder, WEIGHTS_STEM)
    return model, params_for(model, tuple(example), tensors, str(folder), model.param_dtype)


def load_vae(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike | None = None
) -> tuple[AutoencoderKL, dict]:
    """(model, params) from a diffusers `vae/` folder; params in `param_dtype` (default `dtype`).

    Use: `model.apply({"params": params}, latents, method="decode")`, `method="encode"`.
    """
    config = read_config(storage.path(folder) / "config.json", VAEConfig.from_dict)
    model = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype or dtype)
    size = 2 ** (len(config.block_out_channels) - 1)
    example = (jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32),)
    tensors = read_weights_folder(folder, WEIGHTS_STEM)
    return model, params_for(model, example, tensors, str(folder), model.param_dtype)


def is_sdxl(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder is SDXL's (it has a second text encoder)."""
    return (storage.path(folder) / "text_encoder_2").is_dir()


def load_sdxl_text_encoder_2(
    folder: str | os.PathLike, dtype: DTypeLike = jnp.float32
) -> tuple[CLIPTextEncoder, dict, bool]:
    """SDXL's second CLIP encoder (with its projection) of a diffusers folder: (model, params,
    force_zeros_for_empty_prompt as model_index.json says, default True). Its tokenizer is
    `text.load_tokenizer(folder / "tokenizer_2")`."""
    from ella_jax.weights.clip import load_clip_text_encoder

    folder = storage.path(folder)
    model, params = load_clip_text_encoder(folder / "text_encoder_2", dtype)
    index = folder / "model_index.json"
    zeros = not index.is_file() or read_json(index).get("force_zeros_for_empty_prompt", True)
    return model, params, bool(zeros)
