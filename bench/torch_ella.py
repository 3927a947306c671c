"""ELLA in PyTorch eager, written from ELLA_SPEC.md with the official module names.

A reference for the benchmarks and the full-size parity test; `load_state_dict` takes the
official checkpoint. Needs torch and diffusers (test extra).
"""

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class AdaLayerNorm(nn.Module):
    def __init__(self, width: int, time_embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(nn.functional.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class PerceiverAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, time_embed_dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("sq_relu", SquaredReLU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_1 = AdaLayerNorm(width, time_embed_dim)
        self.ln_2 = AdaLayerNorm(width, time_embed_dim)
        self.ln_ff = AdaLayerNorm(width, time_embed_dim)

    def forward(self, x, latents, temb, key_padding_mask=None):
        normed = self.ln_1(latents, temb)
        kv = torch.cat([normed, self.ln_2(x, temb)], dim=1)
        attended = self.attn(normed, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        latents = latents + attended[0]
        return latents + self.mlp(self.ln_ff(latents, temb))


class PerceiverResampler(nn.Module):
    def __init__(self, width, layers, heads, num_latents, input_dim, time_embed_dim):
        super().__init__()
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        self.time_aware_linear = nn.Linear(time_embed_dim, width)
        self.proj_in = nn.Linear(input_dim, width)
        self.perceiver_blocks = nn.Sequential(
            *[PerceiverAttentionBlock(width, heads, time_embed_dim) for _ in range(layers)]
        )

    def forward(self, x, temb, key_padding_mask=None):
        latents = self.latents[None].repeat(len(x), 1, 1)
        latents = latents + self.time_aware_linear(nn.functional.silu(temb))
        x = self.proj_in(x)
        for block in self.perceiver_blocks:
            latents = block(x, latents, temb, key_padding_mask)
        return latents


class TorchELLA(nn.Module):
    def __init__(
        self,
        time_channel=320,
        time_embed_dim=768,
        width=768,
        layers=6,
        heads=8,
        num_latents=64,
        input_dim=2048,
    ):
        super().__init__()
        self.position = Timesteps(time_channel, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channel, time_embed_dim)
        self.connector = PerceiverResampler(
            width, layers, heads, num_latents, input_dim, time_embed_dim
        )

    def forward(self, t5_features, timesteps, token_mask=None):
        """token_mask (B, L) bool, True for real tokens, as in ella_jax.ELLA."""
        position = self.position(timesteps.reshape(-1)).to(t5_features.dtype)
        position = position.expand(len(t5_features), -1)[:, None]
        temb = self.time_embedding(position)
        padding = None
        if token_mask is not None:
            latent_keys = torch.ones(len(t5_features), self.connector.latents.shape[0])
            padding = ~torch.cat([latent_keys.bool(), token_mask], dim=1)
        return self.connector(t5_features, temb, padding)
